"""Causal-LM loss that respects packed-document boundaries.

Position t predicts labels[t + 1]. In a packed row (several documents back to back, told
apart by `seq_idx` or `cu_seqlens`, see `am_utils.masks`) the last token of a document has
no target: the next label belongs to another document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from am_utils.masks import seq_idx_from_cu_seqlens

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "next_token_targets", "target_cross_entropy"]

# transformers' and torch's cross-entropy convention for "no target here".
IGNORE_INDEX = -100


def next_token_targets(
    labels: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Targets aligned with the logits: labels shifted left by one, `ignore_index` where none.

    The last position of every row, and with `seq_idx` ([B or 1, S]) or `cu_seqlens`
    ([N + 1], for a [1, S] or [S] row) the last token of every document, get `ignore_index`.
    """
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens.to(labels.device), labels.shape[-1])
    target = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if seq_idx is not None:
        if seq_idx.shape[-1] != labels.shape[-1]:
            raise ValueError(
                f"seq_idx covers {seq_idx.shape[-1]} positions but labels have {labels.shape[-1]}"
            )
        rows = labels.reshape(-1, labels.shape[-1])
        seq_idx = seq_idx.reshape(-1, seq_idx.shape[-1]).expand_as(rows).reshape(labels.shape)
        crosses = seq_idx[..., 1:] != seq_idx[..., :-1]
        target[..., :-1] = target[..., :-1].masked_fill(crosses, ignore_index)
    return target


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the positions that have a target.

    logits [..., S, V] and labels [..., S] (same leading shape); `ignore_index` labels are
    skipped. Packed rows: pass `seq_idx` or `cu_seqlens` so no document's last token is
    trained to predict the next document's first (labels that already mark each document's
    first token `ignore_index`, transformers' packing convention, give the same loss).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:-1])}"
        )
    target = next_token_targets(labels, seq_idx, cu_seqlens=cu_seqlens, ignore_index=ignore_index)
    return target_cross_entropy(logits, target, ignore_index=ignore_index)


def target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy in fp32 of logits [..., S, V] against targets [..., S] already aligned
    with them (`next_token_targets`' output): what a context-parallel rank computes on its
    shard, whose targets were shifted on the full sequence before sharding.

    `reduction` is "mean" (over the positions with a target) or "sum".
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape[:-1])}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; accepted: ['mean', 'sum']")
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction=reduction,
    )
