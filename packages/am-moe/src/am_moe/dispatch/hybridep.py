"""`HybridEPDispatcher` ("hybridep"): DeepEP's hybrid-EP kernels, `deep_ep.HybridEPBuffer`.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from am_moe.dispatch.base import _check_routing, _masked_routing
from am_moe.dispatch.deepep import DEEP_EP_INSTALL
from am_moe.dispatch.grouping import _group_by_expert, _ungroup
from am_moe.dispatch.kernel_library import _KernelCtx, _KernelLibraryDispatcher, _LibraryCall

__all__ = ["HybridEPDispatcher"]


class _HybridDispatch(torch.autograd.Function):
    """`HybridEPBuffer.dispatch` of tokens with a dense routing map and float32 probs.

    Backward is `HybridEPBuffer.combine` of the gradients, which also sums the probs'
    gradients over ranks into [T, E].
    """

    @staticmethod
    def forward(ctx, call, num_experts, routing_TE, x_TD, probs_TE):
        recv_x, recv_probs, _, handle = call.buffer.dispatch(
            hidden=x_TD, routing_map=routing_TE, probs=probs_TE, num_of_experts=num_experts
        )
        call.handle, ctx.call = handle, call
        return recv_x, recv_probs

    @staticmethod
    def backward(ctx, grad_x, grad_probs):
        want_p = ctx.needs_input_grad[4]
        probs = grad_probs.to(torch.float32).contiguous() if want_p else None
        call = ctx.call
        gx, gp = call.buffer.combine(hidden=grad_x.contiguous(), probs=probs, handle=call.handle)
        return None, None, None, gx, gp if want_p else None


class _HybridCombine(torch.autograd.Function):
    """`HybridEPBuffer.combine`, summing a token's rows over ranks.

    Backward is the cached `HybridEPBuffer.dispatch` of the gradient with the same handle.
    """

    @staticmethod
    def forward(ctx, call, num_experts, y_VD):
        ctx.call, ctx.num_experts = call, num_experts
        out_TD, _ = call.buffer.combine(hidden=y_VD, handle=call.handle)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        call = ctx.call
        grad_VD = call.buffer.dispatch(
            hidden=grad_TD.contiguous(), handle=call.handle, num_of_experts=ctx.num_experts
        )[0]
        return None, None, grad_VD


class HybridEPDispatcher(_KernelLibraryDispatcher):
    """DeepEP's hybrid-EP kernels ("hybridep"): `deep_ep.HybridEPBuffer`.

    dispatch: the top-k routing becomes a dense [T, E] bool routing map and float32 probs
    (masked tokens route nowhere); `HybridEPBuffer.dispatch` all-gathers the routing map,
    which needs the same token count on every rank, so tokens are padded to the EP group's
    maximum with unrouted rows. Each rank receives every token routed to one of its experts
    once, with the probs of its NVLink domain's experts; the handle's local-expert routing
    map says which local experts each received row goes to. combine: as for DeepEP, one
    weighted row per (token, rank) goes back through `HybridEPBuffer.combine`.
    """

    package, backend_name, install_hint = "deep_ep", "hybridep", DEEP_EP_INSTALL
    module, buffer_class = "deep_ep", "HybridEPBuffer"
    buffer_methods = ("dispatch", "combine")

    def _buffer(self, hidden_dim: int, num_tokens: int) -> Any:
        # The buffer regrows itself for more tokens or a wider hidden dim; the local expert
        # count is fixed at construction.
        key = (self.num_local_experts,)
        buffer = self._cached_buffer(key)
        if buffer is None:
            buffer = self.buffer_cls(
                group=self.ep_group,
                hidden_dim=hidden_dim,
                max_num_of_tokens_per_rank=num_tokens,
                num_local_experts=self.num_local_experts,
                num_sms_dispatch_api=self.num_sms,
                num_sms_combine_api=self.num_sms,
                num_of_ranks_per_nvlink_domain=_nvlink_domain_size(self.ep_size),
            )
            self._store_buffer(key, buffer)
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
        t, k = indices_TK.shape
        e, L = self.num_experts, self.num_local_experts
        t_max = torch.tensor([t], device=x_TD.device)
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=self.ep_group)
        pad = int(t_max) - t
        chosen_TK = indices_TK >= 0
        slot_TK = indices_TK.clamp(min=0).to(torch.int64)
        hits_TE = torch.zeros(t, e, dtype=torch.int32, device=x_TD.device)
        routing_TE = hits_TE.scatter_add(1, slot_TK, chosen_TK.to(torch.int32)) > 0
        w_TK = torch.where(chosen_TK, weights_TK.to(torch.float32), 0.0)
        probs_TE = w_TK.new_zeros(t, e).scatter_add(1, slot_TK, w_TK)
        wire_TD = self._to_wire(x_TD)
        if pad:
            routing_TE = torch.cat([routing_TE, routing_TE.new_zeros(pad, e)])
            probs_TE = torch.cat([probs_TE, probs_TE.new_zeros(pad, e)])
            wire_TD = torch.cat([wire_TD, wire_TD.new_zeros(pad, wire_TD.shape[-1])])
        call = _LibraryCall(self._buffer(x_TD.shape[-1], t + pad))
        recv_x, recv_probs = _HybridDispatch.apply(call, e, routing_TE, wire_TD, probs_TE)

        # Up to min(K, L) chosen local experts per received row, in expert order.
        v = recv_x.shape[0]
        local_VL = call.handle[4][:v].to(torch.bool)
        order_VJ = torch.sort(local_VL.to(torch.uint8), dim=1, descending=True, stable=True)
        order_VJ = order_VJ.indices[:, : min(k, L)]
        expert_VJ = torch.where(local_VL.gather(1, order_VJ), order_VJ, -1)
        # Probs columns are the experts of this rank's NVLink domain (every expert when the
        # group fits in one domain); this rank's L experts start at local_rank * L.
        start = call.buffer.local_rank * L if recv_probs.shape[-1] > L else 0
        w_VJ = recv_probs[:, start : start + L].gather(1, order_VJ)
        x_ND, counts_L, group_ctx = _group_by_expert(
            recv_x.to(x_TD.dtype), expert_VJ, w_VJ.to(weights_TK.dtype), L
        )
        return x_ND, counts_L, _KernelCtx(group_ctx, call, t)

    def combine(self, y_ND: Tensor, ctx: _KernelCtx) -> Tensor:
        y_VD = _ungroup(y_ND, ctx.group_ctx)
        out_TD = _HybridCombine.apply(ctx.call, self.num_experts, self._to_wire(y_VD))
        return out_TD[: ctx.num_tokens].to(y_ND.dtype)


def _nvlink_domain_size(ep_size: int) -> int | None:
    """Ranks per NVLink domain for HybridEP.

    None when NUM_OF_RANKS_PER_NVLINK_DOMAIN is set (the library reads it); else the greatest
    common divisor of the EP size and the GPUs per node (LOCAL_WORLD_SIZE, else 8), since
    the library's default of 8 rejects EP groups smaller than 8.
    """
    if os.environ.get("NUM_OF_RANKS_PER_NVLINK_DOMAIN"):
        return None
    return math.gcd(ep_size, int(os.environ.get("LOCAL_WORLD_SIZE") or 8))
