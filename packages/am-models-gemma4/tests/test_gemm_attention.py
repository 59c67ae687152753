"""gemm_attention (chunked attention on oneDNN GEMMs, hand-written backward) vs fp64 sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gemma4_helpers import rel_err

from am_dtype.cpu_gemm import onednn_available
from am_models_gemma4.gemm_attention import gemm_attention

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _qkv(B, H, G, S, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # token-major, as the projections produce them: [B, S, heads, D] -> [B, heads, S, D]
    q = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, S, G, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(B, S, G, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    return q, k, v


def _window_mask(S, window):
    i = torch.arange(S)
    return ((i[None] <= i[:, None]) & (i[:, None] - i[None] < window))[None, None]


def _padded_mask(S, real):
    """[B, 1, S, S]: causal over each row's first real[b] tokens; padded queries see key 0."""
    i = torch.arange(S)
    masks = []
    for n in real:
        m = (i[None] <= i[:, None]) & (i[None] < n)
        m[n:, 0] = True
        masks.append(m)
    return torch.stack(masks)[:, None]


def _ran_gemm_attention(out: torch.Tensor) -> bool:
    fn = out.grad_fn
    while fn is not None and "GemmAttention" not in type(fn).__name__:
        fn = fn.next_functions[0][0] if fn.next_functions else None  # through the views
    return fn is not None


CASES = {
    # name: (B, H, G, S, D, mask builder, scale); S > 2 chunks of 128 rows
    "causal gqa": (2, 4, 2, 300, 16, None, 1.0),
    "causal one kv head": (1, 4, 1, 260, 32, None, 0.125),
    "window": (2, 4, 2, 300, 16, lambda S: _window_mask(S, 100), 1.0),
    "padding": (2, 2, 1, 270, 16, lambda S: _padded_mask(S, [270, 190]), 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_and_gradients_equal_fp64_sdpa(case):
    B, H, G, S, D, build, scale = CASES[case]
    mask = build(S) if build else None
    q64, k64, v64 = (t.requires_grad_() for t in _qkv(B, H, G, S, D))
    probe = torch.randn(B, H, S, D, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(
        q64, k64, v64, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    grads_ref = torch.autograd.grad((ref * probe).sum(), [q64, k64, v64])
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out = gemm_attention(q, k, v, mask, scale, dropout_active=False)
    assert out is not None and _ran_gemm_attention(out)
    assert out.shape == ref.shape
    # fp32 products over <= 300 keys: ~1e-7 (outputs) and ~1e-6 (gradients) against fp64.
    assert rel_err(out, ref) <= 1e-6
    grads = torch.autograd.grad((out * probe.float()).sum(), [q, k, v])
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got, want) <= 5e-6


def test_cases_it_does_not_take_return_none():
    q, k, v = (t.float() for t in _qkv(1, 2, 1, 40, 8))
    mask = _window_mask(40, 8)
    assert gemm_attention(q.double(), k.double(), v.double(), None, 1.0, False) is None
    assert gemm_attention(q, k, v, None, 1.0, dropout_active=True) is None
    assert gemm_attention(q[:, :, -1:], k, v, None, 1.0, False) is None  # decoding step
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert gemm_attention(q, k, v, additive, 1.0, False) is None
    empty_row = mask.clone()
    empty_row[..., 5, :] = False  # a query that attends to nothing: the kernel decides
    assert gemm_attention(q, k, v, empty_row, 1.0, False) is None
    assert gemm_attention(q, k, v, mask, 1.0, False) is not None
