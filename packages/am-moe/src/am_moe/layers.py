"""`MoE` block (router + routed experts + shared experts) and the dense `MLP`.

`MoE.forward(x, padding_mask=None, cp_mesh=None)` returns a tensor of x's shape
and dtype:

    y = fc2(experts(fc1(x), gate(x))) + sigmoid(shared_expert_gate(x)) * shared_experts(x)

where fc1/fc2 are the optional latent projections (`moe_latent_size`) and the
shared-expert gate is optional. The gate's balance loss, when there is one, is
not returned: it is attached to the output so that `loss.backward()` also
backpropagates `aux_loss` (as if it were added to the loss once); its value is
kept in `last_aux_loss` for logging.

Models customise routing by replacing `gate` with their own module returning
(weights, indices, aux_loss); `gate_input=` lets the router see a different
tensor than the experts (Gemma 4 routes on the un-normalized residual). The EP
parallelizer finds blocks by `isinstance(m, MoE)` and touches only `experts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.dtensor import to_local
from am_moe.config import MoEConfig
from am_moe.experts import GroupedExperts
from am_moe.gate import FakeBalancedGate, Gate

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MLP", "MoE", "relu2"]


class _Relu2(torch.autograd.Function):
    """relu(x)^2 saving only r = relu(x); the gradient is 2 r g.

    Autograd through `square(relu(x))` runs pow's generic backward (pow(r, 1), two products)
    then relu's mask: measured ~3x slower on CPU than these two passes, for equal values.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU, relu(x)^2 (Nemotron-H's dense MLP and shared-expert activation)."""
    return _Relu2.apply(x)


# Dense MLP activations: name -> (has a gate_proj, fn(gate_or_None, up) -> hidden).
_MLP_ACTIVATIONS = {
    "swiglu": (True, lambda g, u: F.silu(g) * u),
    "geglu": (True, lambda g, u: F.gelu(g, approximate="tanh") * u),
    "relu2": (False, lambda g, u: relu2(u)),
}


class MLP(nn.Module):
    """Dense feed-forward layer: down(act(gate(x)) * up(x)) or down(relu(up(x))^2) for relu2.

    Parameters `gate_proj` (gated activations only), `up_proj`, `down_proj`.
    """

    def __init__(
        self,
        dim: int,
        inter_dim: int,
        backend: str = "torch",
        dtype: torch.dtype = torch.bfloat16,
        activation: str = "swiglu",
        bias: bool = False,
        cpu_gemm: str = "auto",
    ) -> None:
        super().__init__()
        if activation not in _MLP_ACTIVATIONS:
            raise ValueError(
                f"MLP activation={activation!r} is not supported; accepted: {list(_MLP_ACTIVATIONS)}"
            )
        gated, self._act = _MLP_ACTIVATIONS[activation]
        self.activation = activation

        def linear(n_in: int, n_out: int) -> nn.Module:
            return initialize_linear_module(
                backend, n_in, n_out, bias=bias, dtype=dtype, cpu_gemm=cpu_gemm
            )

        self.gate_proj = linear(dim, inter_dim) if gated else None
        self.up_proj = linear(dim, inter_dim)
        self.down_proj = linear(inter_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x) if self.gate_proj is not None else None
        return self.down_proj(self._act(gate, self.up_proj(x)))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Normal(0, init_std) weights, zero biases."""
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            if linear is not None:
                _init_linear(linear, init_std)


def _init_linear(linear: nn.Module, init_std: float) -> None:
    to_local(linear.weight).normal_(0.0, init_std)
    if getattr(linear, "bias", None) is not None:
        to_local(linear.bias).zero_()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on y whose backward also sends a gradient of 1 into aux_loss."""

    @staticmethod
    def forward(ctx, y: Tensor, aux_loss: Tensor) -> Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_aux = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_y.device)
        return grad_y, grad_aux


class MoE(nn.Module):
    """Mixture-of-experts block: `gate`, `experts`, optional `shared_experts`,
    `shared_expert_gate`, `fc1_latent_proj` / `fc2_latent_proj`."""

    def __init__(self, config: MoEConfig, backend: BackendConfig | None = None) -> None:
        super().__init__()
        backend = backend or BackendConfig()
        self.config = config
        self.backend = backend
        self.dim = config.dim
        self.n_routed_experts = config.n_routed_experts
        self.n_activated_experts = config.n_activated_experts
        if backend.fake_balanced_gate:
            self.gate = FakeBalancedGate(config, noise=backend.fake_gate_noise)
        else:
            self.gate = Gate(config, backend)
        self.experts = GroupedExperts(config, backend)
        self.shared_experts = None
        self.shared_expert_gate = None
        if config.n_shared_experts > 0:
            self.shared_experts = MLP(
                config.dim,
                config.shared_inter_dim,
                backend.linear,
                config.dtype,
                activation=config.shared_expert_activation,
                cpu_gemm=backend.cpu_gemm,
            )
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False, dtype=config.dtype)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if config.moe_latent_size is not None:
            latent = config.moe_latent_size
            self.fc1_latent_proj = initialize_linear_module(
                backend.linear, config.dim, latent, dtype=config.dtype, cpu_gemm=backend.cpu_gemm
            )
            self.fc2_latent_proj = initialize_linear_module(
                backend.linear, latent, config.dim, dtype=config.dtype, cpu_gemm=backend.cpu_gemm
            )
        self.last_aux_loss: Tensor | None = None

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        cp_mesh: DeviceMesh | None = None,
        *,
        gate_input: Tensor | None = None,
    ) -> Tensor:
        """x: [..., D]; padding_mask (True = padding) has x's leading shape. Returns x's shape.

        `gate_input` (same shape as x) is what the router sees, when it differs from x.
        """
        token_mask = None if padding_mask is None else ~padding_mask.to(torch.bool)
        weights, indices, aux_loss = self.gate(
            x if gate_input is None else gate_input, token_mask, cp_mesh
        )
        x_TD = x.reshape(-1, self.dim)
        mask_T = (
            torch.ones(x_TD.shape[0], dtype=torch.bool, device=x.device)
            if token_mask is None
            else token_mask.reshape(-1)
        )
        # weights.shape[-1], not -1: an empty batch (0 tokens) has no size to infer from.
        y_TD = self._routed_and_shared(
            x_TD, mask_T, weights.reshape(x_TD.shape[0], weights.shape[-1]), indices
        )
        if aux_loss is not None:
            self.last_aux_loss = aux_loss.detach()
            y_TD = _AttachAuxLoss.apply(y_TD, aux_loss)
        return y_TD.view(x.shape)

    def _routed_and_shared(
        self, x_TD: Tensor, mask_T: Tensor, weights_TK: Tensor, indices: Tensor
    ) -> Tensor:
        """Routed experts plus shared experts. With `dispatcher_async_dispatch` the shared
        experts run between the start and the end of the token dispatch, overlapping it."""
        indices_TK = indices.reshape(weights_TK.shape)
        h_TD = self.fc1_latent_proj(x_TD) if self.fc1_latent_proj is not None else x_TD
        z_TD = None
        if self.backend.dispatcher_async_dispatch and self.shared_experts is not None:
            y_TD, z_TD = self.experts(
                h_TD, mask_T, weights_TK, indices_TK, overlap=lambda: self._shared(x_TD)
            )
        else:
            y_TD = self.experts(h_TD, mask_T, weights_TK, indices_TK)
        if self.fc2_latent_proj is not None:
            y_TD = self.fc2_latent_proj(y_TD)
        if self.shared_experts is not None and z_TD is None:
            z_TD = self._shared(x_TD)
        return y_TD if z_TD is None else y_TD + z_TD

    def _shared(self, x_TD: Tensor) -> Tensor:
        z_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            z_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * z_TD
        return z_TD

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Normal(0, init_std) for every weight, zeros for biases and the correction bias."""
        self.gate.init_weights(buffer_device, init_std)
        self.experts.init_weights(buffer_device, init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(buffer_device, init_std)
        for linear in (self.shared_expert_gate, self.fc1_latent_proj, self.fc2_latent_proj):
            if linear is not None:
                _init_linear(linear, init_std)
