"""Every BackendConfig field Gemma 4 receives is honoured (or rejected with the reason).

The attention kernels sdpa / eager / flex run here for real. For what needs Transformer
Engine and CUDA (attn="te", linear="te", rope_fusion=True, te_fp8: what `BackendConfig()`
gives on a CUDA machine with TE) the shared fake `transformer_engine` (`am_dtype.fake_te`)
is installed, written from the
documented contracts of TE's `DotProductAttention` ("bshd" with "causal_bottom_right",
"thd" with cu_seqlens and "padding_causal[_bottom_right]", `window_size=(W - 1, 0)`),
`Linear`, `apply_rotary_pos_emb(t, freqs, tensor_format="bshd", fused=True)` and
`autocast(enabled, recipe)`: plain PyTorch math that records what it was handed. It proves
the model hands TE the documented layouts and runs under FP8 autocast, not TE's kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gemma4_helpers import (
    TEXT_VOCAB,
    cpu_backend,
    gemma4_config,
    randomize_hf,
    rel_err,
    tiny_moe_text,
)
from transformers import Gemma4ForConditionalGeneration as HFGemma4

from am_dtype import TEFp8Config
from am_dtype.backend import BackendConfig
from am_dtype.fake_te import install_fake_transformer_engine
from am_models_gemma4 import Gemma4ForConditionalGeneration


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize_hf(HFGemma4(gemma4_config(tiny_moe_text()))).eval()
    path = tmp_path_factory.mktemp("hf_gemma4_backend")
    hf.save_pretrained(path)
    return hf, path


def _ids(seed=1, batch=2, seq=15):
    return torch.randint(0, TEXT_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- real kernels


@pytest.mark.parametrize("attn", ["eager", "flex"])
def test_eager_and_flex_kernels_match_transformers_with_padding(saved, attn):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=cpu_backend(attn=attn))
    assert all(layer.self_attn.kernel.backend == attn for layer in ours.model.layers)
    ids = _ids(seed=4, seq=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert rel_err(out[0], ref[0]) <= 1e-5
    assert rel_err(out[1, 4:], ref[1, 4:]) <= 1e-5


def test_gate_precision_and_fake_balanced_gate_reach_the_moe_blocks(saved):
    _, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(
        path, backend=cpu_backend(gate_precision="float64")
    )
    seen = []
    original = F.linear

    def spy(x, w, b=None):
        seen.append(x.dtype)
        return original(x, w, b)

    gate = ours.model.layers[0].moe.gate
    assert gate.precision is torch.float64
    x = torch.randn(5, 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", spy)
        weights, _, _ = gate(x)
    assert seen == [torch.float64] and weights.dtype == torch.float32
    fake = Gemma4ForConditionalGeneration(
        gemma4_config(tiny_moe_text()), backend=cpu_backend(fake_balanced_gate=True)
    )
    assert type(fake.model.layers[0].moe.gate).__name__ == "FakeBalancedGate"


# --------------------------------------------------------------------------- fake TE


@pytest.fixture
def fake_te(monkeypatch):
    """The shared fake TE (am_dtype.fake_te) with CUDA 'present'."""
    return install_fake_transformer_engine(monkeypatch, cuda=True)


def _attention_kinds(fake) -> set[str]:
    return {f"{c['qkv_format']}:{c['attn_mask_type']}" for c in fake.attention_calls}


def _cuda_default(**overrides) -> BackendConfig:
    """What `BackendConfig()` holds on a CUDA machine with TE (its defaults are fixed at
    import, where there is no TE here)."""
    values = dict(attn="te", linear="te", rope_fusion=True)
    values.update(overrides)
    return BackendConfig(**values)


def test_the_cuda_default_backend_runs_and_equals_transformers(saved, fake_te):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=_cuda_default())
    ours.train()
    layer = ours.model.layers[0]
    te_linear = fake_te.pytorch.Linear
    assert isinstance(layer.self_attn.q_proj, te_linear)
    assert isinstance(layer.mlp.down_proj, te_linear)
    ids = _ids(seed=2)  # 15 tokens > sliding window 6
    out = ours(ids, labels=ids, use_cache=False)
    ref = hf.train()(ids, labels=ids, use_cache=False)
    hf.eval()
    assert rel_err(out.logits, ref.logits) <= 1e-5
    out.loss.backward()
    ref.loss.backward()
    mapped = ours.state_dict_adapter.from_hf(_grads(hf))
    hf.zero_grad()
    for name, grad in _grads(ours).items():
        assert rel_err(grad, mapped[name]) <= 1e-4, name
    assert _attention_kinds(fake_te) == {"bshd:causal_bottom_right"}
    # Sliding layers hand TE the window as (W - 1, 0); full layers no window.
    assert {c["window_size"] for c in fake_te.attention_calls} == {(5, 0), None}
    assert fake_te.rope_calls and all(
        c["fused"] and c["format"] == "bshd" for c in fake_te.rope_calls
    )


def test_te_attention_takes_a_padded_batch_as_boundaries_and_decodes(saved, fake_te):
    hf, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=_cuda_default())
    ids = _ids(seed=4, seq=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    assert rel_err(out[0], ref[0]) <= 1e-5
    assert rel_err(out[1, 4:], ref[1, 4:]) <= 1e-5
    assert "thd:padding_causal" in _attention_kinds(fake_te)
    prompt = _ids(seed=5, seq=5)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False)
        got = ours.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)  # 15 tokens: the sliding cache is past its window


def test_te_attention_rejects_patterns_it_cannot_express(saved, fake_te):
    _, path = saved
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=_cuda_default())
    ids = _ids(seed=6, seq=12)
    packed = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    packed[..., :6, :6] = torch.ones(6, 6).tril().bool()
    packed[..., 6:, 6:] = torch.ones(6, 6).tril().bool()  # two documents
    with pytest.raises(ValueError, match="attn='te'.*attn='sdpa'"):
        ours(ids[:1], attention_mask=packed)


def test_te_fp8_runs_the_forward_under_fp8_autocast(saved, fake_te):
    state, linear_calls, recipe = fake_te.fp8_state, fake_te.linear_fp8, fake_te.recipe
    hf, path = saved
    backend = _cuda_default(te_fp8=TEFp8Config("current"))
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids = _ids(seed=7)
    out = ours(ids, labels=ids)
    assert len(linear_calls) >= 4 * 6  # q/k(/v)/o + 3 MLP projections per layer
    assert all(enabled for enabled, _ in linear_calls)
    assert all(type(r) is recipe.Float8CurrentScaling for _, r in linear_calls)
    assert state["enabled"] is False and state["recipe"] is None
    with torch.no_grad():
        assert rel_err(out.logits, hf(ids).logits) <= 1e-5
    linear_calls.clear()
    Gemma4ForConditionalGeneration.from_pretrained(path, backend=_cuda_default())(ids)
    assert linear_calls and not any(enabled for enabled, _ in linear_calls)
