"""Mask builders against a brute-force rule per (query, key) pair."""

from __future__ import annotations

import pytest
import torch

from am_utils.masks import (
    build_attention_mask,
    causal_mask,
    seq_idx_from_cu_seqlens,
    to_additive_mask,
    to_bool_mask,
    token_mask_from,
)


def _rule(q_len, kv_len, window=None, token_mask=None, seq_idx=None, batch=1):
    """The documented rule, pair by pair: [B, 1, Q, K] bool (before the empty-row fallback)."""
    out = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for qi in range(q_len):
            i = kv_len - q_len + qi  # absolute position of the query
            for j in range(kv_len):
                ok = j <= i and (window is None or i - window < j)
                if token_mask is not None:
                    ok = ok and bool(token_mask[b, j])
                if seq_idx is not None:
                    s = seq_idx[min(b, seq_idx.shape[0] - 1)]
                    ok = ok and s[qi] == s[j]
                out[b, 0, qi, j] = ok
    return out


@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (1, 6), (3, 8)])
@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_causal_mask_is_end_aligned_and_windowed(q_len, kv_len, window):
    got = causal_mask(q_len, kv_len, sliding_window=window)
    assert got.shape == (1, 1, q_len, kv_len) and got.dtype == torch.bool
    assert torch.equal(got, _rule(q_len, kv_len, window))


def test_window_of_w_sees_exactly_w_keys_once_warm():
    mask = causal_mask(10, 10, sliding_window=4)[0, 0]
    assert mask.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert mask[9].nonzero().flatten().tolist() == [6, 7, 8, 9]  # i - W < j <= i


def test_causal_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="q_len=5 cannot exceed kv_len=4"):
        causal_mask(5, 4)
    with pytest.raises(ValueError, match="sliding_window=0"):
        causal_mask(4, 4, sliding_window=0)


def test_plain_causal_is_none():
    assert build_attention_mask(8, 8) is None
    assert build_attention_mask(1, 8, None, None) is None


def test_packed_documents_never_attend_across_a_boundary():
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    got = build_attention_mask(8, 8, None, seq_idx)
    assert torch.equal(got, _rule(8, 8, seq_idx=seq_idx))
    assert not got[0, 0, 3, :3].any()  # first token of document 1 sees only itself
    assert got[0, 0, 3, 3]


def test_padding_sliding_window_and_packing_combine():
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]).bool()
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    got = build_attention_mask(8, 8, token_mask, seq_idx, sliding_window=3)
    want = _rule(8, 8, 3, token_mask, seq_idx, batch=2)
    # Rows with nothing to attend (left padding) attend everywhere, so softmax stays finite.
    empty = ~want.any(-1, keepdim=True)
    assert empty[1, 0, :2].all() and not empty[0].any()
    assert torch.equal(got, want | empty)


def test_padded_decode_with_a_cache_masks_padded_cache_slots():
    token_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    got = build_attention_mask(2, 6, token_mask, None, sliding_window=4)
    assert torch.equal(got, _rule(2, 6, 4, token_mask, batch=2))


def test_packing_with_a_cache_is_rejected():
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        build_attention_mask(2, 6, None, torch.zeros(1, 2, dtype=torch.long))


def test_sliding_window_alone_gives_a_mask():
    got = build_attention_mask(5, 5, sliding_window=2)
    assert torch.equal(got, _rule(5, 5, 2))


def test_additive_and_bool_forms_round_trip():
    allowed = build_attention_mask(6, 6, None, torch.tensor([[0, 0, 0, 1, 1, 1]]))
    additive = to_additive_mask(allowed, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[allowed], torch.zeros(int(allowed.sum()), dtype=torch.bfloat16))
    assert (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()
    assert torch.equal(to_bool_mask(additive), allowed)
    assert to_bool_mask(allowed) is allowed
    # Finite, not -inf: a fully blocked row softmaxes to a uniform row, never NaN.
    blocked = to_additive_mask(torch.zeros(1, 1, 1, 4, dtype=torch.bool))
    assert torch.isfinite(torch.softmax(blocked, -1)).all()


def test_token_mask_from_both_conventions():
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    padding_mask = torch.tensor([[False, False, True], [False, False, False]])
    want = attention_mask.bool()
    assert torch.equal(token_mask_from(attention_mask), want)
    assert torch.equal(token_mask_from(None, padding_mask), want)
    assert token_mask_from(torch.ones(2, 3)) is None  # nothing padded
    assert token_mask_from(torch.ones(1, 1, 3, 3)) is None  # a dense 4-D mask is not padding
    assert token_mask_from(None, torch.tensor([False, True])).shape == (1, 2)  # squeezed THD


def test_seq_idx_from_cu_seqlens_counts_trailing_tokens_as_one_more_document():
    got = seq_idx_from_cu_seqlens(torch.tensor([0, 2, 5]), 7)
    assert got.dtype == torch.int32
    assert got.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
