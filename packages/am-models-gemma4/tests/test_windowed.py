"""Chunked masked attention (am_models_gemma4.windowed) against one whole-mask sdpa call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gemma4_helpers import rel_err

from am_models_gemma4.windowed import CHUNK, chunked_masked_attention, key_ranges

S = 2 * CHUNK + 44  # three query chunks, the last one short


def _kernel(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)


def _window(s, window):
    i = torch.arange(s)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def _masks():
    window = _window(S, 64)[None, None].expand(2, 1, S, S)
    padded = window.clone()
    padded[1, :, :, :20] = False  # row 1 left-padded: its first 20 keys never attended
    padded[1, :, :20, :20] = torch.eye(20, dtype=torch.bool)  # padded queries see themselves
    image = window.clone()
    image[:, :, 100:180, 100:180] = True  # an image block attending both ways
    causal = _window(S, S)[None, None].clone()
    causal[..., :5] = False  # a causal layer's mask with padding
    causal[..., :5, :5] = True
    return {"window": window, "padded": padded, "image": image, "causal_padded": causal}


def test_key_ranges_follow_a_sliding_window():
    ranges = key_ranges(_window(S, 64)[None, None])
    assert ranges == [
        (0, CHUNK, 0, CHUNK),
        (CHUNK, 2 * CHUNK, CHUNK - 63, 2 * CHUNK),
        (2 * CHUNK, S, 2 * CHUNK - 63, S),
    ]


@pytest.mark.parametrize("name", sorted(_masks()))
def test_chunked_equals_the_whole_mask_call_with_gradients(name):
    mask = _masks()[name]
    assert key_ranges(mask) is not None  # the test exercises the chunked path
    torch.manual_seed(0)
    q = torch.randn(2, 4, S, 16, requires_grad=True)
    k = torch.randn(2, 2, S, 16, requires_grad=True)
    v = torch.randn(2, 2, S, 16, requires_grad=True)
    probe = torch.randn(2, 4, S, 16)
    out = chunked_masked_attention(_kernel, q, k, v, mask)
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v))
    ref = _kernel(q, k, v, mask)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    assert rel_err(out, ref) <= 1e-6
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-6


def test_whole_mask_call_where_chunking_does_not_pay_or_a_chunk_sees_nothing():
    q = k = v = torch.randn(1, 2, S, 8)
    dense = torch.ones(1, 1, S, S, dtype=torch.bool)
    assert key_ranges(dense) is None
    assert chunked_masked_attention(_kernel, q, k, v, dense) is None
    empty_chunk = _window(S, 16)[None, None].clone()
    empty_chunk[..., :CHUNK, :] = False  # the first chunk's rows attend to nothing
    assert key_ranges(empty_chunk) is None
    short = _window(CHUNK, 8)[None, None]
    head = q[:, :, :CHUNK]
    assert chunked_masked_attention(_kernel, head, head, head, short) is None
    additive = torch.zeros(1, 1, S, S)
    assert chunked_masked_attention(_kernel, q, k, v, additive) is None
