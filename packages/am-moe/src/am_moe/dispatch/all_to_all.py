"""`AllToAllDispatcher` ("torch"): expert parallelism over `torch.distributed` all-to-all.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from am_moe.dispatch.base import DispatchStats, TokenDispatcher, _check_routing, _masked_routing
from am_moe.dispatch.grouping import _group_by_expert, _GroupCtx, _ungroup

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from am_dtype.backend import BackendConfig

__all__ = ["AllToAllDispatcher"]


class _Exchange(torch.autograd.Function):
    """`all_to_all_single` of several row-aligned tensors; backward is the reverse exchange.

    One autograd node for all of them, so every rank runs the backward collectives in the
    same order: gloo matches collectives by order, and two separate nodes that become ready
    together could be run in different orders on different ranks.
    """

    @staticmethod
    def forward(ctx, out_splits: list[int], in_splits: list[int], group, *tensors: Tensor):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return tuple(_all_to_all(t, out_splits, in_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        out_splits, in_splits = ctx.splits
        back = tuple(_all_to_all(g, in_splits, out_splits, ctx.group) for g in grads)
        return (None, None, None, *back)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _InFlight:
    """The collective handles of an asynchronous exchange, waited for by `_ExchangeWait`."""

    __slots__ = ("works",)

    def __init__(self) -> None:
        self.works: list = []

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


def _all_to_all_async(x: Tensor, out_splits, in_splits, group, flight: _InFlight) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(
        out, x.contiguous(), out_splits, in_splits, group=group, async_op=True
    )
    flight.works.append(work)
    return out


class _ExchangeStart(torch.autograd.Function):
    """`_Exchange` issued with async_op: the outputs are filled once `flight` is waited for.

    Backward is the same synchronous reverse exchange as `_Exchange`'s.
    """

    @staticmethod
    def forward(ctx, flight: _InFlight, out_splits, in_splits, group, *tensors: Tensor):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return tuple(_all_to_all_async(t, out_splits, in_splits, group, flight) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        out_splits, in_splits = ctx.splits
        back = tuple(_all_to_all(g, in_splits, out_splits, ctx.group) for g in grads)
        return (None, None, None, None, *back)


class _ExchangeWait(torch.autograd.Function):
    """Wait for an `_ExchangeStart`; identity on its outputs (and on their gradients)."""

    @staticmethod
    def forward(ctx, flight: _InFlight, *tensors: Tensor):
        flight.wait()
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, *grads)


@dataclass
class _PendingDispatch:
    flight: _InFlight
    local_VK: Tensor
    x_VD: Tensor
    w_VK: Tensor
    ctx_args: tuple


@dataclass
class _AllToAllCtx:
    group_ctx: _GroupCtx
    send_tok_S: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


class AllToAllDispatcher(TokenDispatcher):
    """Expert parallelism over `torch.distributed` all-to-all ("torch" backend).

    Rank r of the EP group owns global experts [r*L, (r+1)*L). A token goes once to each rank
    owning at least one of its chosen experts, with its local expert ids (int64) and its K
    routing weights; the receiver groups the rows by local expert. `combine` weights and sums
    the expert rows on the receiving rank and sends one row per (token, rank) back, which the
    source rank adds up. Every collective is autograd-aware, so gradients reach `x_TD` and
    `weights_TK` on the token's own rank. `stats` counts the bytes sent to other ranks.
    """

    def __init__(
        self, num_experts: int, ep_group: ProcessGroup, *, backend: BackendConfig | None = None
    ) -> None:
        del backend  # accepted for a uniform constructor; the torch path has no knobs
        ep_size = dist.get_world_size(ep_group)
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.ep_group, self.ep_size = ep_group, ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.stats = DispatchStats()

    def dispatch(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, _AllToAllCtx]:
        return self._route(x_TD, weights_TK, indices_TK, token_mask_T, asynchronous=False)

    def dispatch_start(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> _PendingDispatch:
        """Exchange the counts, then issue the id and token all-to-alls with async_op."""
        return self._route(x_TD, weights_TK, indices_TK, token_mask_T, asynchronous=True)

    def dispatch_finish(self, pending: _PendingDispatch) -> tuple[Tensor, Tensor, _AllToAllCtx]:
        """Wait for the transfers, then group the received rows by local expert."""
        x_VD, w_VK = _ExchangeWait.apply(pending.flight, pending.x_VD, pending.w_VK)
        self.stats.async_calls += 1
        return self._group(x_VD, pending.local_VK, w_VK, *pending.ctx_args)

    def _route(self, x_TD, weights_TK, indices_TK, token_mask_T, *, asynchronous: bool):
        _check_routing(x_TD, weights_TK, indices_TK, self.num_experts)
        weights_TK, indices_TK = _masked_routing(weights_TK, indices_TK, token_mask_T)
        L = self.num_local_experts
        dest_TK = torch.div(indices_TK, L, rounding_mode="floor")  # -1 (masked) stays -1
        ranks_P = torch.arange(self.ep_size, device=indices_TK.device)
        hit_TP = (dest_TK.unsqueeze(-1) == ranks_P).any(dim=1)
        # Rows in destination-rank order, tokens ascending within a rank.
        send_rank_S, send_tok_S = hit_TP.t().nonzero(as_tuple=True)
        local_SK = torch.where(
            dest_TK.index_select(0, send_tok_S) == send_rank_S.unsqueeze(-1),
            indices_TK.index_select(0, send_tok_S) % L,
            torch.full((), -1, dtype=indices_TK.dtype, device=indices_TK.device),
        )
        send_counts_P = hit_TP.sum(dim=0).to(torch.int64)
        recv_counts_P = _all_to_all(
            send_counts_P, [1] * self.ep_size, [1] * self.ep_size, self.ep_group
        )
        send_splits, recv_splits = send_counts_P.tolist(), recv_counts_P.tolist()
        self._count(send_splits, x_TD, weights_TK)
        group = self.ep_group
        rows = (x_TD.index_select(0, send_tok_S), weights_TK.index_select(0, send_tok_S))
        ctx_args = (send_tok_S, send_splits, recv_splits, x_TD.shape[0])
        if not asynchronous:
            local_VK = _all_to_all(local_SK.to(torch.int64), recv_splits, send_splits, group)
            x_VD, w_VK = _Exchange.apply(recv_splits, send_splits, group, *rows)
            return self._group(x_VD, local_VK, w_VK, *ctx_args)
        # Same collective order as the synchronous path on every rank: ids, then tokens.
        flight = _InFlight()
        local_VK = _all_to_all_async(
            local_SK.to(torch.int64), recv_splits, send_splits, group, flight
        )
        x_VD, w_VK = _ExchangeStart.apply(flight, recv_splits, send_splits, group, *rows)
        return _PendingDispatch(flight, local_VK, x_VD, w_VK, ctx_args)

    def _group(self, x_VD, local_VK, w_VK, send_tok_S, send_splits, recv_splits, num_tokens):
        x_ND, counts_L, group_ctx = _group_by_expert(x_VD, local_VK, w_VK, self.num_local_experts)
        ctx = _AllToAllCtx(group_ctx, send_tok_S, send_splits, recv_splits, num_tokens)
        return x_ND, counts_L, ctx

    def combine(self, y_ND: Tensor, ctx: _AllToAllCtx) -> Tensor:
        y_VD = _ungroup(y_ND, ctx.group_ctx)
        (y_SD,) = _Exchange.apply(ctx.send_splits, ctx.recv_splits, self.ep_group, y_VD)
        self.stats.combine_bytes += _remote_rows(ctx.send_splits, self.ep_rank) * _row_bytes(y_SD)
        out_TD = y_SD.new_zeros(ctx.num_tokens, y_SD.shape[-1])
        return out_TD.index_add(0, ctx.send_tok_S, y_SD)

    def _count(self, send_splits: list[int], x_TD: Tensor, weights_TK: Tensor) -> None:
        remote = _remote_rows(send_splits, self.ep_rank)
        k = weights_TK.shape[-1]
        meta = remote * k * (8 + weights_TK.element_size()) + 8 * self.ep_size
        self.stats.dispatch_bytes += remote * _row_bytes(x_TD)
        self.stats.metadata_bytes += meta
        self.stats.calls += 1


def _remote_rows(send_splits: list[int], own_rank: int) -> int:
    return sum(send_splits) - send_splits[own_rank]


def _row_bytes(x: Tensor) -> int:
    return x.shape[-1] * x.element_size()
