"""Gemma 4's RMSNorm with a hand-written backward: `FusedGemma4RMSNorm`, `rms_norm`.

transformers' `Gemma4RMSNorm` computes, in fp32, `y = x * (mean(x^2) + eps)^-0.5 [* w]`
as six separate elementwise/reduction ops; autograd then records each and runs about a
dozen more full-size passes in the backward (every intermediate is a [tokens, dim] fp32
tensor). A decoder layer of the MoE model runs eleven of these norms (sandwich norms, the
MoE's pre/post norms, q/k/v per-head norms, the router's weightless norm), so on CPU,
where each pass is memory-bound, they are a visible share of a training step.

`rms_norm` is the same function as one autograd node that saves only the input and the
per-row `rstd = (mean(x^2) + eps)^-0.5` (no normalized copy) and computes the gradients
in six passes, two of them matrix-vector products:

    h      = g * x                              (one pass, reused twice)
    dw     = h^T @ rstd                         (sum over rows of g * x_hat)
    c      = rstd^3 * (h @ w) / D               (the projection of g * w on x_hat, per row)
    dx     = (g * w) * rstd - x * c

The numbers equal transformers' up to fp32 rounding order (the package's parity tests
hold them to logits rel <= 1e-5 and every gradient). Inputs of any float dtype compute in
fp32 and return in the input dtype, as transformers does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

__all__ = ["FusedGemma4RMSNorm", "rms_norm"]


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        x32 = x.float()
        rstd = torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        y = x32 * rstd
        if weight is not None:
            y.mul_(weight.float())
        ctx.save_for_backward(x, rstd, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        dim = x.shape[-1]
        x32 = x.float().reshape(-1, dim)
        g = grad.float().reshape(-1, dim)
        r = rstd.reshape(-1)
        h = g * x32
        r_col = r.unsqueeze(-1)
        dw = None
        if weight is not None:
            w = weight.float()
            if ctx.needs_input_grad[1]:
                dw = (h.t() @ r).to(weight.dtype)
            proj = h @ w
            scaled = (g * w).mul_(r_col)
        else:
            proj = h.sum(-1)
            scaled = g * r_col
        dx = None
        if ctx.needs_input_grad[0]:
            c = (r * r * r * proj / dim).unsqueeze(-1)
            dx = scaled.addcmul_(x32, c, value=-1.0).reshape(x.shape).to(x.dtype)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Gemma 4's RMSNorm of `x` over its last dim (`weight=None`: no scale), as one
    autograd node (see the module docstring)."""
    return _RMSNormFunction.apply(x, weight, eps)


class FusedGemma4RMSNorm(Gemma4RMSNorm):
    """transformers' `Gemma4RMSNorm` (same parameter, init and numerics) whose forward is
    `rms_norm`: fewer full-size passes forward and backward."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight if self.with_scale else None, self.eps)
