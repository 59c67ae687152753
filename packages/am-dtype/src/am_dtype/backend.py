"""Backend selection for model components.

`BackendConfig` names, per component, which implementation a model builds:
attention kernel, linear layers, RMSNorm, MoE experts and the expert-parallel
token dispatcher. Defaults follow what is installed (Transformer Engine,
DeepEP, grouped_gemm, UCCL-EP) and whether CUDA is present, so the same
config object works on a laptop CPU and on a GPU cluster. Optional packages
are detected with `importlib.util.find_spec` and never imported here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from am_dtype import fp8 as _fp8
from am_dtype.availability import HAVE_DEEP_EP, HAVE_GMM, HAVE_TE, HAVE_UCCL_EP, _has
from am_dtype.dtypes import resolve_dtype
from am_dtype.fp8 import TEFp8Config

logger = logging.getLogger(__name__)

_CUDA = torch.cuda.is_available()

ATTN_CHOICES = ("te", "sdpa", "flex", "eager", "tilelang")
LINEAR_CHOICES = ("torch", "te")
RMS_NORM_CHOICES = ("torch", "torch_fp32", "te")
EXPERTS_CHOICES = ("torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8")
DISPATCHER_CHOICES = ("torch", "deepep", "hybridep", "uccl_ep")

# Which optional package each backend choice needs, and the extra that installs it.
_REQUIREMENTS: dict[tuple[str, str], tuple[bool, str, str]] = {
    ("attn", "te"): (HAVE_TE, "transformer_engine", "te"),
    ("attn", "tilelang"): (_has("tilelang"), "tilelang", "gpu"),
    ("linear", "te"): (HAVE_TE, "transformer_engine", "te"),
    ("rms_norm", "te"): (HAVE_TE, "transformer_engine", "te"),
    ("experts", "te"): (HAVE_TE, "transformer_engine", "te"),
    ("experts", "gmm"): (HAVE_GMM, "grouped_gemm", "gmm"),
    ("experts", "torch_mm_mxfp8"): (_has("torchao"), "torchao", "gpu"),
    ("dispatcher", "deepep"): (HAVE_DEEP_EP, "deep_ep", "deepep"),
    ("dispatcher", "hybridep"): (HAVE_DEEP_EP, "deep_ep", "deepep"),
    ("dispatcher", "uccl_ep"): (HAVE_UCCL_EP, "uccl", "uccl"),
}


def _default_experts() -> str:
    if _CUDA:
        return "torch_mm"
    # torch._grouped_mm runs on CPU in recent torch and is faster than a per-expert
    # loop for forward+backward; older torch only has the loop.
    return "torch_mm" if hasattr(torch, "_grouped_mm") else "torch"


@dataclass
class BackendConfig:
    """Backend configuration for model components.

    Each field picks an implementation by name; `__post_init__` rejects unknown
    names and names whose optional package is not installed, listing what is
    accepted. `enable_deepep` is the legacy switch for `dispatcher` (True ->
    "deepep", False -> "torch"). `gate_precision` accepts a dtype or a string
    such as "float32" and is stored as a torch.dtype (or None: router math in
    the activation dtype). `compile_attn` wraps the attention kernel call in
    `torch.compile` (am-utils' `AttentionKernel`); "te" attention cannot be compiled.
    """

    attn: Literal["te", "sdpa", "flex", "eager", "tilelang"] = "te" if HAVE_TE and _CUDA else "sdpa"
    linear: Literal["torch", "te"] = "te" if HAVE_TE and _CUDA else "torch"
    rms_norm: Literal["torch", "torch_fp32", "te"] = "torch_fp32"
    rope_fusion: bool = HAVE_TE and _CUDA
    experts: Literal["torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8"] = _default_experts()
    dispatcher: Literal["torch", "deepep", "hybridep", "uccl_ep"] = (
        "deepep" if HAVE_DEEP_EP and _CUDA else "torch"
    )
    dispatcher_num_sms: int = 20
    dispatcher_share_token_dispatcher: bool = True
    dispatcher_async_dispatch: bool = False
    enable_deepep: bool | None = None
    fake_balanced_gate: bool = False
    fake_gate_noise: float = 0.0
    enable_hf_state_dict_adapter: bool = True
    enable_fsdp_optimizations: bool = False
    te_fp8: TEFp8Config | None = None
    gate_precision: str | torch.dtype | None = None
    compile_attn: bool = False

    def __post_init__(self) -> None:
        if self.enable_deepep is not None:
            self._apply_legacy_enable_deepep()
        for field_name, choices in (
            ("attn", ATTN_CHOICES),
            ("linear", LINEAR_CHOICES),
            ("rms_norm", RMS_NORM_CHOICES),
            ("experts", EXPERTS_CHOICES),
            ("dispatcher", DISPATCHER_CHOICES),
        ):
            value = getattr(self, field_name)
            if value not in choices:
                raise ValueError(
                    f"BackendConfig.{field_name}={value!r} is not supported; accepted: {list(choices)}"
                )
            available, package, extra = _REQUIREMENTS.get((field_name, value), (True, "", ""))
            if not available:
                raise ImportError(
                    f"BackendConfig.{field_name}={value!r} needs the '{package}' package, which is "
                    f"not installed; install the '{extra}' extra or choose another {field_name}"
                )
        if not isinstance(self.dispatcher_num_sms, int) or self.dispatcher_num_sms <= 0:
            raise ValueError(
                f"BackendConfig.dispatcher_num_sms={self.dispatcher_num_sms!r} must be a positive int"
            )
        if self.fake_gate_noise < 0:
            raise ValueError(f"BackendConfig.fake_gate_noise={self.fake_gate_noise} must be >= 0")
        self.gate_precision = resolve_dtype(
            self.gate_precision, name="BackendConfig.gate_precision"
        )
        if self.compile_attn and self.attn == "te":
            raise ValueError(
                "BackendConfig.compile_attn=True cannot be combined with attn='te': Transformer "
                "Engine's attention is already a fused CUDA kernel that torch.compile does not "
                "trace; set compile_attn=False or choose attn='sdpa', 'flex' or 'eager'"
            )
        if self.te_fp8 is not None and not HAVE_TE:
            raise ImportError(
                "BackendConfig.te_fp8 enables Transformer Engine FP8, but 'transformer_engine' is "
                "not installed; install the 'te' extra or set te_fp8=None"
            )

    def _apply_legacy_enable_deepep(self) -> None:
        # True selects DeepEP unless a DeepEP-based dispatcher (deepep, hybridep) is already
        # chosen; False turns a DeepEP-based dispatcher back into the torch one.
        deepep_based = self.dispatcher in ("deepep", "hybridep")
        if self.enable_deepep and not deepep_based:
            self.dispatcher = "deepep"
        elif not self.enable_deepep and deepep_based:
            self.dispatcher = "torch"
        warnings.warn(
            f"BackendConfig.enable_deepep is deprecated; use dispatcher={self.dispatcher!r}",
            DeprecationWarning,
            stacklevel=4,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (dtype as its string name), for logging and recipes."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(out["gate_precision"], torch.dtype):
            out["gate_precision"] = str(out["gate_precision"]).removeprefix("torch.")
        return out


def initialize_linear_module(
    linear_impl: str,
    in_features: int,
    out_features: int,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """Build a linear layer with the named backend ("torch" or "te").

    A TE module created on the meta device is materialized by its
    `reset_parameters()`.
    """
    if linear_impl == "torch":
        return torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    if linear_impl == "te":
        if not HAVE_TE:
            raise ImportError("linear_impl='te' needs transformer_engine; install the 'te' extra")
        import transformer_engine.pytorch as te

        _fp8._patch_te_modules()
        return te.Linear(in_features, out_features, bias=bias, device=device, params_dtype=dtype)
    raise ValueError(
        f"linear_impl={linear_impl!r} is not supported; accepted: {list(LINEAR_CHOICES)}"
    )


def initialize_rms_norm_module(
    rms_norm_impl: str,
    dim: int,
    eps: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """Build an RMSNorm with the named backend.

    "torch" is `nn.RMSNorm` (math in the input dtype), "torch_fp32" is
    `Float32RMSNorm` (math in fp32, output in the input dtype), "te" is
    Transformer Engine's fused kernel.
    """
    if rms_norm_impl == "torch":
        return torch.nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if rms_norm_impl == "torch_fp32":
        from am_dtype.norm import Float32RMSNorm

        return Float32RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if rms_norm_impl == "te":
        if not HAVE_TE:
            raise ImportError("rms_norm_impl='te' needs transformer_engine; install the 'te' extra")
        import transformer_engine.pytorch as te

        _fp8._patch_te_modules()
        return te.RMSNorm(dim, eps=eps, device=device, params_dtype=dtype)
    raise ValueError(
        f"rms_norm_impl={rms_norm_impl!r} is not supported; accepted: {list(RMS_NORM_CHOICES)}"
    )
