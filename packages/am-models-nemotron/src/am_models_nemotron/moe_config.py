"""The MoEConfig a Nemotron-H config implies, and the rule for dense checkpoints (none)."""

from __future__ import annotations

from typing import Any

from am_dtype.dtypes import config_dtype
from am_models_nemotron.config import uses_moe
from am_moe.config import MoEConfig


def nemotron_moe_config(config: Any, overrides: dict | None = None) -> MoEConfig:
    """The MoEConfig of a Nemotron-H config (sigmoid + correction bias, relu2, one shared expert)."""
    values = dict(
        n_routed_experts=config.n_routed_experts,
        n_shared_experts=1,
        n_activated_experts=config.num_experts_per_tok,
        n_expert_groups=config.n_group,
        n_limited_groups=config.topk_group,
        train_gate=True,  # the router weight is trained, as in transformers
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="sigmoid",
        route_scale=config.routed_scaling_factor,
        dim=config.hidden_size,
        inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        router_bias=False,
        expert_bias=config.mlp_bias,
        expert_activation="relu2",
        dtype=config_dtype(config),
        shared_expert_gate=False,
        shared_expert_inter_dim=config.moe_shared_expert_intermediate_size,
        shared_expert_activation="relu2",
        force_e_score_correction_bias=True,
        moe_latent_size=getattr(config, "moe_latent_size", None),
    )
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ValueError(
            f"moe_overrides has unknown keys {sorted(unknown)}; accepted: {sorted(values)}"
        )
    values.update(overrides or {})
    return MoEConfig(**values)


def resolve_moe_config(
    config: Any,
    moe_config: MoEConfig | None = None,
    overrides: dict | None = None,
    mtp_layers: int = 0,
) -> MoEConfig | None:
    """The MoEConfig to build with: `moe_config` when given, else `nemotron_moe_config` when
    a decoder (or, with `mtp_layers`, MTP) block is MoE, else None: a dense checkpoint
    (Nemotron-H 8B, Nano 9B v2) needs no expert fields in its config."""
    if moe_config is not None:
        if overrides:
            raise ValueError(
                "moe_overrides cannot be combined with an explicit moe_config; put the "
                "values in the MoEConfig"
            )
        return moe_config
    if uses_moe(config, mtp_layers):
        return nemotron_moe_config(config, overrides)
    if overrides:
        raise ValueError(
            f"moe_overrides {sorted(overrides)} given, but the config has no moe blocks "
            "(a dense Nemotron-H has no MoE to configure)"
        )
    return None
