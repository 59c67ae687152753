"""The attention kernel table against a naive fp64 reference; THD boundaries; compile_attn."""

from __future__ import annotations

import functools

import pytest
import torch

import am_dtype.backend as am_backend
from am_dtype.fake_te import install_fake_transformer_engine
from am_utils.attention import (
    ATTENTION_KERNELS,
    AttentionKernel,
    VarlenSeqs,
    build_te_attention,
    build_varlen_seqs,
)
from am_utils.masks import build_attention_mask, causal_mask, to_additive_mask

H, HKV, D = 4, 2, 8
CPU_KERNELS = ["sdpa", "eager", "flex"]
# "eager" takes its softmax in fp32 (as transformers' eager attention does), even for fp64.
TOL = {"sdpa": 1e-10, "flex": 1e-10, "eager": 1e-5}


def _qkv(batch=2, q_len=6, kv_len=6, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return rand(batch, H, q_len, D), rand(batch, HKV, kv_len, D), rand(batch, HKV, kv_len, D)


def _reference(q, k, v, allowed, scale):
    """softmax(q k^T * scale) v over the allowed keys, GQA by repetition, in fp64."""
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _kernel(name, **kwargs):
    return AttentionKernel(name, H, HKV, D, **kwargs).eval()


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (1, 6), (3, 7)])
@pytest.mark.parametrize("window", [None, 2])
def test_cpu_kernels_causal_decode_and_window(name, q_len, kv_len, window):
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len)
    allowed = causal_mask(q_len, kv_len, sliding_window=window)
    want = _reference(q, k, v, allowed, D**-0.5)
    with torch.no_grad():
        got = _kernel(name, sliding_window=window)(q, k, v)
    torch.testing.assert_close(got, want, rtol=TOL[name], atol=TOL[name])


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_cpu_kernels_take_bool_and_additive_masks_and_a_custom_scale(name, form):
    q, k, v = _qkv()
    token_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]).bool()
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]])
    allowed = build_attention_mask(6, 6, token_mask, seq_idx)
    mask = allowed if form == "bool" else to_additive_mask(allowed, torch.float64)
    want = _reference(q, k, v, allowed, 1.0)
    with torch.no_grad():
        got = _kernel(name, scale=1.0)(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=TOL[name], atol=TOL[name])


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_sliding_window_also_applies_on_top_of_an_explicit_mask(name):
    q, k, v = _qkv()
    packed = build_attention_mask(6, 6, None, torch.tensor([[0, 0, 0, 0, 0, 1]]))
    want = _reference(q, k, v, packed & causal_mask(6, 6, sliding_window=2), D**-0.5)
    with torch.no_grad():
        got = _kernel(name, sliding_window=2)(q, k, v, packed)
        additive = _kernel(name, sliding_window=2)(q, k, v, to_additive_mask(packed, q.dtype))
    torch.testing.assert_close(got, want, rtol=TOL[name], atol=TOL[name])
    torch.testing.assert_close(additive, want, rtol=TOL[name], atol=TOL[name])


@pytest.mark.parametrize("name", ["sdpa", "eager", "flex"])
def test_gradients_match_the_reference(name):
    q, k, v = (t.requires_grad_() for t in _qkv(q_len=5, kv_len=5))
    _kernel(name, sliding_window=3)(q, k, v).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _reference(q, k, v, causal_mask(5, 5, sliding_window=3), D**-0.5).square().sum().backward()
    for a, t in zip(got, (q, k, v), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=TOL[name] * 10, atol=TOL[name] * 10)


def _doc_block_mask(docs, length, block_size=2):
    """A FlexAttention BlockMask: causal within documents given as ids per position."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = torch.tensor(docs)

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)

    block = create_block_mask(mask_mod, len(docs), None, length, length, device="cpu",
                              BLOCK_SIZE=block_size)  # fmt: skip
    same_doc = ids[:, None, :, None] == ids[:, None, None, :]
    return block, same_doc & causal_mask(length, length)


@pytest.mark.parametrize("window", [None, 2])
def test_flex_takes_a_block_mask_forward_and_backward(window):
    docs = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    block, dense = _doc_block_mask(docs, 6)
    if window is not None:
        dense = dense & causal_mask(6, 6, sliding_window=window)
    q, k, v = _qkv(q_len=6, kv_len=6)
    want = _reference(q, k, v, dense, D**-0.5)
    kernel = _kernel("flex", sliding_window=window)
    with torch.no_grad():  # torch's FlexAttention itself
        torch.testing.assert_close(kernel(q, k, v, block), want, rtol=1e-10, atol=1e-10)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = kernel(q, k, v, block)  # CPU autograd: the same mask through SDPA
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    ref = torch.autograd.grad(_reference(q, k, v, dense, D**-0.5).square().sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_block_mask_is_checked_and_needs_flex():
    block, _ = _doc_block_mask([[0, 0, 1, 1]], 4)
    q, k, v = _qkv(batch=1, q_len=5, kv_len=5)
    with pytest.raises(ValueError, match=r"BlockMask covers batch 1 x 4 queries x 4 keys"):
        _kernel("flex")(q, k, v, block)
    for name in ("sdpa", "eager"):
        with pytest.raises(ValueError, match=rf"BlockMask needs attn='flex'.*attn='{name}'"):
            _kernel(name)(q, k, v, block)


def test_dropout_only_in_training():
    q, k, v = _qkv()
    kernel = AttentionKernel("eager", H, HKV, D, dropout=0.5)
    torch.testing.assert_close(kernel.eval()(q, k, v), _kernel("eager")(q, k, v))
    torch.manual_seed(0)
    assert not torch.allclose(kernel.train()(q, k, v), _kernel("eager")(q, k, v))


def test_bad_arguments_are_rejected_at_construction():
    with pytest.raises(ValueError, match=r"BackendConfig.attn='tilelang' has no attention kernel"):
        AttentionKernel("tilelang", H, HKV, D)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a positive multiple"):
        AttentionKernel("sdpa", 4, 3, D)
    with pytest.raises(ValueError, match="sliding_window=0"):
        AttentionKernel("sdpa", H, HKV, D, sliding_window=0)
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        AttentionKernel("sdpa", H, HKV, D, dropout=1.0)
    with pytest.raises(TypeError, match="compile='yes'"):
        AttentionKernel("sdpa", H, HKV, D, compile="yes")
    assert sorted(ATTENTION_KERNELS) == ["eager", "flex", "sdpa", "te"]


# --------------------------------------------------------------------------- compile_attn


def test_compile_wraps_the_kernel_call(monkeypatch):
    """compile=True runs the kernel through torch.compile (a counting backend here: fast)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    q, k, v = _qkv()
    mask = build_attention_mask(6, 6, None, torch.tensor([[0, 0, 0, 1, 1, 1]]))
    compiled = _kernel("sdpa", compile=True, sliding_window=4)
    eager = _kernel("sdpa", sliding_window=4)
    with torch.no_grad():
        got = compiled(q, k, v, mask)
    assert counter.frame_count >= 1 and counter.op_count > 0
    torch.testing.assert_close(got, eager(q, k, v, mask), rtol=0, atol=0)
    assert not eager.compiled and compiled.compiled


@pytest.mark.slow
def test_compile_with_inductor_on_cpu_matches_eager():
    torch._dynamo.reset()
    q, k, v = (t.float() for t in _qkv())
    got = _kernel("eager", compile=True)(q, k, v)
    torch.testing.assert_close(got, _kernel("eager")(q, k, v), rtol=1e-5, atol=1e-5)


def test_compile_with_te_is_rejected():
    with pytest.raises(ValueError, match="compile_attn=True cannot be combined with attn='te'"):
        AttentionKernel("te", H, HKV, D, compile=True)


# --------------------------------------------------------------------------- te (emulated)


@pytest.fixture
def fake_te(monkeypatch):
    """The shared fake TE (am_dtype.fake_te); returns its log of DotProductAttention calls."""
    return install_fake_transformer_engine(monkeypatch).attention_calls


def test_te_module_gets_scale_and_sliding_window(fake_te):
    te = build_te_attention(H, HKV, D, 0.1, scale=1.0, sliding_window=5)
    assert te.init == {
        "num_attention_heads": H,
        "kv_channels": D,
        "num_gqa_groups": HKV,
        "attention_dropout": 0.1,
        "attn_mask_type": "causal_bottom_right",
        "qkv_format": "bshd",
        "softmax_scale": 1.0,
        "window_size": (4, 0),  # W - 1 keys left of the diagonal: i - W < j <= i
    }
    assert build_te_attention(H, HKV, D).init["window_size"] is None


def test_te_kernel_bshd_and_thd_calls_equal_the_reference(fake_te):
    kernel = _kernel("te", sliding_window=3)
    q, k, v = (x.float() for x in _qkv(batch=2, q_len=5, kv_len=5))
    allowed = causal_mask(5, 5, sliding_window=3)
    want = _reference(q, k, v, allowed, D**-0.5)
    torch.testing.assert_close(kernel(q, k, v), want, rtol=1e-5, atol=1e-6)
    assert fake_te[-1]["q"] == (2, 5, H, D) and fake_te[-1]["k"] == (2, 5, HKV, D)
    assert fake_te[-1]["qkv_format"] == "bshd" and fake_te[-1]["window_size"] == (2, 0)
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]).bool()
    varlen = build_varlen_seqs(5, 5, 2, token_mask, None)
    out = kernel(q, k, v, None, varlen)
    call = fake_te[-1]
    assert call["qkv_format"] == "thd" and call["q"] == (8, H, D)
    assert call["cu_q"] == [0, 5, 8] and call["max_q"] == 5
    assert (out[1, :, :2] == 0).all()  # padded rows are zeros
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-6)
    # Row 1's three real tokens attend among themselves only (the pads are not keys).
    alone = _reference(
        q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:], causal_mask(3, 3, sliding_window=3), D**-0.5
    )
    torch.testing.assert_close(out[1:, :, 2:], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a dense attention mask"):
        kernel(q, k, v, causal_mask(5, 5))


def test_te_without_transformer_engine_names_the_extra(monkeypatch):
    monkeypatch.setattr(am_backend, "HAVE_TE", False)
    with pytest.raises(ImportError, match="install the 'te' extra"):
        AttentionKernel("te", H, HKV, D)


# --------------------------------------------------------------------------- THD boundaries


def test_varlen_from_cu_seqlens_is_taken_as_given_and_checked():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]])
    got = build_varlen_seqs(6, 6, 1, None, seq_idx, torch.tensor([0, 2, 5, 6]))
    assert got.cu_seqlens_q.dtype == torch.int32
    assert got.cu_seqlens_q.tolist() == [0, 2, 5, 6] and got.max_seqlen_q == 3
    assert got.q_index is None and got.attn_mask_type == "padding_causal"
    with pytest.raises(ValueError, match="end at the 6 tokens of the batch; got"):
        build_varlen_seqs(6, 6, 1, None, seq_idx, torch.tensor([0, 2, 5]))


def test_varlen_from_seq_idx_rows_with_padding():
    seq_idx = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    token_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    got = build_varlen_seqs(4, 4, 2, token_mask, seq_idx)
    assert got.cu_seqlens_q.tolist() == [0, 2, 4, 7] and got.max_seqlen_q == 3
    assert got.q_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="one contiguous run"):
        build_varlen_seqs(4, 4, 1, None, torch.tensor([[0, 1, 1, 0]]))


def test_varlen_padded_decode_is_bottom_right():
    token_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool()
    got = build_varlen_seqs(1, 4, 2, token_mask, None)
    assert isinstance(got, VarlenSeqs)
    assert got.attn_mask_type == "padding_causal_bottom_right"
    assert got.cu_seqlens_q.tolist() == [0, 1, 2] and got.cu_seqlens_kv.tolist() == [0, 3, 7]
    assert build_varlen_seqs(4, 4, 2, None, None) is None


def _packed(docs: list[list[int]]) -> torch.Tensor:
    """build_attention_mask of packed rows given as document lengths per row."""
    seq_idx = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in docs])
    return build_attention_mask(seq_idx.shape[1], seq_idx.shape[1], None, seq_idx)


@pytest.mark.parametrize(
    "docs", [[[3, 1, 5, 3], [6, 6]], [[12]], [[1, 11]]], ids=["two-rows", "one-doc", "broadcast"]
)
def test_sdpa_runs_packed_documents_one_by_one_exactly(docs, monkeypatch):
    """A packed-documents mask takes one causal SDPA call per document (in fp64 equal to the
    dense reference, forward and gradients); the segments are read from the mask exactly."""
    import am_utils.attention as attention

    mask = _packed(docs)
    batch = 3 if len(docs) == 1 else len(docs)  # one mask row broadcast over 3 batch rows
    q, k, v = (t.requires_grad_() for t in _qkv(batch=batch, q_len=12, kv_len=12))
    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append((args[0].shape[:3], kwargs.get("attn_mask"), kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    out = _kernel("sdpa")(q, k, v, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = _reference(q, k, v, mask, D**-0.5)
    (want * weights).sum().backward()
    for a, b in zip(got, [want.detach()] + [t.grad for t in (q, k, v)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    bounds = [[0, *torch.tensor(row).cumsum(0).tolist()] for row in docs]
    assert attention._causal_segments(mask, 12, 12) == bounds
    sizes = [e - s for row in bounds for s, e in zip(row, row[1:], strict=False)]
    assert [c[0][2] for c in calls] == sizes  # one call per document, its length of queries
    assert all(m is None and causal for _, m, causal in calls)


@pytest.mark.parametrize(
    "case", ["padded", "reappearing", "not causal", "additive", "decode", "window"]
)
def test_other_masks_keep_the_dense_sdpa_call(case):
    """Only an exact packed-documents mask is split: every other pattern is one dense call,
    equal to the reference."""
    import am_utils.attention as attention

    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 0]])  # document 0 comes back: one mask over both
    masks = {
        "padded": build_attention_mask(6, 6, torch.tensor([[0, 1, 1, 1, 1, 1]]).bool(), None),
        "reappearing": build_attention_mask(6, 6, None, seq_idx),
        "not causal": torch.ones(1, 1, 6, 6, dtype=torch.bool),
        "additive": to_additive_mask(_packed([[2, 4]]), torch.float64),
        "decode": torch.ones(1, 1, 1, 6, dtype=torch.bool),
        "window": _packed([[2, 4]]),
    }
    mask = masks[case]
    q_len = mask.shape[2]
    assert attention._causal_segments(mask, q_len, 6) is None or case == "window"
    window = 2 if case == "window" else None
    q, k, v = _qkv(batch=1, q_len=q_len, kv_len=6)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if window is not None:
        allowed = allowed & causal_mask(q_len, 6, sliding_window=window)
    with torch.no_grad():
        got = _kernel("sdpa", sliding_window=window)(q, k, v, mask)
    torch.testing.assert_close(got, _reference(q, k, v, allowed, D**-0.5), rtol=1e-10, atol=1e-10)
