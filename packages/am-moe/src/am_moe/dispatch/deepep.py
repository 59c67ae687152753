"""`DeepEPDispatcher` ("deepep"): DeepEP's normal-mode `deep_ep.Buffer`.

`_DeepEPStyleDispatcher` drives any DeepEP-compatible `Buffer` (UCCL-EP reuses it).

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from am_moe.dispatch.base import _check_routing, _masked_routing
from am_moe.dispatch.grouping import _group_by_expert, _ungroup
from am_moe.dispatch.kernel_library import _KernelCtx, _KernelLibraryDispatcher, _LibraryCall

__all__ = ["DeepEPDispatcher"]

# DeepEP has no wheel: it is built against the local CUDA toolkit and NVSHMEM.
DEEP_EP_INSTALL = (
    "build DeepEP from source (https://github.com/deepseek-ai/DeepEP; needs CUDA and NVSHMEM)"
)


class _BufferDispatch(torch.autograd.Function):
    """DeepEP-style `Buffer.dispatch`; backward is `Buffer.combine` of the gradients.

    Returns the received rows, their local top-k expert ids (-1: expert on another rank) and
    weights (0 there). The combine in backward sums each token's gradient rows over the ranks
    it went to, and with `topk_weights` also its weight gradients.
    """

    @staticmethod
    def forward(ctx, call, num_experts, topk_idx, x_TD, w_TK):
        buffer = call.buffer
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(
            topk_idx, num_experts
        )
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            x_TD,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=w_TK,
        )
        call.handle, ctx.call = handle, call
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_w):
        want_w = ctx.needs_input_grad[4]
        w = grad_w.to(torch.float32).contiguous() if want_w else None
        call = ctx.call
        gx, gw, _ = call.buffer.combine(grad_x.contiguous(), call.handle, topk_weights=w)
        return None, None, None, gx, gw if want_w else None


class _BufferCombine(torch.autograd.Function):
    """DeepEP-style `Buffer.combine`, summing a token's rows over ranks.

    Backward is the cached `Buffer.dispatch` of the gradient with the same handle.
    """

    @staticmethod
    def forward(ctx, call, y_VD):
        ctx.call = call
        out_TD, _, _ = call.buffer.combine(y_VD, call.handle)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        call = ctx.call
        grad_VD = call.buffer.dispatch(grad_TD.contiguous(), handle=call.handle)[0]
        return None, grad_VD


class _DeepEPStyleDispatcher(_KernelLibraryDispatcher):
    """Drives a DeepEP-compatible normal-mode `Buffer` (DeepEP itself, UCCL-EP).

    dispatch: `get_dispatch_layout` then `Buffer.dispatch` with int64 `topk_idx` (-1 for
    masked tokens: not routed) and float32 `topk_weights`; each rank receives every token
    routed to one of its experts once, with local expert ids, and groups the rows by expert
    (`_group_by_expert`). combine: the rows of a received token are weighted and summed on
    the expert rank (`_ungroup`), and `Buffer.combine(x, handle)` sends one row per
    (token, rank) back and sums them.
    """

    buffer_methods = (
        "get_dispatch_config",
        "get_combine_config",
        "get_dispatch_layout",
        "dispatch",
        "combine",
        "set_num_sms",
    )

    def __init__(self, num_experts, ep_group, *, backend=None, comm_dtype=torch.bfloat16) -> None:
        super().__init__(num_experts, ep_group, backend=backend, comm_dtype=comm_dtype)
        if self.num_sms % 2:
            raise ValueError(
                f"BackendConfig.dispatcher_num_sms={self.num_sms} must be even for "
                f"dispatcher={self.backend_name!r} (each channel uses a pair of SMs)"
            )
        self.buffer_cls.set_num_sms(self.num_sms)
        self.idx_dtype = getattr(self.library, "topk_idx_t", torch.int64)

    def _buffer(self, hidden_bytes: int) -> Any:
        """A buffer sized by the library's hints for the dispatch and combine configs."""
        cls, p = self.buffer_cls, self.ep_size
        nvl_bytes = rdma_bytes = 0
        for config in (cls.get_dispatch_config(p), cls.get_combine_config(p)):
            nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, p))
            rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, p))
        buffer = self._cached_buffer(())
        if buffer is None or buffer.num_nvl_bytes < nvl_bytes or buffer.num_rdma_bytes < rdma_bytes:
            buffer = self._store_buffer((), cls(self.ep_group, nvl_bytes, rdma_bytes))
        return buffer

    def dispatch(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, _KernelCtx]:
        _check_routing(x_TD, weights_TK, indices_TK, self.num_experts)
        weights_TK, indices_TK = _masked_routing(weights_TK, indices_TK, token_mask_T)
        wire_TD = self._to_wire(x_TD)
        call = _LibraryCall(self._buffer(wire_TD.shape[-1] * max(wire_TD.element_size(), 2)))
        recv_x, recv_idx, recv_w = _BufferDispatch.apply(
            call,
            self.num_experts,
            indices_TK.to(self.idx_dtype).contiguous(),
            wire_TD,
            weights_TK.to(torch.float32).contiguous(),
        )
        x_ND, counts_L, group_ctx = _group_by_expert(
            recv_x.to(x_TD.dtype),
            recv_idx.to(torch.int64),
            recv_w.to(weights_TK.dtype),
            self.num_local_experts,
        )
        return x_ND, counts_L, _KernelCtx(group_ctx, call, x_TD.shape[0])

    def combine(self, y_ND: Tensor, ctx: _KernelCtx) -> Tensor:
        y_VD = _ungroup(y_ND, ctx.group_ctx)
        return _BufferCombine.apply(ctx.call, self._to_wire(y_VD)).to(y_ND.dtype)


class DeepEPDispatcher(_DeepEPStyleDispatcher):
    """DeepEP normal-mode (intranode/internode) kernels ("deepep"): `deep_ep.Buffer`."""

    package, backend_name, install_hint = "deep_ep", "deepep", DEEP_EP_INSTALL
    module, buffer_class = "deep_ep", "Buffer"
