"""Attention-mask builders: causal, sliding window, padding and packed documents.

Conventions shared by every function here and by `am_utils.attention`:

- Queries are the last `q_len` of `kv_len` key positions (prefill: q_len == kv_len; decode
  with a cache: q_len < kv_len), so "causal" means key j <= the query's absolute position.
- A sliding window W lets the query at position i see keys i - W < j <= i.
- `token_mask` [B, K] is True at real tokens (transformers' 2-D `attention_mask` of ones
  and zeros); `padding_mask` (the training recipes' convention) is True at padding.
- Packed documents: `seq_idx` [B, S] holds each token's document index; no query attends
  to a key of another document. `cu_seqlens` [N + 1] are the documents' cumulative lengths.
- Dense masks are bool [B or 1, 1, Q, K] (True = may attend) or additive float (0 = attend,
  the dtype's most negative value = blocked); `to_additive_mask` / `to_bool_mask` convert.
- `am_utils.attention.build_varlen_seqs` gives the same pattern as THD sequence boundaries
  (`VarlenSeqs`), the form Transformer Engine takes.
"""

from __future__ import annotations

import torch

__all__ = [
    "build_attention_mask",
    "causal_mask",
    "seq_idx_from_cu_seqlens",
    "to_additive_mask",
    "to_bool_mask",
    "token_mask_from",
]


def causal_mask(
    q_len: int,
    kv_len: int,
    *,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[1, 1, Q, K] bool: causal, end-aligned (queries are the last Q of K positions), optionally windowed."""
    if q_len > kv_len:
        raise ValueError(f"q_len={q_len} cannot exceed kv_len={kv_len}: queries are the last keys")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        if sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be >= 1")
        allowed = allowed & (k_pos > q_pos - sliding_window)
    return allowed[None, None]


def to_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool form of a bool or additive mask (additive: 0 = attend, anything else = blocked)."""
    return mask if mask.dtype == torch.bool else mask == 0


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive form of a bool mask: 0 where True, `torch.finfo(dtype).min` where False.

    The most negative finite value, not -inf: a fully blocked row then softmaxes to a
    uniform row instead of NaN. Float masks are returned cast to `dtype`.
    """
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


def token_mask_from(
    attention_mask: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """[B, K] bool, True = real token, or None when nothing is padded.

    From `padding_mask` (True = padding; wins when both are given) or a 2-D `attention_mask`
    (1 = real). A 1-D `padding_mask` (a squeezed THD batch of [T] tokens) becomes [1, T];
    a 4-D `attention_mask` is a dense attention mask, not padding, and gives None.
    """
    if padding_mask is not None:
        mask = ~padding_mask.bool()
    elif attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.bool()
    else:
        return None
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return None if bool(mask.all()) else mask


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, total] int32 document index of every packed token (tokens past the last entry: one more)."""
    cu = cu_seqlens.reshape(-1).to(torch.long)
    pos = torch.arange(total, device=cu.device)
    return torch.bucketize(pos, cu[1:], right=True).to(torch.int32).unsqueeze(0)


def build_attention_mask(
    q_len: int,
    kv_len: int,
    token_mask: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """[B, 1, Q, K] bool mask (True = may attend), or None for plain causal attention.

    Causal (end-aligned), windowed by `sliding_window`; `token_mask` [B, K] (True = real)
    blocks padded keys; `seq_idx` [B or 1, Q] (packed documents, Q == K) blocks keys of
    other documents. Rows with nothing to attend (padded queries) attend everywhere, so
    they stay finite; their outputs are never used.
    """
    if token_mask is None and seq_idx is None and sliding_window is None:
        return None
    device = next((t.device for t in (token_mask, seq_idx) if t is not None), None)
    allowed = causal_mask(q_len, kv_len, sliding_window=sliding_window, device=device)
    if seq_idx is not None:
        if q_len != kv_len:
            raise ValueError(
                "packed sequences (seq_idx / cu_seqlens) cannot be combined with a cache"
            )
        allowed = allowed & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    if token_mask is not None:
        allowed = allowed & token_mask[:, None, None, -kv_len:]
    return allowed | ~allowed.any(dim=-1, keepdim=True)
