"""Expert activations by name, and their gradients for the custom autograd paths.

`ACTIVATIONS[name](h_NF2, alpha, limit) -> a_NF` maps the first projection's output (gate
half [:F], up half [F:] for gated activations) to the activation the second projection
reads. The backward passes recompute the activation from h_NF2; `_activation_with_grad`
returns it together with a function from grad_a to grad_h (closed forms where we have
them), and the `*_into` variants write into workspace buffers (see `rows._Workspace`).

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from am_moe.experts.rows import _Scratch

__all__ = ["ACTIVATIONS", "apply_activation"]


def _halves(h_NF2: Tensor) -> tuple[Tensor, Tensor]:
    f = h_NF2.shape[-1] // 2
    return h_NF2[..., :f], h_NF2[..., f:]


def _swiglu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = _halves(h_NF2)
    return F.silu(gate) * up


def _geglu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    # Gemma's `gelu_pytorch_tanh`.
    gate, up = _halves(h_NF2)
    return F.gelu(gate, approximate="tanh") * up


def _clamped_glu(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    # GPT-OSS: gate clamped above, up clamped both ways, and a +1 on the up branch.
    gate, up = _halves(h_NF2)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _relu2(h_NF2: Tensor, alpha: float, limit: float) -> Tensor:
    return torch.square(F.relu(h_NF2))


# "quick_geglu" (the reference's name) and "swigluoai" (GPT-OSS's) are the same clamped
# function of (gate, up); the reference's quick_geglu read gate/up from interleaved columns,
# here every gated activation reads the gate half [:F] and the up half [F:].
ACTIVATIONS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "swiglu": _swiglu,
    "geglu": _geglu,
    "quick_geglu": _clamped_glu,
    "swigluoai": _clamped_glu,
    "relu2": _relu2,
}


def apply_activation(
    h_NF2: Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0
) -> Tensor:
    """Expert activation by name on the first projection's output (gate half first)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; accepted: {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation](h_NF2, alpha, limit)


# Activation and a function from grad_a to grad_h sharing its intermediates (used in
# backward, after recomputing the activation). The grad function may overwrite grad_a.
ActivationWithGrad = Callable[[Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]


def _relu2_with_grad(h_NF: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    r_NF = F.relu(h_NF)
    return r_NF * r_NF, lambda grad_a: grad_a.mul_(r_NF).mul_(2)


def _swiglu_with_grad(h_NF2: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    gate, up = _halves(h_NF2)
    sig = torch.sigmoid(gate)
    silu = gate * sig

    def grad(grad_a: Tensor) -> Tensor:
        grad_h = torch.empty_like(h_NF2)
        f = gate.shape[-1]
        torch.mul(grad_a, silu, out=grad_h[:, f:])
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dsilu = (1 - sig).mul_(gate).add_(1).mul_(sig)
        torch.mul(grad_a.mul_(up), dsilu, out=grad_h[:, :f])
        return grad_h

    return silu * up, grad


def _geglu_grad_into(grad_a: Tensor, gate: Tensor, up: Tensor, gl: Tensor, grad_h: Tensor):
    """grad_h = d(gelu_tanh(gate) * up)/d(gate, up) . grad_a, by the ops (and in the order)
    autograd runs for the plain expression, so the result is bit-identical to it."""
    f = gate.shape[-1]
    torch.mul(grad_a, gl, out=grad_h[:, f:])
    torch.ops.aten.gelu_backward.grad_input(
        grad_a.mul_(up), gate, approximate="tanh", grad_input=grad_h[:, :f]
    )
    return grad_h


def _geglu_with_grad(h_NF2: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    gate, up = _halves(h_NF2)
    gl = F.gelu(gate, approximate="tanh")
    return gl * up, lambda grad_a: _geglu_grad_into(grad_a, gate, up, gl, torch.empty_like(h_NF2))


_ACTIVATIONS_WITH_GRAD: dict[str, ActivationWithGrad] = {
    "relu2": _relu2_with_grad,
    "swiglu": _swiglu_with_grad,
    "geglu": _geglu_with_grad,
}


def _activation_with_grad(act: Callable[[Tensor], Tensor], name: str) -> ActivationWithGrad:
    """Closed form where we have one; otherwise differentiate a recompute of `act`."""
    if name in _ACTIVATIONS_WITH_GRAD:
        return _ACTIVATIONS_WITH_GRAD[name]

    def generic(h_NF2: Tensor):
        with torch.enable_grad():
            h = h_NF2.detach().requires_grad_(True)
            a = act(h)

        def grad(grad_a: Tensor) -> Tensor:
            (grad_h,) = torch.autograd.grad(a, h, grad_a)
            return grad_h

        return a.detach(), grad

    return generic


# Workspace variants for the fused path (see `rows._Workspace`): the activation a_RF and the
# backward's intermediates live in reused buffers instead of fresh R x F tensors.


def _relu2_into(h_RF: Tensor, ws: _Scratch) -> Tensor:
    out_RF = ws.get("a", h_RF.shape, h_RF)
    torch.clamp_min(h_RF, 0, out=out_RF)
    return out_RF.mul_(out_RF)


# gelu_tanh(g) = 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3), is exactly
# g * sigmoid(2u) (tanh(u) = 2 sigmoid(2u) - 1). On CPU the sigmoid form is the faster one:
# ATen's tanh-GeLU (and its backward) evaluate tanh, 4x slower than sigmoid at one fp32
# thread (512 x 512 block: gelu 1.1 ms, gelu_backward 1.3 ms, sigmoid 0.27 ms, a mul 0.05 ms).
# The workspace kernels below take one sigmoid per direction and cheap in-place passes: the
# forward 5 passes, the recomputed backward 13, where ATen's ops took gelu + gelu_backward
# (three tanh evaluations per step). Results differ from ATen's by rounding only (a few ulp).
# bf16/fp16 keep ATen's kernels: they compute in fp32 internally, and a chain of
# half-precision passes would round at every step.
_GELU_C2 = 2.0 * math.sqrt(2.0 / math.pi)  # 2 sqrt(2/pi)
_GELU_K = 0.044715


def _sigmoid_form(h_RF2: Tensor) -> bool:
    return h_RF2.dtype in (torch.float32, torch.float64)


def _gelu_sigmoid_into(gate: Tensor, s: Tensor) -> Tensor:
    """s = sigmoid(2u) = sigmoid(gate * (2c + 2ck gate^2)), so gelu_tanh(gate) = gate * s."""
    torch.addcmul(gate.new_tensor(_GELU_C2), gate, gate, value=_GELU_C2 * _GELU_K, out=s)
    return s.mul_(gate).sigmoid_()


def _geglu_into(h_RF2: Tensor, ws: _Scratch) -> Tensor:
    gate, up = _halves(h_RF2)
    out_RF = ws.get("a", gate.shape, h_RF2)
    if _sigmoid_form(h_RF2):
        s_RF = _gelu_sigmoid_into(gate, ws.get("s", gate.shape, h_RF2))
        return torch.mul(gate, s_RF, out=out_RF).mul_(up)
    torch.ops.aten.gelu.out(gate, approximate="tanh", out=out_RF)
    return out_RF.mul_(up)


def _geglu_sigmoid_grad_into(grad_a, gate, up, s, gl, grad_h, t):
    """grad_h from s = sigmoid(2u) and gl = gate * s: d gelu_tanh / d gate
    = s + gl (1 - s) (2c + 6ck gate^2) (from 1 - tanh(u)^2 = 4 s (1 - s)). t is scratch."""
    f = gate.shape[-1]
    torch.mul(grad_a, gl, out=grad_h[:, f:])
    grad_a.mul_(up)
    torch.addcmul(gate.new_tensor(_GELU_C2), gate, gate, value=3 * _GELU_C2 * _GELU_K, out=t)
    t.mul_(gl)
    t.addcmul_(t, s, value=-1).add_(s)  # t (1 - s) + s
    torch.mul(grad_a, t, out=grad_h[:, :f])
    return grad_h


def _relu2_with_grad_into(h_RF: Tensor, ws: _Scratch):
    r_RF = torch.clamp_min(h_RF, 0, out=ws.get("r", h_RF.shape, h_RF))
    a_RF = torch.mul(r_RF, r_RF, out=ws.get("a", h_RF.shape, h_RF))
    return a_RF, lambda grad_a: grad_a.mul_(r_RF).mul_(2)


def _geglu_with_grad_into(h_RF2: Tensor, ws: _Scratch):
    gate, up = _halves(h_RF2)
    grad_h = ws.get("grad_h", h_RF2.shape, h_RF2)
    if _sigmoid_form(h_RF2):
        s_RF = _gelu_sigmoid_into(gate, ws.get("s", gate.shape, h_RF2))
        gl_RF = torch.mul(gate, s_RF, out=ws.get("r", gate.shape, h_RF2))
        a_RF = torch.mul(gl_RF, up, out=ws.get("a", gate.shape, h_RF2))
        t_RF = ws.get("t", gate.shape, h_RF2)
        return a_RF, lambda grad_a: _geglu_sigmoid_grad_into(
            grad_a, gate, up, s_RF, gl_RF, grad_h, t_RF
        )
    gl_RF = torch.ops.aten.gelu.out(gate, approximate="tanh", out=ws.get("r", gate.shape, h_RF2))
    a_RF = torch.mul(gl_RF, up, out=ws.get("a", gate.shape, h_RF2))
    return a_RF, lambda grad_a: _geglu_grad_into(grad_a, gate, up, gl_RF, grad_h)


# name -> (forward into the workspace, forward + gradient into the workspace).
_INTO_WORKSPACE = {
    "relu2": (_relu2_into, _relu2_with_grad_into),
    "geglu": (_geglu_into, _geglu_with_grad_into),
}
