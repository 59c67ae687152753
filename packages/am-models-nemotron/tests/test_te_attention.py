"""attn='te' glue (bshd and packed / padded THD) against an emulation of Transformer Engine.

There is no transformer_engine (and no CUDA) here, so the shared emulation
`am_dtype.fake_te` stands in for it: written from the documented contract of TE's
`DotProductAttention` ("bshd"/"sbhd" with causal alignments, "thd" with int32 `cu_seqlens_q/kv`
and a "padding*" mask type), it checks what it is given (layout, rank, head counts, head size,
dtypes, cu_seqlens bounds, max_seqlen covering every sequence) and fails on anything else. So
these tests prove that the model hands TE the documented layout and boundaries and that the
result equals the sdpa path. They cannot prove TE's kernels (needs CUDA; see test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _nemotron_helpers import cpu_backend, rel_err, tiny_config

from am_dtype.fake_te import install_fake_transformer_engine
from am_models_nemotron import NemotronHForCausalLM
from am_utils.attention import build_varlen_seqs

LENGTHS = (7, 12, 5)  # 12 > chunk_size: a boundary falls inside a Mamba chunk


@pytest.fixture
def fake_te(monkeypatch):
    """The shared TE emulation (am_dtype.fake_te); returns its log of attention calls."""
    return install_fake_transformer_engine(monkeypatch).attention_calls


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def models(fake_te):
    """(sdpa, te) tiny models with the same fp32 weights, and the TE call log."""
    torch.manual_seed(0)
    sdpa = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    sdpa.initialize_weights(dtype=torch.float32)
    te = NemotronHForCausalLM(tiny_config(), backend=cpu_backend(attn="te"))
    te.load_state_dict(sdpa.state_dict())
    attn = [b.mixer for b in te.model.layers.values() if b.block_type == "attention"]
    assert attn and all(type(m.attn.te_attn).__module__ == "am_dtype.fake_te" for m in attn)
    return sdpa.eval(), te.eval(), fake_te


def _sequences():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (1, n), generator=gen) for n in LENGTHS]


def _cu_seqlens():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def _packing(how):
    if how == "cu_seqlens":
        return {"cu_seqlens": _cu_seqlens()}
    return {"seq_idx": torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- packed (THD)


@pytest.mark.parametrize("how", ["cu_seqlens", "seq_idx"])
def test_packed_batch_te_equals_sdpa_and_each_sequence_alone(models, how):
    sdpa, te, calls = models
    seqs = _sequences()
    packed = torch.cat(seqs, dim=1)
    with torch.no_grad():
        ref = sdpa(packed, **_packing(how)).logits
        calls.clear()
        got = te(packed, **_packing(how)).logits
        thd_calls = list(calls)
        alone = [te(s).logits for s in seqs]
        leaky = te(packed).logits  # no boundaries: later sequences see earlier ones
    assert rel_err(got, ref) <= 1e-5
    for part, one in zip(got.split(LENGTHS, dim=1), alone, strict=True):
        assert rel_err(part, one) <= 1e-4
    assert rel_err(leaky.split(LENGTHS, dim=1)[1], alone[1]) > 1e-3
    # One attention layer in the tiny pattern: one THD call with the documented arguments.
    (call,) = thd_calls
    assert call["qkv_format"] == "thd" and call["attn_mask_type"] == "padding_causal"
    assert call["q"] == (sum(LENGTHS), 4, 8) and call["k"] == (sum(LENGTHS), 2, 8)
    assert call["cu_q"] == call["cu_kv"] == [0, 7, 19, 24]
    assert call["max_q"] == call["max_kv"] == 12


def test_packed_gradients_te_equal_sdpa_and_separate_sequences(models):
    sdpa, te, _ = models
    seqs = _sequences()
    packed, cu = torch.cat(seqs, dim=1), _cu_seqlens()
    grads = []
    for model in (sdpa, te):
        model.zero_grad()
        model(packed, cu_seqlens=cu).logits.square().mean().mul(sum(LENGTHS)).backward()
        grads.append(_grads(model))
    te.zero_grad()
    for s in seqs:
        te(s).logits.square().mean().mul(s.shape[1]).backward()
    separate = _grads(te)
    assert grads[0].keys() == grads[1].keys() == separate.keys()
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) <= 1e-5, name
        assert rel_err(grads[1][name], separate[name]) <= 1e-4, name


def test_qkv_format_thd_with_te_runs(models):
    """The old NotImplementedError for qkv_format='thd' with attn='te' is gone."""
    sdpa, te, calls = models
    packed, cu = torch.cat(_sequences(), dim=1), _cu_seqlens()
    with torch.no_grad():
        ref = sdpa(packed, cu_seqlens=cu).logits
        batched = te(packed, qkv_format="thd", cu_seqlens=cu, max_seqlen=12).logits
        squeezed = te(packed[0], qkv_format="thd", cu_seqlens=cu).logits  # [T] tokens
    assert squeezed.shape == (sum(LENGTHS), 64)
    assert rel_err(batched, ref) <= 1e-5
    assert rel_err(squeezed, ref[0]) <= 1e-5
    assert [c["qkv_format"] for c in calls] == ["thd", "thd"]


def test_cu_seqlens_must_cover_every_token_of_the_batch(models):
    # cu_seqlens ends at the token count (issue 8): a shorter one is an error on every backend.
    sdpa, te, _ = models
    packed, cu = torch.cat(_sequences(), dim=1), _cu_seqlens()[:-1]  # [0, 7, 19] for 24 tokens
    for model in (sdpa, te):
        with pytest.raises(ValueError, match=r"end at the 24 tokens.*\[0, 7, 19\]"):
            model(packed, cu_seqlens=cu)


def test_rows_of_packed_sequences_with_padding(models):
    """seq_idx [B, S] with padding: each (row, run) is one THD sequence of its real tokens."""
    sdpa, te, calls = models
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 8:] = True  # right padding inside the second row's last sequence
    kwargs = {"seq_idx": seq_idx, "padding_mask": padding}
    with torch.no_grad():
        got, ref = te(ids, **kwargs).logits, sdpa(ids, **kwargs).logits
    real = ~padding
    assert rel_err(got[real], ref[real]) <= 1e-5
    assert calls[-1]["cu_q"] == [0, 4, 10, 17, 18] and calls[-1]["q"][0] == 18


def test_seq_idx_that_is_not_one_run_per_sequence_is_rejected(models):
    _, te, _ = models
    ids = torch.randint(0, 64, (1, 6))
    with pytest.raises(ValueError, match="contiguous run"):
        te(ids, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0]]))


# --------------------------------------------------------------------------- unpacked and padded


def test_unpacked_training_batch_te_equals_sdpa(models):
    sdpa, te, calls = models
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for model in (sdpa.train(), te.train()):
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), _grads(model)))
    assert torch.allclose(out[1][0], out[0][0], rtol=1e-6, atol=0)
    for name, grad in out[0][1].items():
        assert rel_err(out[1][1][name], grad) <= 1e-5, name
    assert {(c["qkv_format"], c["attn_mask_type"]) for c in calls} == {
        ("bshd", "causal_bottom_right")
    }
    assert calls[0]["q"] == (2, 16, 4, 8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_training_batch_goes_through_thd(models, side):
    sdpa, te, calls = models
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    if side == "left":
        mask[1, :5], mask[2, :2] = 0, 0
    else:
        mask[1, 7:], mask[2, 10:] = 0, 0
    real = mask.bool()
    # Only real positions predict real tokens (a left pad's output differs by backend: te
    # leaves padded query rows out, sdpa lets them attend everywhere; neither is used).
    labels = ids.masked_fill(~(real & F.pad(real[:, :-1], (1, 0), value=True)), -100)
    out = []
    for model in (sdpa.train(), te.train()):
        model.zero_grad()
        result = model(ids, attention_mask=mask, labels=labels)
        result.loss.backward()
        out.append((result, _grads(model)))
    assert rel_err(out[1][0].logits[real], out[0][0].logits[real]) <= 1e-5
    assert torch.allclose(out[1][0].loss, out[0][0].loss, rtol=1e-6, atol=0)
    for name, grad in out[0][1].items():
        assert rel_err(out[1][1][name], grad) <= 1e-5, name
    call = calls[-1]
    assert call["qkv_format"] == "thd" and call["attn_mask_type"] == "padding_causal"
    assert call["cu_q"] == call["cu_kv"] == [0, 12, 19, 29] and call["q"][0] == 29


def test_generation_te_equals_sdpa_unpadded_and_left_padded(models):
    sdpa, te, calls = models
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = te.generate(ids, max_new_tokens=5, do_sample=False)
        b = sdpa.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    # Unpadded decode keeps the bshd causal_bottom_right path: 1 query over the cache.
    assert {c["qkv_format"] for c in calls} == {"bshd"}
    assert calls[-1]["q"][1] == 1 and calls[-1]["k"][1] == 10
    calls.clear()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        a = te.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        b = sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert calls[0]["attn_mask_type"] == "padding_causal" and calls[0]["cu_q"] == [0, 4, 10]
    last = calls[-1]
    assert last["attn_mask_type"] == "padding_causal_bottom_right"
    assert last["cu_q"] == [0, 1, 2] and last["cu_kv"] == [0, 8, 18]


def test_explicit_4d_mask_is_rejected_with_what_is_accepted(models):
    _, te, _ = models
    ids = torch.randint(0, 64, (1, 5))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="cu_seqlens or seq_idx.*attention_mask or padding_mask"):
        te(ids, attention_mask=mask)


# --------------------------------------------------------------------------- the emulation itself


def test_emulation_rejects_wrong_layouts_and_dtypes(fake_te):
    import transformer_engine.pytorch as fake

    dpa = fake.DotProductAttention(
        4, 8, num_gqa_groups=2, attn_mask_type="causal_bottom_right", qkv_format="bshd"
    )
    q, kv = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    thd = {"qkv_format": "thd", "attn_mask_type": "padding_causal"}
    assert dpa(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_kv=cu, **thd).shape == (6, 32)
    bad = [
        ((q[None], kv[None], kv[None]), {"cu_seqlens_q": cu, "cu_seqlens_kv": cu, **thd}),  # 4D
        ((q, kv, kv), {"cu_seqlens_q": cu.long(), "cu_seqlens_kv": cu.long(), **thd}),  # int64
        ((q, kv, kv), {"cu_seqlens_q": cu, "cu_seqlens_kv": cu, "qkv_format": "thd"}),  # causal
        ((q.transpose(1, 2), kv, kv), {"cu_seqlens_q": cu, "cu_seqlens_kv": cu, **thd}),  # [T,D,H]
        ((q, kv, kv), {"cu_seqlens_q": cu, "cu_seqlens_kv": cu, "max_seqlen_q": 3, **thd}),
        ((q, kv, kv), {}),  # 3D under the bshd default
    ]
    for args, kwargs in bad:
        with pytest.raises(AssertionError):
            dpa(*args, **kwargs)


def test_build_varlen_seqs_is_none_for_plain_causal():
    assert build_varlen_seqs(8, 8, 2, None, None) is None
