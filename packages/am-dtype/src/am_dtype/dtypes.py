"""Dtype names: the one table of spellings every package accepts.

`resolve_dtype` is used wherever a dtype arrives as user input (configs,
`from_pretrained(dtype=...)`, `BackendConfig.gate_precision`, recipes), so
"bf16", "bfloat16", "torch.bfloat16" and `torch.bfloat16` mean the same thing
everywhere and an unknown name gets the same error listing the accepted ones.
`config_dtype` reads a Hugging Face config's parameter dtype.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DTYPE_ALIASES", "config_dtype", "resolve_dtype"]

# Every accepted spelling (lower case, without a "torch." prefix) -> floating dtype.
DTYPE_ALIASES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def resolve_dtype(value: str | torch.dtype | None, *, name: str = "dtype") -> torch.dtype | None:
    """Turn "float32", "bf16", "torch.float32" or a torch.dtype into a floating torch.dtype.

    None passes through (callers choose their default). `name` is the argument's name in
    the error, which lists every accepted spelling.
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ValueError(f"{name}={value} is not a floating-point dtype")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPE_ALIASES:
            return DTYPE_ALIASES[key]
    raise ValueError(
        f"{name}={value!r} is not a known floating dtype; accepted: a torch.dtype or one of "
        f"{sorted(DTYPE_ALIASES)}"
    )


def config_dtype(config: Any, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """Parameter dtype of a model config: `config.dtype` (transformers 5) or `torch_dtype` (v4).

    `torch_dtype` is read only when the config has no `dtype` attribute at all, because
    transformers 5 warns on reading it. A composite (vision-language) config that leaves it
    unset takes its text config's (`get_text_config()`); unset everywhere gives `default`.
    """
    value = _dtype_field(config)
    if value is None and callable(getattr(config, "get_text_config", None)):
        text = config.get_text_config()
        if text is not config:
            value = _dtype_field(text)
    return resolve_dtype(value, name="config.dtype") or default


def _dtype_field(config: Any) -> Any:
    return config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
