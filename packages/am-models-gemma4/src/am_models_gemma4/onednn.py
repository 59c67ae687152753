"""fp32 CPU linear layers on oneDNN's GEMM: `onednn_linear` and `OneDNNLinear`.

On CPU, torch's fp32 `mm` / `addmm` (and so `F.linear`, forward and backward) call MKL's
sgemm. On CPUs MKL does not tune for (the AMD EPYC this workspace is benchmarked on runs
MKL's sgemm at ~85 GFLOP/s on one thread) oneDNN's fp32 inner product runs at about twice
that rate at every shape of the Gemma 4 MoE step (~130-210 GFLOP/s), with the same fp32
accumulation: results differ from MKL's by fp32 summation order only. torch exposes that
GEMM as `torch.ops.mkldnn._linear_pointwise` (dense tensors, any strides) without a
backward; `onednn_linear` adds the three-GEMM backward (dX = dY W, dW = dY^T X, db = sum dY)
on the same kernel.

It runs where it applies, and `F.linear` everywhere else: CPU, fp32 input and weight,
plain tensors (not DTensor), no CPU autocast, not under torch.compile tracing, and a torch
built with oneDNN. So CUDA, bf16 and parallel (DTensor) layers are unchanged.

Shape legend: T rows (all leading dims), K in features, N out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OneDNNLinear", "onednn_available", "onednn_linear"]


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = onednn_available()


def _gemm(x_TK: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """x @ w.T (+ b) on oneDNN (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x_TK, w_NK, b_N, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _gemm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        g_TN = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(g_TN, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(g_TN.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_TN.sum(0)
        return grad_x, grad_w, grad_b


# Plain tensors only: DTensor, fake and functional tensors take `F.linear`.
_PLAIN = (Tensor, nn.Parameter)


def _applies(x: Tensor, weight: Tensor) -> bool:
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN's GEMM where it applies (see the module
    docstring), forward and backward; `F.linear` otherwise."""
    if not _applies(x, weight) or (bias is not None and type(bias) not in _PLAIN):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, init and state dict) computing with `onednn_linear`."""

    def forward(self, input: Tensor) -> Tensor:
        return onednn_linear(input, self.weight, self.bias)

    @classmethod
    def from_linear(cls, old: nn.Linear) -> OneDNNLinear:
        """An `OneDNNLinear` holding `old`'s parameters (the same tensors, so ties hold)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = old.in_features, old.out_features
        new.weight = old.weight
        new.bias = old.bias
        return new
