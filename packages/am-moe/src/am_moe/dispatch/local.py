"""`LocalDispatcher`: no expert parallelism, every expert lives on this rank.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from torch import Tensor

from am_moe.dispatch.base import TokenDispatcher, _check_routing, _masked_routing
from am_moe.dispatch.grouping import _group_by_expert, _GroupCtx, _ungroup

__all__ = ["LocalDispatcher"]


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
