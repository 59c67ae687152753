"""The dispatcher contract (`TokenDispatcher`), byte counters, and routing checks.

Shape legend: T tokens on this rank (flattened batch*seq), D model dim, K top-k, E global
experts, P EP ranks, L local experts of this EP rank (E = P * L), S rows this rank sends
(one per (token, destination rank)), V rows this rank receives, R rows being grouped by
expert (the T tokens without EP, the V received rows with it), N expert rows after grouping
(one per (row, chosen local expert)), J local expert slots per row HybridEP keeps (min(K, L)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class DispatchStats:
    """Payload bytes this rank sent to other ranks (rows of activations, routing metadata).

    Only bytes leaving the rank count; rows a rank keeps for its own experts are free.
    """

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    metadata_bytes: int = 0
    calls: int = 0
    async_calls: int = 0  # dispatches whose token transfer ran asynchronously

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.metadata_bytes = self.calls = 0
        self.async_calls = 0


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

    def dispatch_start(
        self,
        x_TD: Tensor,
        weights_TK: Tensor,
        indices_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> Any:
        """Begin a dispatch; `dispatch_finish(pending)` returns what `dispatch` returns.

        Work placed between the two (the shared experts) overlaps the communication of a
        dispatcher whose transfers run asynchronously; by default the dispatch runs here.
        """
        return self.dispatch(x_TD, weights_TK, indices_TK, token_mask_T)

    def dispatch_finish(self, pending: Any) -> tuple[Tensor, Tensor, Any]:
        """Wait for a `dispatch_start` and return `(x_ND, counts_L, ctx)`."""
        return pending


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
