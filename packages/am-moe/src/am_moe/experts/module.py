"""`GroupedExperts`: the routed experts of one MoE block as an `nn.Module`.

Shape legend: T tokens, K top-k, E experts, L local experts (E without
expert parallelism), N routed rows grouped by expert (sum of counts_L),
R routed rows including padding (N when not padded), D expert input width,
F expert hidden width, F2 = 2F for gated activations (F for relu2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from am_dtype.cpu_gemm import resolve_cpu_gemm
from am_dtype.dtensor import to_local as _local
from am_moe.config import MoEConfig, is_gated
from am_moe.dispatch import LocalDispatcher
from am_moe.experts.activations import ACTIVATIONS
from am_moe.experts.autograd import _LocalMoE
from am_moe.experts.kernels import run_experts
from am_moe.experts.native import check_cpu_kernels, native_applies
from am_moe.experts.native import library as native_library
from am_moe.experts.rows import _routing_plan, resolve_layout

if TYPE_CHECKING:
    from am_dtype.backend import BackendConfig

__all__ = ["GroupedExperts"]


# Kernels with a fused gather -> experts -> weighted-sum path when no expert parallelism is on.
_FUSED_LOCAL_IMPLS = frozenset({"torch_mm"})


@dataclass
class _Started:
    """A started `GroupedExperts` call: the fused path's inputs or a pending dispatch."""

    fused_args: tuple | None = None
    pending: Any = None
    dtype: torch.dtype | None = None
    ready: bool = False  # `pending` is already dispatch's result (synchronous dispatch)


class GroupedExperts(nn.Module):
    """All routed experts of one MoE block, as stacked weights run by `run_experts`.

    `dispatcher` groups token rows by expert and combines the weighted outputs;
    it is a `LocalDispatcher` until the EP parallelizer shards the weights
    (DTensor Shard(0)) and installs an all-to-all dispatcher. With the plain
    `LocalDispatcher` and a grouped-mm kernel the same contract runs fused
    (`_LocalMoE`); any other dispatcher goes through dispatch/run_experts/combine.
    """

    # How the fused single-device path lays out routed rows on CPU (see CPU_LAYOUTS).
    cpu_layout: str = "auto"
    max_padding: float = 0.125
    # Fused CPU path: keep its large transient row buffers in a per-thread workspace shared
    # by all layers (see `_Workspace`) instead of allocating them on every call, and put the
    # large tensors that outlive a call (saved pre-activation, weight gradients, outputs) on
    # storage recycled once they are dead (`pool._TensorPool`; in the per-expert layout).
    reuse_cpu_buffers: bool = True
    # The activation of the "per_expert" layout (fp32 CPU, one thread): on the fused C
    # kernels of `native` ("auto": where they build; "native": an error where they do not)
    # or as ATen ops ("torch"). See `native.CPU_KERNEL_CHOICES`.
    cpu_kernels: str = "auto"

    def __init__(self, config: MoEConfig, backend: BackendConfig) -> None:
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.expert_activation = config.expert_activation
        self.activation_alpha = config.activation_alpha
        self.activation_limit = config.activation_limit
        self.impl = backend.experts
        # The fp32 CPU matmul of the "per_expert" layout (`BackendConfig.cpu_gemm`: "torch",
        # "onednn", or "auto", oneDNN where MKL lacks this CPU's AVX-512 kernels).
        self.cpu_gemm = backend.cpu_gemm
        self.expert_bias = config.expert_bias
        e, d, f = config.n_routed_experts, config.expert_dim, config.moe_inter_dim
        h = 2 * f if is_gated(config.expert_activation) else f
        self.gate_and_up_projs = nn.Parameter(torch.empty(e, d, h, dtype=config.dtype))
        self.down_projs = nn.Parameter(torch.empty(e, f, d, dtype=config.dtype))
        if config.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(e, h, dtype=config.dtype))
            self.down_proj_bias = nn.Parameter(torch.empty(e, d, dtype=config.dtype))
        else:
            self.gate_up_proj_bias = None
            self.down_proj_bias = None
        self.dispatcher = LocalDispatcher(e)

    def forward(
        self,
        x_TD: Tensor,
        token_mask_T: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        overlap: Callable[[], Any] | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """y_TD[t] = sum_k weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]); masked rows 0.

        With `overlap` (a callable), returns `(y_TD, overlap())`, `overlap` running after the
        dispatch has started and before it is waited for, so its work hides the dispatcher's
        communication where that is asynchronous (`MoE` passes the shared experts). Going
        through `forward` keeps FSDP's and checkpointing's module hooks in the call.
        """
        started = self._start(x_TD, token_mask_T, weights_TK, indices_TK, overlap is not None)
        side = overlap() if overlap is not None else None
        y_TD = self._finish(started)
        return y_TD if overlap is None else (y_TD, side)

    def _start(self, x_TD, token_mask_T, weights_TK, indices_TK, asynchronous: bool) -> _Started:
        if self.impl in _FUSED_LOCAL_IMPLS and type(self.dispatcher) is LocalDispatcher:
            return _Started(fused_args=(x_TD, token_mask_T, weights_TK, indices_TK))
        routing = (x_TD, weights_TK, indices_TK, token_mask_T)
        if asynchronous:
            return _Started(pending=self.dispatcher.dispatch_start(*routing), dtype=x_TD.dtype)
        return _Started(pending=self.dispatcher.dispatch(*routing), dtype=x_TD.dtype, ready=True)

    def _finish(self, started: _Started) -> Tensor:
        weights = [
            _local(p)
            for p in (
                self.gate_and_up_projs,
                self.down_projs,
                self.gate_up_proj_bias,
                self.down_proj_bias,
            )
        ]
        if started.fused_args is not None:
            return self._local_fused(*started.fused_args, weights)
        pending = started.pending
        x_ND, counts_L, ctx = pending if started.ready else self.dispatcher.dispatch_finish(pending)
        y_ND = run_experts(
            x_ND,
            counts_L,
            weights[0],
            weights[1],
            self.expert_activation,
            self.impl,
            weights[2],
            weights[3],
            alpha=self.activation_alpha,
            limit=self.activation_limit,
        )
        return self.dispatcher.combine(y_ND, ctx).to(started.dtype)

    def _local_fused(self, x_TD, token_mask_T, weights_TK, indices_TK, weights) -> Tensor:
        if token_mask_T is None:
            token_mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
        layout = resolve_layout(self.cpu_layout, weights[0].dtype)
        check_cpu_kernels(self.cpu_kernels)
        matmul = "torch"
        if x_TD.device.type == "cpu":
            matmul = resolve_cpu_gemm(self.cpu_gemm, weights[0].dtype)
        native = None
        if layout == "per_expert" and native_applies(
            self.cpu_kernels, self.expert_activation, weights[0].dtype, x_TD.device
        ):
            native = native_library()
        plan = _routing_plan(
            indices_TK, token_mask_T, self.n_routed_experts, layout, self.max_padding, matmul,
            native,
        )  # fmt: skip
        act = partial(
            ACTIVATIONS[self.expert_activation],
            alpha=self.activation_alpha,
            limit=self.activation_limit,
        )
        x_TD = x_TD.to(weights[0].dtype)
        reuse = self.reuse_cpu_buffers and x_TD.device.type == "cpu"
        out = _LocalMoE.apply(x_TD, weights_TK, *weights, plan, act, self.expert_activation, reuse)
        return out

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """Normal(0, init_std) weights, zero biases (on the local shard under EP)."""
        _local(self.gate_and_up_projs).normal_(0.0, init_std)
        _local(self.down_projs).normal_(0.0, init_std)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                _local(bias).zero_()
