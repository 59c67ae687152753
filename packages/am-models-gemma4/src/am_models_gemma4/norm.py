"""Gemma 4's RMSNorm on the workspace's one fused RMSNorm: `FusedGemma4RMSNorm`.

transformers' `Gemma4RMSNorm` computes, in fp32, `y = x * (mean(x^2) + eps)^-0.5 [* w]` as
separate elementwise/reduction ops, and autograd runs about a dozen more full-size passes
in the backward. A decoder layer of the MoE model runs eleven of these norms (sandwich
norms, the MoE's pre/post norms, the per-head q/k/v norms, the router's weightless norm),
so on CPU, where each pass is memory-bound, they are a visible share of a training step.
`am_dtype.rms_norm` is the same function as one autograd node with a hand-written backward
(it saves only the input and the per-row rstd); the numbers equal transformers' up to fp32
rounding order (the parity tests hold logits to rel <= 1e-5 and every gradient).
"""

from __future__ import annotations

from torch import Tensor
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from am_dtype.norm import rms_norm

__all__ = ["FusedGemma4RMSNorm"]


class FusedGemma4RMSNorm(Gemma4RMSNorm):
    """transformers' `Gemma4RMSNorm` (same parameter, init and numerics) whose forward is
    `am_dtype.rms_norm`: fewer full-size passes forward and backward."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight if self.with_scale else None, self.eps)
