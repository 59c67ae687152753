"""Grouping rows by local expert and the weighted sum back, shared by every dispatcher.

`_group_by_expert` expands each row to one row per chosen local expert, grouped by expert;
`_ungroup` weights those rows and sums them back per source row. Both are autograd
Functions that keep temporaries small (see the note above `_ExpandRows`).

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
