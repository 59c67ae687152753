"""The small MoEConfig the single-device tests share: plain softmax routing, no groups, no
shared experts, no balancing, fp32. Each test file overrides only what it exercises."""

import torch

from am_moe.config import MoEConfig

_BASE = dict(
    n_shared_experts=0,
    n_expert_groups=1,
    n_limited_groups=1,
    train_gate=True,
    gate_bias_update_factor=0.0,
    aux_loss_coeff=0.0,
    score_func="softmax",
    route_scale=1.0,
    dtype=torch.float32,
)


def small_moe_config(**fields) -> MoEConfig:
    """MoEConfig from the shared defaults updated with `fields`."""
    return MoEConfig(**{**_BASE, **fields})
