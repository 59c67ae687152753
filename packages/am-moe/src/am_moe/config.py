"""`MoEConfig`: the shape and routing choices of one mixture-of-experts block.

One config describes both model families that route through am-moe:
Nemotron-H (sigmoid scores, `e_score_correction_bias`, group-limited top-k,
squared-ReLU experts, shared experts, optional latent projection) and Gemma 4
(softmax scores, gated GeLU experts, a model-owned gate). Invalid combinations
are rejected at construction with a ValueError naming the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from am_dtype.dtypes import resolve_dtype
from am_dtype.validation import check_bool, check_float, check_int

__all__ = [
    "EXPERT_ACTIVATIONS",
    "SCORE_FUNCS",
    "SHARED_EXPERT_ACTIVATIONS",
    "MoEConfig",
    "is_gated",
]

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_ACTIVATIONS = ("swiglu", "geglu", "quick_geglu", "swigluoai", "relu2")
SHARED_EXPERT_ACTIVATIONS = ("swiglu", "geglu", "relu2")
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "quick_geglu", "swigluoai"})


def is_gated(activation: str) -> bool:
    """True when the activation multiplies a gate half by an up half (weights are [.., 2F])."""
    return activation in GATED_ACTIVATIONS


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"MoEConfig.{name}={value!r} is not supported; accepted: {list(accepted)}")


def _positive(name: str, value: int, *, allow_zero: bool = False) -> None:
    check_int(_OWNER, name, value, low=0 if allow_zero else 1)


_OWNER = "MoEConfig"
_BOOL_FIELDS = (
    "train_gate",
    "norm_topk_prob",
    "router_bias",
    "expert_bias",
    "shared_expert_gate",
    "force_e_score_correction_bias",
)


@dataclass(kw_only=True)
class MoEConfig:
    """Configuration of routed and shared experts (keyword-only).

    Routing: `n_routed_experts` experts, `n_activated_experts` (top-k) per
    token, chosen within `n_limited_groups` of `n_expert_groups` groups;
    `score_func` "softmax" or "sigmoid"; weights renormalized when
    `norm_topk_prob` and multiplied by `route_scale`. `gate_bias_update_factor`
    > 0 enables aux-loss-free balancing through `e_score_correction_bias`;
    `aux_loss_coeff` > 0 adds the sequence-level balance loss.

    Experts: `moe_inter_dim` is the routed experts' hidden size, applied with
    `expert_activation`; `n_shared_experts` shared experts use
    `shared_expert_inter_dim` (default `n_shared_experts * moe_inter_dim`) and
    `shared_expert_activation`, optionally scaled by a sigmoid
    `shared_expert_gate`. With `moe_latent_size` set, routed experts run in a
    latent space reached through `fc1_latent_proj` / `fc2_latent_proj`.
    `inter_dim` is the dense-MLP size of the surrounding model (kept for
    models that build dense layers from the same config). `dtype` accepts a
    torch.dtype or a string such as "bfloat16".
    """

    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    train_gate: bool
    gate_bias_update_factor: float
    aux_loss_coeff: float
    score_func: str
    route_scale: float
    dim: int
    inter_dim: int
    moe_inter_dim: int
    norm_topk_prob: bool
    router_bias: bool = False
    expert_bias: bool = False
    expert_activation: str = "swiglu"
    activation_alpha: float = 1.702
    activation_limit: float = 7.0
    dtype: str | torch.dtype = torch.bfloat16
    shared_expert_gate: bool = False
    shared_expert_inter_dim: int | None = None
    shared_expert_activation: str = "swiglu"
    force_e_score_correction_bias: bool = False
    moe_latent_size: int | None = None

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, name="MoEConfig.dtype")
        for name in ("n_routed_experts", "n_activated_experts", "dim", "moe_inter_dim"):
            _positive(name, getattr(self, name))
        _positive("n_shared_experts", self.n_shared_experts, allow_zero=True)
        _positive("inter_dim", self.inter_dim, allow_zero=True)
        # 0 groups is the reference's spelling of "no grouping".
        self.n_expert_groups = max(
            check_int(_OWNER, "n_expert_groups", self.n_expert_groups, low=0), 1
        )
        self.n_limited_groups = max(
            check_int(_OWNER, "n_limited_groups", self.n_limited_groups, low=0), 1
        )
        for name in _BOOL_FIELDS:
            check_bool(_OWNER, name, getattr(self, name))
        self._check_floats()
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("expert_activation", self.expert_activation, EXPERT_ACTIVATIONS)
        _choice(
            "shared_expert_activation", self.shared_expert_activation, SHARED_EXPERT_ACTIVATIONS
        )
        self._check_routing()
        for name in ("shared_expert_inter_dim", "moe_latent_size"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.gate_bias_update_factor > 0 and not self.train_gate:
            raise ValueError(
                f"MoEConfig.gate_bias_update_factor={self.gate_bias_update_factor} updates the "
                "gate's correction bias during training; it needs train_gate=True"
            )

    def _check_floats(self) -> None:
        """Finite floats (ints accepted, stored as floats): the loss and bias rates >= 0,
        `route_scale` and `activation_limit` > 0, `activation_alpha` any finite value."""
        f = check_float
        self.gate_bias_update_factor = f(
            _OWNER, "gate_bias_update_factor", self.gate_bias_update_factor, low=0
        )
        self.aux_loss_coeff = f(_OWNER, "aux_loss_coeff", self.aux_loss_coeff, low=0)
        self.route_scale = f(_OWNER, "route_scale", self.route_scale, low=0, strictly_above=True)
        self.activation_alpha = f(_OWNER, "activation_alpha", self.activation_alpha)
        self.activation_limit = f(
            _OWNER, "activation_limit", self.activation_limit, low=0, strictly_above=True
        )

    def _check_routing(self) -> None:
        e, k = self.n_routed_experts, self.n_activated_experts
        groups, limited = self.n_expert_groups, self.n_limited_groups
        if k > e:
            raise ValueError(f"MoEConfig.n_activated_experts={k} exceeds n_routed_experts={e}")
        if e % groups:
            raise ValueError(
                f"MoEConfig.n_expert_groups={groups} does not divide n_routed_experts={e}"
            )
        if limited > groups:
            raise ValueError(
                f"MoEConfig.n_limited_groups={limited} exceeds n_expert_groups={groups}"
            )
        if k > limited * (e // groups):
            raise ValueError(
                f"MoEConfig.n_activated_experts={k} exceeds the {limited * (e // groups)} experts "
                f"reachable in n_limited_groups={limited} groups of {e // groups}"
            )

    @property
    def expert_dim(self) -> int:
        """Width the routed experts see: `moe_latent_size` when set, else `dim`."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.dim

    @property
    def shared_inter_dim(self) -> int:
        """Hidden size of the shared-experts MLP."""
        if self.shared_expert_inter_dim is not None:
            return self.shared_expert_inter_dim
        return self.n_shared_experts * self.moe_inter_dim

    @property
    def uses_correction_bias(self) -> bool:
        """Whether the gate carries an `e_score_correction_bias` buffer."""
        return self.gate_bias_update_factor > 0 or self.force_e_score_correction_bias
