"""RMSNorm that stores its weight in the model dtype and computes in fp32.

In bf16 the mean of squares loses most of its mantissa over a wide hidden
dimension, and the normalized activations feed every layer, so the norm is
computed in fp32 and only the result is cast back. The weight stays in the
model dtype so FSDP2 sees one dtype per parameter group.

The forward goes through `torch.compile` (one fused kernel instead of five
elementwise passes). Compilation happens lazily on the first call; if it
fails (no compiler, unsupported platform) a single warning is logged and the
eager path is used from then on. `Float32RMSNorm.compile_forward` (class or
instance) decides: True always compiles, False never does, None (the default)
compiles for accelerator inputs only -- on CPU the first compile costs 10-20 s
for little gain. The default comes from `AM_DTYPE_COMPILE_RMSNORM`
("1"/"0"/"auto").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_SWITCH = {
    "1": True, "true": True, "yes": True, "on": True,
    "0": False, "false": False, "no": False, "off": False,
    "auto": None, "": None,
}  # fmt: skip


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Eager reference: normalize `x` over its last dim in fp32, scale, return in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.float()
    return normed.to(x.dtype)


class _RMSNormFP32(torch.autograd.Function):
    """`_rms_norm_fp32` as one autograd node.

    It saves only the input and the per-row `rstd = rsqrt(mean(x^2) + eps)` (no fp32 copy of
    the normalized activations) and computes the gradients in about six passes over the
    activations, two of them matrix-vector products, where autograd's generic chain (pow,
    mean, rsqrt, two products) runs about a dozen. With h = g * x and D the row length:

        dw = h^T @ rstd                       (the sum over rows of g * x_hat)
        dx = (g * w) * rstd - x * rstd^3 * (h @ w) / D
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True).add_(eps))
        y = x32 * rstd
        if weight is not None:
            y.mul_(weight.float())
        ctx.save_for_backward(x, rstd, weight)
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        dim = x.shape[-1]
        x32 = x.float().reshape(-1, dim)
        g = grad.float().reshape(-1, dim)
        r = rstd.reshape(-1)
        h = g * x32
        grad_w = None
        if weight is not None:
            w = weight.float()
            if ctx.needs_input_grad[1]:
                grad_w = (h.t() @ r).to(weight.dtype)
            proj = h @ w
        else:
            proj = h.sum(-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            scaled = (g * w).mul_(r.unsqueeze(-1)) if weight is not None else g * r.unsqueeze(-1)
            c = (r * r * r * proj).div_(dim).unsqueeze(-1)
            grad_x = scaled.addcmul_(x32, c, value=-1.0).reshape(x.shape).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of `x` over its last dim computed in fp32, optionally scaled by `weight`
    (None: no scale), returned in x's dtype.

    The one eager RMSNorm of the workspace (models whose norm module is their own, such as
    Gemma 4's, call it too): when a gradient is needed it is one autograd node with a
    hand-written backward (`_RMSNormFP32`), otherwise the plain ops. DTensor inputs
    (tensor-parallel norms) keep the plain ops, whose sharding rules DTensor knows.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
    )
    if not needs_grad or _is_dtensor(x) or (weight is not None and _is_dtensor(weight)):
        return _rms_norm_fp32(x, weight, eps)
    return _RMSNormFP32.apply(x, weight, eps)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _LazyCompiled:
    """`torch.compile` of a function on first call, with a one-time fallback to eager."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *args: torch.Tensor | float) -> torch.Tensor:
        # Inside an outer torch.compile the eager body is traced and fused there anyway.
        if self.failed or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=None)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            out = self.fn(*args)  # a genuine input error raises here, compiled path kept
            self.failed = True
            logger.warning(
                "torch.compile of the fp32 RMSNorm failed (%s: %s); using the eager path",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return out


_compiled_rms_norm = _LazyCompiled(_rms_norm_fp32)


def _float32_rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Compiled fp32 RMSNorm forward -- a standalone function to keep dynamo guards few.

    Compiles on first call; falls back to eager (with one warning) if compilation fails.
    """
    return _compiled_rms_norm(x, weight, eps)


def _compile_default() -> bool | None:
    raw = os.environ.get("AM_DTYPE_COMPILE_RMSNORM", "auto")
    key = raw.strip().lower()
    if key not in _SWITCH:
        raise ValueError(
            f"AM_DTYPE_COMPILE_RMSNORM={raw!r} is not understood; accepted: {sorted(_SWITCH)}"
        )
    return _SWITCH[key]


class Float32RMSNorm(nn.Module):
    """RMSNorm with explicit fp32 computation for training stability.

    The weight stays in `dtype` (e.g. bf16) for FSDP2 compatibility; the input
    is upcast to fp32, normalized and scaled in fp32, and the output is cast
    back to the input's dtype.
    """

    compile_forward: bool | None = _compile_default()

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Float32RMSNorm dim={dim!r} must be a positive int")
        if not eps > 0:
            raise ValueError(f"Float32RMSNorm eps={eps!r} must be > 0")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale to ones (the identity scale)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"Float32RMSNorm expects the last dim to be {self.dim}, got input shape "
                f"{tuple(x.shape)}"
            )
        if self._use_compiled(x):
            return _float32_rms_norm_fwd(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def _use_compiled(self, x: torch.Tensor) -> bool:
        if x.is_meta or self.compile_forward is False:
            return False
        return self.compile_forward is True or x.device.type != "cpu"

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, dtype={self.weight.dtype}"
