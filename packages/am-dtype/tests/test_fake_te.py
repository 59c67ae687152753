"""The shared Transformer Engine stand-in keeps TE's documented contracts, with exact math.

The model packages test their TE glue against it, so a wrong mask, layout or rotation here
would make those tests pass for the wrong reason: each piece is checked against an
independent naive computation.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from am_dtype.fake_te import install_fake_transformer_engine

H, G, D = 4, 2, 8


def _naive(q, k, v, allowed, scale):
    """q [S, H, D], k/v [T, G, D]; fp64 softmax attention over `allowed` [S, T]."""
    k = k.repeat_interleave(H // G, dim=1)
    v = v.repeat_interleave(H // G, dim=1)
    scores = torch.einsum("shd,thd->hst", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def _qkv(s, t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, D, generator=gen, dtype=torch.float64)
        for n, h in ((s, H), (t, G), (t, G))
    )


@pytest.mark.parametrize(
    ("mask_type", "window", "rule"),
    [
        ("no_mask", None, lambda i, j: True),
        ("causal", None, lambda i, j: j <= i),
        ("causal_bottom_right", None, lambda i, j: j <= i + 2),  # 3 queries over 5 keys
        ("causal_bottom_right", (1, 0), lambda i, j: i + 1 <= j <= i + 2),
        ("causal", (0, 0), lambda i, j: j == i),
    ],
)
def test_dense_layouts_mask_types_and_windows(monkeypatch, mask_type, window, rule):
    te = install_fake_transformer_engine(monkeypatch).pytorch
    q, k, v = _qkv(3, 5)
    allowed = torch.tensor([[rule(i, j) for j in range(5)] for i in range(3)])
    want = _naive(q, k, v, allowed, 0.3)
    dpa = te.DotProductAttention(H, D, num_gqa_groups=G, attn_mask_type=mask_type,
                                 qkv_format="bshd", softmax_scale=0.3, window_size=window)  # fmt: skip
    got = dpa(q[None], k[None], v[None])
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)
    sbhd = dpa(q[:, None], k[:, None], v[:, None], qkv_format="sbhd")
    torch.testing.assert_close(sbhd[:, 0], want, rtol=1e-12, atol=1e-12)


def test_thd_attends_within_each_sequence_and_zeroes_rows_past_the_end(monkeypatch):
    fake = install_fake_transformer_engine(monkeypatch)
    q, k, v = _qkv(7, 7, seed=1)
    dpa = fake.pytorch.DotProductAttention(H, D, num_gqa_groups=G)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = dpa(q, k, v, qkv_format="thd", attn_mask_type="padding_causal",
              cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)  # fmt: skip
    for a, b in ((0, 2), (2, 6)):
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        want = _naive(q[a:b], k[a:b], v[a:b], causal, D**-0.5)
        torch.testing.assert_close(out[a:b], want, rtol=1e-12, atol=1e-12)
    assert (out[6:] == 0).all()
    assert fake.attention_calls[-1]["cu_q"] == [0, 2, 6]
    with pytest.raises(AssertionError):  # a max_seqlen shorter than a sequence
        dpa(q, k, v, qkv_format="thd", attn_mask_type="padding_causal",
            cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=3)  # fmt: skip


def test_modules_autocast_and_rope(monkeypatch):
    fake = install_fake_transformer_engine(monkeypatch)
    te = fake.pytorch
    x = torch.randn(5, 4, dtype=torch.float64)
    lin = te.Linear(4, 3, params_dtype=torch.float64)
    assert not isinstance(lin, torch.nn.Linear)  # as TE's is not
    recipe = fake.recipe.Float8CurrentScaling()
    with te.autocast(enabled=True, recipe=recipe):
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    assert fake.linear_fp8 == [(True, recipe)] and fake.fp8_state["enabled"] is False
    grouped = te.GroupedLinear(2, 4, 3, bias=False, params_dtype=torch.float64)
    want = torch.cat((x[:2] @ grouped.weight0.T, x[2:] @ grouped.weight1.T))
    torch.testing.assert_close(grouped(x, [2, 3]), want)
    norm = te.RMSNorm(4, eps=1e-6, params_dtype=torch.float64)
    torch.testing.assert_close(norm(x), x * (x.square().mean(-1, keepdim=True) + 1e-6).rsqrt())
    rope = sys.modules["transformer_engine.pytorch.attention.rope"].apply_rotary_pos_emb
    t = torch.randn(6, 2, 3, 8, dtype=torch.float64)  # sbhd, 4 of 8 channels rotated
    freqs = torch.rand(6, 1, 1, 4)
    got = rope(t, freqs, tensor_format="sbhd", fused=True)
    cos, sin = freqs.cos().double(), freqs.sin().double()
    x1, x2 = t[..., :2], t[..., 2:4]
    rotated = torch.cat(
        (x1 * cos[..., :2] - x2 * sin[..., :2], x2 * cos[..., 2:] + x1 * sin[..., 2:]), -1
    )
    torch.testing.assert_close(got, torch.cat((rotated, t[..., 4:]), -1))
    assert fake.rope_calls == [{"format": "sbhd", "fused": True, "rows": 2}]


def test_installed_for_one_test_only(monkeypatch):
    import am_dtype.backend as backend

    before = (backend.HAVE_TE, backend._CUDA, sys.modules.get("transformer_engine"))
    with monkeypatch.context() as mp:
        fake = install_fake_transformer_engine(mp, cuda=True)
        assert importlib.util.find_spec("transformer_engine") is not None
        assert backend.HAVE_TE is True and backend._CUDA is True
        assert sys.modules["transformer_engine"].pytorch is fake.pytorch
    after = (backend.HAVE_TE, backend._CUDA, sys.modules.get("transformer_engine"))
    assert after == before
