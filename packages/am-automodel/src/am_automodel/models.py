"""Model registry: which class builds a config's model, how it takes packed rows, its limits.

A model family plugs in with one `register_model(model_type, ModelSpec(...))` and, for tiny
built-in presets, `register_preset(name, fn)`; generic code never branches on model names.
Nemotron-H (`nemotron_h`) uses am-models-nemotron, Gemma 4 (`gemma4`, `gemma4.py`)
am-models-gemma4; any other `model_type` falls back to transformers'
`AutoModelForCausalLM` (packed rows through `position_ids`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from am_automodel.recipe import ModelSection, RecipeError

__all__ = [
    "PRESETS",
    "ModelSpec",
    "build_model_config",
    "initial_state_dict",
    "model_spec",
    "register_model",
    "register_preset",
]


@dataclass(frozen=True)
class ModelSpec:
    """How the trainer treats one model family.

    - `build(config, backend)`: the plain single-device model (parameters on the current
      default device, uninitialized is fine: the trainer loads or initializes them);
    - `init_weights(model, dtype)`: fresh weights in place (seeded by the caller);
    - `from_pretrained(path, dtype, backend, config=None)`: the model with a checkpoint's
      weights (`config` overrides the directory's);
    - `packing`: which forward keyword carries packed-document boundaries, "seq_idx" ([B, S]
      document index per token) or "position_ids" (positions restarting at each document);
    - `num_layers(config)`, `num_experts(config)` (None: no MoE): for mesh checks;
    - `model_class(config)`: the class `build` makes (context parallelism needs its
      `setup_cp_attention` and `prepare_model_inputs_for_cp` hooks);
    - `inputs(batch, config, device, dtype)`: forward keywords of a batch of packed rows
      (default: `{packing: batch[packing]}`).
    """

    build: Callable[[Any, Any], nn.Module]
    init_weights: Callable[[nn.Module, torch.dtype], None]
    from_pretrained: Callable[..., nn.Module]
    packing: str
    num_layers: Callable[[Any], int]
    num_experts: Callable[[Any], int | None]
    model_class: Callable[[Any], type] | None = None
    inputs: Callable[..., dict[str, Any]] | None = None

    def forward_inputs(self, batch: dict, config, device, dtype) -> dict[str, Any]:
        """The forward keywords (besides `input_ids`) that carry the rows' document boundaries."""
        if self.inputs is not None:
            return self.inputs(batch, config, device, dtype)
        return {self.packing: batch[self.packing].to(device)}

    def has_cp_hooks(self, config) -> bool:
        """Whether the model class owns context parallelism (its CP hooks)."""
        cls = self.model_class(config) if self.model_class is not None else None
        return cls is not None and all(callable(getattr(cls, name, None)) for name in CP_HOOKS)


CP_HOOKS = ("setup_cp_attention", "prepare_model_inputs_for_cp")
_REGISTRY: dict[str, ModelSpec] = {}
PRESETS: dict[str, Callable[[int], Any]] = {}


def register_model(model_type: str, spec: ModelSpec) -> None:
    """Use `spec` for configs whose `model_type` is `model_type`."""
    _REGISTRY[model_type] = spec


def register_preset(name: str, make_config: Callable[[int], Any]) -> None:
    """A built-in preset: `make_config(vocab_size)` returns its (tiny) config."""
    PRESETS[name] = make_config


# ----------------------------------------------------------------------------- Nemotron-H
def _nemotron_build(config, backend):
    from am_models_nemotron import NemotronHForCausalLM

    return NemotronHForCausalLM(config, backend=backend)


def _nemotron_init(model, dtype):
    model.initialize_weights(dtype=dtype)


def _nemotron_from_pretrained(path, dtype, backend, config=None):
    from am_models_nemotron import NemotronHForCausalLM

    return NemotronHForCausalLM.from_pretrained(path, config=config, dtype=dtype, backend=backend)


def _nemotron_class(config):
    from am_models_nemotron import NemotronHForCausalLM

    return NemotronHForCausalLM


def _nemotron_layers(config) -> int:
    from am_models_nemotron.layers import resolve_block_types

    return len(resolve_block_types(config))


def _nemotron_experts(config) -> int | None:
    from am_models_nemotron.layers import resolve_block_types

    if "moe" not in resolve_block_types(config):
        return None
    return int(config.n_routed_experts)


register_model(
    "nemotron_h",
    ModelSpec(
        build=_nemotron_build,
        init_weights=_nemotron_init,
        from_pretrained=_nemotron_from_pretrained,
        packing="seq_idx",
        num_layers=_nemotron_layers,
        num_experts=_nemotron_experts,
        model_class=_nemotron_class,
    ),
)


def tiny_nemotron_h(vocab_size: int):
    """A 4-block hybrid (Mamba2, MoE with 8 experts, attention, MLP), hidden 64: trains on a CPU."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


register_preset("tiny-nemotron-h", tiny_nemotron_h)


def small_nemotron_h(vocab_size: int):
    """Hidden 256, blocks Mamba2 / MoE (8 experts, top-2) / Mamba2 / attention: small but not
    trivial, the model of `bench/train.py` (packed 1024-token rows)."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention"],
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=512,
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=64,
        n_groups=2,
        chunk_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


register_preset("small-nemotron-h", small_nemotron_h)


# ----------------------------------------------------------------------------- fallback
def _auto_build(config, backend):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def _auto_init(model, dtype):
    model.init_weights()
    model.to(dtype)


def _auto_from_pretrained(path, dtype, backend, config=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)


def _auto_class(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config))


_AUTO = ModelSpec(
    build=_auto_build,
    init_weights=_auto_init,
    from_pretrained=_auto_from_pretrained,
    packing="position_ids",
    num_layers=lambda c: int(getattr(c, "num_hidden_layers", 1)),
    num_experts=lambda c: None,
    model_class=_auto_class,
)


def model_spec(config) -> ModelSpec:
    """The registered spec for `config.model_type`, else the AutoModelForCausalLM fallback."""
    return _REGISTRY.get(getattr(config, "model_type", ""), _AUTO)


# ----------------------------------------------------------------------------- configs
def has_weights(path: str | None) -> bool:
    """True when a model directory holds weight files (not just a config)."""
    if path is None:
        return False
    return any(Path(path).glob("*.safetensors")) or any(Path(path).glob("pytorch_model*.bin"))


def build_model_config(section: ModelSection, vocab_size: int):
    """The model config of a recipe (no weights): preset or `AutoConfig` of `model.path`."""
    if section.preset is not None:
        config = PRESETS[section.preset](vocab_size)
    else:
        path = Path(section.path)
        if not (path / "config.json").is_file():
            raise RecipeError(f"model.path = {section.path!r}: no config.json in that directory")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    text = config.get_text_config()  # a VLM's (Gemma 4) text fields live in its text config
    for key, value in section.config_overrides.items():
        target = config if hasattr(config, key) else text
        if not hasattr(target, key):
            raise RecipeError(
                f"model.config_overrides.{key}: {type(config).__name__} has no field {key!r}"
            )
        setattr(target, key, value)
    config.dtype = section.dtype
    if text.vocab_size < vocab_size:
        raise RecipeError(
            f"model vocab_size = {text.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} ids; set model.config_overrides.vocab_size or use a matching tokenizer"
        )
    return config


def initial_state_dict(
    section: ModelSection, config, backend, seed: int
) -> dict[str, torch.Tensor]:
    """Full starting weights on CPU: the checkpoint's, or a fresh init seeded by `seed`."""
    from am_dtype import resolve_dtype

    spec = model_spec(config)
    dtype = resolve_dtype(section.dtype)
    if has_weights(section.path):
        model = spec.from_pretrained(section.path, dtype, backend, config)
    else:
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = spec.build(config, backend)
        spec.init_weights(model, dtype)
    return {k: v.detach() for k, v in model.state_dict().items()}


import am_automodel.gemma4  # noqa: E402,F401 - registers the Gemma 4 spec and preset
