"""The config attributes Nemotron-H reads, and plain config objects made into NemotronHConfig.

The model takes any config object carrying these attributes: a transformers
`NemotronHConfig`, or a plain class / `types.SimpleNamespace` as users of the reference
write. What a block reads depends on its type, so a dense checkpoint (Nemotron-H 8B,
Nemotron Nano 9B v2: no `moe` blocks) needs none of the expert fields. A missing attribute
is one `AttributeError` listing all of them, raised at construction.

A plain object is copied into a `NemotronHConfig` (`nemotron_config`), because
transformers' `generate()` and `save_pretrained` need a `PretrainedConfig`. The copy holds
the object's own values, and every attribute the model reads with a default (`head_dim`,
`moe_latent_size`, ...) is written with the value the model resolves, so the copy builds
exactly the model the object describes (transformers' defaults, e.g. `head_dim=128`, never
leak in), and a saved checkpoint reloads into the same model.
"""

from __future__ import annotations

from typing import Any

from am_models_nemotron.layers import HF_BLOCK_NAMES, resolve_block_types
from am_utils.config import config_attributes, is_pretrained_config
from am_utils.validation import require_attributes

# Read by every model.
COMMON_ATTRS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "layer_norm_epsilon",
    "initializer_range",
)

# Read by the blocks of each (canonical) type.
BLOCK_ATTRS: dict[str, tuple[str, ...]] = {
    "mamba": (
        "mamba_num_heads",
        "mamba_head_dim",
        "ssm_state_size",
        "n_groups",
        "conv_kernel",
        "chunk_size",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "use_bias",
        "use_conv_bias",
        "mamba_hidden_act",
    ),
    "attention": (
        "num_attention_heads",
        "num_key_value_heads",
        "attention_bias",
        "attention_dropout",
    ),
    "mlp": ("intermediate_size", "mlp_bias"),
    "moe": (
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "intermediate_size",
        "moe_intermediate_size",
        "moe_shared_expert_intermediate_size",
        "norm_topk_prob",
        "mlp_bias",
    ),
}

# Read with a default when absent: name -> default (a callable computes it from the config).
OPTIONAL_ATTRS: dict[str, Any] = {
    "head_dim": lambda c: c.hidden_size // c.num_attention_heads,
    "moe_latent_size": None,
    "num_nextn_predict_layers": 0,
    "rescale_prenorm_residual": True,
    "mamba_ssm_cache_dtype": "float32",
    "output_hidden_states": False,
}


def mtp_depths(config: Any, override: int | None = None) -> int:
    """MTP depths the model builds: `override` when given, else the config's (0 when absent)."""
    if override is not None:
        return int(override)
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def used_block_types(config: Any, mtp_layers: int | None = None) -> set[str]:
    """Canonical block types of the decoder and, when MTP is on, of the MTP heads."""
    types = set(resolve_block_types(config))
    if mtp_depths(config, mtp_layers):
        types |= set(resolve_block_types(config, "mtp_layers_block_type"))
    return types


def uses_moe(config: Any, mtp_layers: int | None = None) -> bool:
    """Whether any block built from `config` is a MoE block (else no MoEConfig is needed)."""
    return "moe" in used_block_types(config, mtp_layers)


def check_nemotron_config(config: Any, mtp_layers: int | None = None) -> None:
    """Raise one AttributeError naming every attribute the model would read and `config` lacks."""
    types = used_block_types(config, mtp_layers)
    needed = list(COMMON_ATTRS)
    for block_type in sorted(types):
        needed += BLOCK_ATTRS[block_type]
    require_attributes(config, needed, f"a Nemotron-H model with {sorted(types)} blocks")


def nemotron_config(config: Any, mtp_layers: int | None = None) -> Any:
    """`config` checked; a `PretrainedConfig` as given, anything else as a `NemotronHConfig`
    copy that reads the same (see the module docstring)."""
    check_nemotron_config(config, mtp_layers)
    if is_pretrained_config(config):
        return config
    from transformers import NemotronHConfig

    values = config_attributes(config)
    for derived in ("hybrid_override_pattern", "mtp_hybrid_override_pattern", "num_hidden_layers"):
        values.pop(derived, None)  # NemotronHConfig derives these from the block lists
    values["layers_block_type"] = _hf_names(resolve_block_types(config))
    if mtp_depths(config):
        values["mtp_layers_block_type"] = _hf_names(
            resolve_block_types(config, "mtp_layers_block_type")
        )
    for name, default in OPTIONAL_ATTRS.items():
        if getattr(config, name, None) is None and not (
            name == "head_dim" and not _has_attn(config)
        ):
            values[name] = default(config) if callable(default) else default
    return NemotronHConfig(**values)


def _has_attn(config: Any) -> bool:
    return hasattr(config, "num_attention_heads") and hasattr(config, "hidden_size")


def _hf_names(block_types: list[str]) -> list[str]:
    return [HF_BLOCK_NAMES[t][0] for t in block_types]
