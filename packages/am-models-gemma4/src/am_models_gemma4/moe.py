"""Gemma 4's MoE block on am-moe: `Gemma4Gate` (the Gemma 4 router) inside an am-moe `MoE`.

transformers' `Gemma4TextRouter` scores experts from the *un-normalized* residual:

    h = rms_norm(x) (no learnable weight) * scale * hidden_size**-0.5
    p = softmax(h @ proj.T) in fp32;  w, idx = top_k(p);  w = w / sum(w)
    w = w * per_expert_scale[idx]

and its experts (gated GeLU-tanh, no bias) see `pre_feedforward_layernorm_2(x)`.
`Gemma4MoE` is an am-moe `MoE` (so the EP parallelizer finds it with
`isinstance(m, MoE)`) whose gate is `Gemma4Gate` and whose `gate_input` is the raw
residual. There is no balance loss (transformers has none for Gemma 4).

Shape legend: T tokens, D hidden size, E experts, K top-k.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from am_dtype.backend import BackendConfig
from am_dtype.cpu_gemm import CpuGemmLinear
from am_dtype.dtensor import to_local
from am_dtype.dtypes import config_dtype
from am_models_gemma4.norm import FusedGemma4RMSNorm
from am_moe.config import MoEConfig
from am_moe.layers import MoE

__all__ = ["Gemma4Gate", "Gemma4MoE", "gemma4_moe_config"]


def gemma4_moe_config(text_config: Any, overrides: dict | None = None) -> MoEConfig:
    """The am-moe `MoEConfig` of a Gemma 4 text config with `enable_moe_block=True`.

    Softmax routing over `num_experts`, `top_k_experts` per token, renormalized top-k
    weights, gated GeLU-tanh experts of width `moe_intermediate_size`, no shared expert
    (the dense MLP that runs beside the experts belongs to the decoder layer).
    """
    if not getattr(text_config, "enable_moe_block", False):
        raise ValueError("gemma4_moe_config needs a text config with enable_moe_block=True")
    for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if getattr(text_config, name, None) is None:
            raise ValueError(f"text_config.{name} must be set when enable_moe_block=True")
    values = dict(
        n_routed_experts=text_config.num_experts,
        n_shared_experts=0,
        n_activated_experts=text_config.top_k_experts,
        n_expert_groups=1,
        n_limited_groups=1,
        train_gate=True,
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="softmax",
        route_scale=1.0,
        dim=text_config.hidden_size,
        inter_dim=text_config.intermediate_size,
        moe_inter_dim=text_config.moe_intermediate_size,
        norm_topk_prob=True,
        router_bias=False,
        expert_bias=False,
        expert_activation="geglu",
        dtype=config_dtype(text_config),
    )
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ValueError(
            f"moe_overrides has unknown keys {sorted(unknown)}; accepted: {sorted(values)}"
        )
    values.update(overrides or {})
    return MoEConfig(**values)


class Gemma4Gate(nn.Module):
    """Gemma 4's router returning am-moe's gate format `(weights_TK, indices_TK, aux_loss)`.

    Parameters (transformers names under `router.`): `proj.weight` [E, D], `scale` [D],
    `per_expert_scale` [E]; `norm` is a weightless RMSNorm. Weights come back in fp32,
    as transformers computes the softmax in fp32; `aux_loss` is always None.
    """

    def __init__(
        self, config: Any, precision: torch.dtype | None = None, cpu_gemm: str = "auto"
    ) -> None:
        super().__init__()
        dtype = config_dtype(config)
        self.precision = precision  # BackendConfig.gate_precision: the projection's dtype
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_experts
        self.topk = config.top_k_experts
        self.scalar_root_size = self.hidden_size**-0.5
        self.norm = FusedGemma4RMSNorm(self.hidden_size, eps=config.rms_norm_eps, with_scale=False)
        self.proj = CpuGemmLinear(
            self.hidden_size, self.num_experts, bias=False, dtype=dtype, cpu_gemm=cpu_gemm
        )
        self.scale = nn.Parameter(torch.ones(self.hidden_size, dtype=dtype))
        self.per_expert_scale = nn.Parameter(torch.ones(self.num_experts, dtype=dtype))

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, cp_mesh: Any = None
    ) -> tuple[Tensor, Tensor, None]:
        """x: [..., D] -> weights [T, K] (fp32), indices [T, K]. Routing is per token, so
        `token_mask` and `cp_mesh` change nothing (padding rows are dropped by the experts)."""
        x_TD = x.reshape(-1, self.hidden_size)
        h_TD = self.norm(x_TD) * self.scale * self.scalar_root_size
        if self.precision is None:
            logits_TE = self.proj(h_TD)
        else:
            logits_TE = F.linear(h_TD.to(self.precision), self.proj.weight.to(self.precision))
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, indices_TK = torch.topk(probs_TE, k=self.topk, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * self.per_expert_scale[indices_TK]
        return weights_TK, indices_TK, None

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """transformers' init: normal(0, init_std) projection, unit scales."""
        nn.init.normal_(to_local(self.proj.weight), mean=0.0, std=init_std)
        nn.init.ones_(to_local(self.scale))
        nn.init.ones_(to_local(self.per_expert_scale))


class Gemma4MoE(MoE):
    """am-moe `MoE` with `Gemma4Gate`: routes on `gate_input` (the raw residual), runs the
    grouped experts on `x` (the `pre_feedforward_layernorm_2` output)."""

    def __init__(self, moe_config: MoEConfig, backend: BackendConfig, text_config: Any) -> None:
        super().__init__(moe_config, backend)
        if not backend.fake_balanced_gate:  # else am-moe's balanced stand-in router stays
            self.gate = Gemma4Gate(text_config, backend.gate_precision, backend.cpu_gemm)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cp_mesh: Any = None,
        gate_input: Tensor | None = None,
    ) -> Tensor:
        """x, gate_input: [..., D]; padding_mask (True = padding) has x's leading shape."""
        return super().forward(x, padding_mask, cp_mesh, gate_input=gate_input)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Gate as transformers initializes its router; experts normal(0, init_std)."""
        if isinstance(self.gate, Gemma4Gate):
            self.gate.init_weights(buffer_device, init_std)
        self.experts.init_weights(buffer_device, init_std)
