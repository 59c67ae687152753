"""Token dispatchers: route each token's rows to the experts chosen for it, then combine back.

A dispatcher turns the router's choice for every token (top-k expert `indices_TK` with
`weights_TK`) into one contiguous block of rows per local expert for the expert kernels
(`dispatch`), and turns the kernels' output rows back into one vector per token, weighted by
the routing weights (`combine`). Autograd flows through both to the token activations and to
the routing weights (the router's gradient).

One class per backend (the table `_DISPATCHERS`, keyed by `BackendConfig.dispatcher`):

- `LocalDispatcher`: no expert parallelism; this rank owns every expert.
- `AllToAllDispatcher` ("torch"): experts are split evenly over an EP process group; each
  token is sent, once per destination rank, only to the ranks owning at least one of its
  experts (`all_to_all_single` with exchanged counts), together with its local expert ids and
  routing weights there; the receiver expands it to one row per chosen local expert, and on the
  way back returns one already-weighted row per (token, rank), which the source rank sums.
  Sending the K weights (a few bytes next to a D-wide row) is what lets the return trip carry
  one row per (token, rank) instead of one per (token, expert). Compared with all-gathering
  every token to every EP rank this moves only routed tokens.
- `DeepEPDispatcher` ("deepep"), `HybridEPDispatcher` ("hybridep"), `UCCLEPDispatcher`
  ("uccl_ep"): the same algorithm run by GPU kernel libraries through their public Python
  APIs (`deep_ep.Buffer`, `deep_ep.HybridEPBuffer`, `uccl.ep.Buffer`), imported only when
  constructed. The library moves each routed token once per destination rank with its
  routing weights and returns it the same way; rows are grouped by expert and weighted
  here, as for "torch". Autograd Functions wire backward as the libraries document it: the
  gradient of a dispatch is a combine with the same handle, that of a combine a cached
  dispatch. Activations travel in bf16 by default (`comm_dtype`), routing weights in
  float32. The kernels need CUDA; on CPU the glue is tested against emulations of the APIs.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from am_dtype.backend import BackendConfig

__all__ = [
    "AllToAllDispatcher",
    "DeepEPDispatcher",
    "DispatchStats",
    "HybridEPDispatcher",
    "LocalDispatcher",
    "TokenDispatcher",
    "UCCLEPDispatcher",
    "build_dispatcher",
]


# ---------------------------------------------------------------------------------------------
# Grouping rows by expert (shared by every torch dispatcher)
# ---------------------------------------------------------------------------------------------


@dataclass
class _GroupCtx:
    """How `_group_by_expert` laid rows out, so `_ungroup` can undo it."""

    row_N: Tensor  # source row of each expert row
    pair_N: Tensor  # flat (row, k) slot of each expert row
    slot_RK: Tensor  # expert row of each (row, k) slot; 0 for unchosen slots (weight 0 there)
    weight_RK: Tensor  # routing weights, 0 on unchosen slots (autograd-connected)


def _group_by_expert(
    x_RD: Tensor, expert_RK: Tensor, weight_RK: Tensor, num_local: int
) -> tuple[Tensor, Tensor, _GroupCtx]:
    """Expand rows to one row per chosen expert, grouped by expert in expert order.

    `expert_RK` holds local expert ids in [0, num_local) or -1 for "no expert" (masked tokens,
    experts on another rank). The sort is stable, so within an expert rows keep their order.
    """
    flat_expert = expert_RK.reshape(-1)
    chosen = flat_expert >= 0
    # Unchosen slots get key `num_local` so they sort after every real expert.
    key = torch.where(chosen, flat_expert, torch.full_like(flat_expert, num_local))
    order = torch.sort(key, stable=True).indices
    counts_L = torch.bincount(flat_expert[chosen], minlength=num_local).to(torch.int64)
    n_rows = int(counts_L.sum())
    pair_N = order[:n_rows]
    row_N = torch.div(pair_N, expert_RK.shape[-1], rounding_mode="floor")
    slot_RK = torch.zeros_like(flat_expert)
    slot_RK[pair_N] = torch.arange(n_rows, device=pair_N.device)
    chosen_RK = chosen.view_as(weight_RK)
    weight_RK = torch.where(chosen_RK, weight_RK, weight_RK.new_zeros(()))
    ctx = _GroupCtx(row_N, pair_N, slot_RK.view_as(expert_RK), weight_RK)
    x_ND = _ExpandRows.apply(x_RD, row_N, ctx.slot_RK, chosen_RK)
    return x_ND, counts_L, ctx


def _ungroup(y_ND: Tensor, ctx: _GroupCtx) -> Tensor:
    """Weight each expert row by its routing weight and sum the rows of each source row."""
    w_RK = ctx.weight_RK.to(y_ND.dtype)
    return _WeightedSum.apply(y_ND, w_RK, ctx.slot_RK, ctx.row_N, ctx.pair_N)


def _slot_sum(src_ND: Tensor, w_RK: Tensor, slot_RK: Tensor) -> Tensor:
    """out_RD[r] = sum_k w_RK[r, k] * src_ND[slot_RK[r, k]], one slot at a time."""
    out_RD = src_ND.new_zeros(w_RK.shape[0], src_ND.shape[-1])
    if src_ND.shape[0]:
        for j in range(w_RK.shape[1]):
            out_RD.addcmul_(src_ND.index_select(0, slot_RK[:, j]), w_RK[:, j : j + 1])
    return out_RD


# Autograd of the plain formulation (index_select / scale / index_add) materializes several
# [N, D] temporaries and scatter-adds; on CPU, fresh allocations that large are page-faulted
# in on every step and cost more than the arithmetic. These two Functions keep temporaries at
# [R, D] (one slot at a time) plus one [N, D] buffer in combine's backward, scaled in place,
# and replace the scatter-adds by gathers. Unchosen slots have weight 0 and point at row 0
# (expert outputs are finite, so they add exact zeros).


class _ExpandRows(torch.autograd.Function):
    """x_ND = x_RD[row_N]; backward sums each row's chosen slots (a gather, not a scatter)."""

    @staticmethod
    def forward(ctx, x_RD, row_N, slot_RK, chosen_RK):
        ctx.save_for_backward(slot_RK, chosen_RK)
        return x_RD.index_select(0, row_N)

    @staticmethod
    def backward(ctx, grad_ND):
        slot_RK, chosen_RK = ctx.saved_tensors
        return _slot_sum(grad_ND, chosen_RK.to(grad_ND.dtype), slot_RK), None, None, None


class _WeightedSum(torch.autograd.Function):
    """out_RD[r] = sum_k w_RK[r, k] * y_ND[slot_RK[r, k]] (the combine)."""

    @staticmethod
    def forward(ctx, y_ND, w_RK, slot_RK, row_N, pair_N):
        ctx.save_for_backward(y_ND, w_RK, row_N, pair_N)
        return _slot_sum(y_ND, w_RK, slot_RK)

    @staticmethod
    def backward(ctx, grad_RD):
        y_ND, w_RK, row_N, pair_N = ctx.saved_tensors
        grad_ND = grad_RD.index_select(0, row_N)
        grad_w_RK = None
        if ctx.needs_input_grad[1]:
            grad_w_N = torch.einsum("nd,nd->n", grad_ND, y_ND)
            grad_w_RK = w_RK.new_zeros(w_RK.numel()).index_put_((pair_N,), grad_w_N)
            grad_w_RK = grad_w_RK.view_as(w_RK)
        grad_ND.mul_(w_RK.reshape(-1).index_select(0, pair_N).unsqueeze(-1))
        return grad_ND, grad_w_RK, None, None, None


def _check_routing(x_TD: Tensor, weights_TK: Tensor, indices_TK: Tensor, num_experts: int) -> None:
    if x_TD.dim() != 2:
        raise ValueError(f"dispatch expects x_TD of shape [T, D], got {tuple(x_TD.shape)}")
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"weights_TK {tuple(weights_TK.shape)} and indices_TK {tuple(indices_TK.shape)} "
            f"must both be [T={x_TD.shape[0]}, K]"
        )
    if indices_TK.numel() and (int(indices_TK.min()) < 0 or int(indices_TK.max()) >= num_experts):
        raise ValueError(
            f"expert indices must lie in [0, {num_experts}), got range "
            f"[{int(indices_TK.min())}, {int(indices_TK.max())}]"
        )


def _masked_routing(
    weights_TK: Tensor, indices_TK: Tensor, token_mask_T: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Experts -1 and weights 0 for masked (padding) tokens, so they are never routed."""
    if token_mask_T is None:
        return weights_TK, indices_TK
    keep_TK = token_mask_T.reshape(-1, 1).to(torch.bool).expand_as(indices_TK)
    indices_TK = torch.where(keep_TK, indices_TK, torch.full_like(indices_TK, -1))
    weights_TK = weights_TK * keep_TK.to(weights_TK.dtype)
    return weights_TK, indices_TK


# ---------------------------------------------------------------------------------------------
# Dispatchers
# ---------------------------------------------------------------------------------------------


@dataclass
class DispatchStats:
    """Payload bytes this rank sent to other ranks (rows of activations, routing metadata).

    Only bytes leaving the rank count; rows a rank keeps for its own experts are free.
    """

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    metadata_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.metadata_bytes = self.calls = 0


class TokenDispatcher:
    """Base class: `dispatch` groups rows by local expert, `combine` returns them to tokens.

    `dispatch(x_TD, weights_TK, indices_TK, token_mask_T)` returns `(x_ND, counts_L, ctx)`:
    rows for this rank's local experts, contiguous per local expert in expert order; int64
    rows per local expert (sum == N); and an opaque context for `combine`.
    `combine(y_ND, ctx)` returns y_TD with y_TD[t] = sum_k weights_TK[t, k] * y(t, k);
    masked tokens (token_mask_T False) get zeros and are never routed.
    """

    num_experts: int
    num_local_experts: int

    def dispatch(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Any]:
        raise NotImplementedError

    def combine(self, y_ND: Tensor, ctx: Any) -> Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """Every expert lives on this rank: sort the (token, k) rows by expert, nothing moves."""

    def __init__(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        self.num_experts = self.num_local_experts = num_experts

    def dispatch(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, _GroupCtx]:
        _check_routing(x_TD, weights_TK, indices_TK, self.num_experts)
        weights_TK, indices_TK = _masked_routing(weights_TK, indices_TK, token_mask_T)
        return _group_by_expert(x_TD, indices_TK, weights_TK, self.num_experts)

    def combine(self, y_ND: Tensor, ctx: _GroupCtx) -> Tensor:
        return _ungroup(y_ND, ctx)


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

        group = self.ep_group
        local_VK = _all_to_all(local_SK.to(torch.int64), recv_splits, send_splits, group)
        x_VD, w_VK = _Exchange.apply(
            recv_splits,
            send_splits,
            group,
            x_TD.index_select(0, send_tok_S),
            weights_TK.index_select(0, send_tok_S),
        )
        self._count(send_splits, x_TD, weights_TK)
        x_ND, counts_L, group_ctx = _group_by_expert(x_VD, local_VK, w_VK, L)
        ctx = _AllToAllCtx(group_ctx, send_tok_S, send_splits, recv_splits, x_TD.shape[0])
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


# ---------------------------------------------------------------------------------------------
# GPU kernel-library dispatchers (DeepEP, HybridEP, UCCL-EP)
# ---------------------------------------------------------------------------------------------

# One communication buffer per (buffer class, EP group, key) shared by every dispatcher that
# asks to share: the libraries allocate hundreds of MiB of registered memory per buffer, and a
# model builds one dispatcher per MoE block.
_SHARED_BUFFERS: dict[tuple, Any] = {}


class _LibraryCall:
    """The buffer and handle of one dispatch, shared by its dispatch and combine nodes."""

    __slots__ = ("buffer", "handle")

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.handle = buffer, None


@dataclass
class _KernelCtx:
    group_ctx: _GroupCtx
    call: _LibraryCall
    num_tokens: int


class _KernelLibraryDispatcher(TokenDispatcher):
    """Base of the GPU kernel-library dispatchers: imports the library and checks its API.

    The library is imported here, never at module import, so `import am_moe` stays light.
    Activations travel in `comm_dtype` (bf16 by default: the libraries' normal-mode combine
    kernels take bf16 only) and are cast back on arrival; None sends them as they are. Routing
    weights always travel as float32, the only dtype the kernels accept. `comm_dtype` is a
    constructor keyword and a plain attribute (tests set None for exact float64 rows).
    BackendConfig knobs: `dispatcher_num_sms` (SMs per communication kernel) and
    `dispatcher_share_token_dispatcher` (one buffer per EP group for all MoE blocks).
    """

    package: str = ""
    extra: str = ""
    backend_name: str = ""
    module: str = ""
    buffer_class: str = ""
    buffer_methods: tuple[str, ...] = ()

    def __init__(
        self,
        num_experts: int,
        ep_group: ProcessGroup,
        *,
        backend: BackendConfig | None = None,
        comm_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ImportError(
                f"dispatcher={self.backend_name!r} needs the '{self.package}' package, which is "
                f"not installed; install the am-moe '{self.extra}' extra or use dispatcher='torch'"
            )
        self.library = importlib.import_module(self.module)
        buffer_cls = getattr(self.library, self.buffer_class, None)
        missing = [m for m in self.buffer_methods if not hasattr(buffer_cls, m)]
        if buffer_cls is None or missing:
            raise ImportError(
                f"dispatcher={self.backend_name!r} drives {self.module}.{self.buffer_class} "
                f"(methods {list(self.buffer_methods)}); the installed '{self.package}' lacks "
                f"{'it' if buffer_cls is None else missing}; install a build that has it or use "
                "dispatcher='torch'"
            )
        ep_size = dist.get_world_size(ep_group)
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.ep_group, self.ep_size = ep_group, ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.comm_dtype = comm_dtype
        self.num_sms = backend.dispatcher_num_sms if backend is not None else 20
        self.share_buffer = backend is None or backend.dispatcher_share_token_dispatcher
        self.buffer_cls = buffer_cls
        self._own_buffers: dict[tuple, Any] = {}

    def _to_wire(self, x: Tensor) -> Tensor:
        if self.comm_dtype is not None:
            x = x.to(self.comm_dtype)
        return x.contiguous()

    def _cached_buffer(self, key: tuple) -> Any:
        cache = _SHARED_BUFFERS if self.share_buffer else self._own_buffers
        return cache.get((id(self.buffer_cls), id(self.ep_group), *key))

    def _store_buffer(self, key: tuple, buffer: Any) -> Any:
        cache = _SHARED_BUFFERS if self.share_buffer else self._own_buffers
        cache[(id(self.buffer_cls), id(self.ep_group), *key)] = buffer
        return buffer


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

    package, extra, backend_name = "deep_ep", "deepep", "deepep"
    module, buffer_class = "deep_ep", "Buffer"


class UCCLEPDispatcher(_DeepEPStyleDispatcher):
    """UCCL-EP kernels ("uccl_ep"): `uccl.ep.Buffer`, DeepEP's `Buffer` API over UCCL."""

    package, extra, backend_name = "uccl", "uccl", "uccl_ep"
    module, buffer_class = "uccl.ep", "Buffer"


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

    package, extra, backend_name = "deep_ep", "deepep", "hybridep"
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


def build_dispatcher(
    backend: BackendConfig, num_experts: int, ep_mesh: DeviceMesh | None = None
) -> TokenDispatcher:
    """The dispatcher named by `backend.dispatcher` for `num_experts` over `ep_mesh`.

    Without an EP mesh (or with a single EP rank) nothing moves, so every backend is the
    `LocalDispatcher`; a GPU backend asked for then warns that it falls back.
    """
    if backend.dispatcher not in _DISPATCHERS:
        raise ValueError(
            f"dispatcher={backend.dispatcher!r} is not supported; accepted: {sorted(_DISPATCHERS)}"
        )
    if ep_mesh is None or ep_mesh.size() == 1:
        if backend.dispatcher != "torch":
            warnings.warn(
                f"dispatcher={backend.dispatcher!r} needs expert parallelism over more than one "
                "rank; falling back to the local dispatcher",
                stacklevel=2,
            )
        return LocalDispatcher(num_experts)
    return _DISPATCHERS[backend.dispatcher](num_experts, ep_mesh.get_group(), backend=backend)


_DISPATCHERS: dict[str, type[TokenDispatcher]] = {
    "torch": AllToAllDispatcher,
    "deepep": DeepEPDispatcher,
    "hybridep": HybridEPDispatcher,
    "uccl_ep": UCCLEPDispatcher,
}
