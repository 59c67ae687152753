"""Every BackendConfig field Gemma 4 receives is honoured (or rejected with the reason).

The attention kernels sdpa / eager / flex run here for real. For what needs Transformer
Engine and CUDA (attn="te", linear="te", rope_fusion=True, te_fp8: what `BackendConfig()`
gives on a CUDA machine with TE) a fake `transformer_engine` is installed, written from the
documented contracts of TE's `DotProductAttention` ("bshd" with "causal_bottom_right",
"thd" with cu_seqlens and "padding_causal[_bottom_right]", `window_size=(W - 1, 0)`),
`Linear`, `apply_rotary_pos_emb(t, freqs, tensor_format="bshd", fused=True)` and
`autocast(enabled, recipe)`: plain PyTorch math that records what it was handed. It proves
the model hands TE the documented layouts and runs under FP8 autocast, not TE's kernels.
"""

from __future__ import annotations

import contextlib
import sys
import types

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
from torch import nn
from transformers import Gemma4ForConditionalGeneration as HFGemma4

import am_dtype.backend as am_backend
import am_dtype.fp8 as am_fp8
import am_utils.rope as am_rope
from am_dtype import TEFp8Config
from am_dtype.backend import BackendConfig
from am_models_gemma4 import Gemma4ForConditionalGeneration

RECIPE_MODULE = "transformer_engine.common.recipe"


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


def _attend(q, k, v, scale, bottom_right, window_left):
    """One sequence: q [Sq, H, D], k/v [Sk, G, D] -> [Sq, H * D], TE's causal alignment."""
    heads, groups = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    k = k.repeat_interleave(heads // groups, dim=0)
    v = v.repeat_interleave(heads // groups, dim=0)
    sq, sk = q.shape[1], k.shape[1]
    offset = sk - sq if bottom_right else 0
    qpos = torch.arange(sq)[:, None] + offset
    kpos = torch.arange(sk)[None, :]
    mask = kpos <= qpos
    if window_left is not None:
        mask &= kpos >= qpos - window_left
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(sq, -1)


class _FakeDotProductAttention(nn.Module):
    calls: list[str] = []

    def __init__(
        self,
        num_attention_heads,
        kv_channels,
        num_gqa_groups=None,
        attention_dropout=0.0,
        attn_mask_type="causal",
        qkv_format="sbhd",
        softmax_scale=None,
        window_size=None,
    ):
        super().__init__()
        self.heads, self.head_dim = num_attention_heads, kv_channels
        self.groups = num_gqa_groups or num_attention_heads
        self.mask_type, self.format = attn_mask_type, qkv_format
        self.scale = softmax_scale if softmax_scale is not None else kv_channels**-0.5
        assert window_size is None or window_size[1] == 0
        self.window_left = window_size[0] if window_size is not None else None

    def forward(self, q, k, v, qkv_format=None, attn_mask_type=None, **seqs):
        fmt, mask_type = qkv_format or self.format, attn_mask_type or self.mask_type
        assert q.shape[-2:] == (self.heads, self.head_dim), q.shape
        assert k.shape[-2] == v.shape[-2] == self.groups
        bottom_right = mask_type.endswith("bottom_right")
        self.calls.append(f"{fmt}:{mask_type}")
        if fmt == "bshd":
            assert q.dim() == 4 and mask_type == "causal_bottom_right" and not seqs
            rows = [
                _attend(q[b], k[b], v[b], self.scale, bottom_right, self.window_left)
                for b in range(q.shape[0])
            ]
            return torch.stack(rows)
        assert fmt == "thd" and q.dim() == 3 and mask_type.startswith("padding_causal")
        cu_q, cu_kv = seqs["cu_seqlens_q"], seqs["cu_seqlens_kv"]
        assert cu_q.dtype == cu_kv.dtype == torch.int32 and cu_q.shape == cu_kv.shape
        assert int(cu_q[-1]) == q.shape[0] and int(cu_kv[-1]) == k.shape[0]
        outs = []
        for i in range(cu_q.numel() - 1):
            a, b = int(cu_q[i]), int(cu_q[i + 1])
            c, d = int(cu_kv[i]), int(cu_kv[i + 1])
            assert b - a <= seqs["max_seqlen_q"] and d - c <= seqs["max_seqlen_kv"]
            outs.append(_attend(q[a:b], k[c:d], v[c:d], self.scale, bottom_right, self.window_left))
        return torch.cat(outs)


@pytest.fixture
def fake_te(monkeypatch):
    """A fake TE with CUDA 'present'; returns (autocast state, te.Linear call log, recipes)."""
    state = {"enabled": False, "recipe": None}
    linear_calls: list = []

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, params_dtype=None):
            super().__init__(
                in_features, out_features, bias=bias, device=device, dtype=params_dtype
            )

        def forward(self, inp, is_first_microbatch=None):
            linear_calls.append((state["enabled"], state["recipe"]))
            return super().forward(inp)

    @contextlib.contextmanager
    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
        outer = dict(state)
        state.update(enabled=enabled, recipe=recipe)
        try:
            yield
        finally:
            state.update(outer)

    def apply_rotary_pos_emb(t, freqs, tensor_format="bshd", fused=False, **_):
        assert tensor_format == "bshd" and fused and freqs.dim() == 4
        rot = freqs.shape[-1]
        cos, sin = freqs.cos()[None, :, :, 0], freqs.sin()[None, :, :, 0]
        head, tail = t[..., :rot], t[..., rot:]
        x1, x2 = head.chunk(2, dim=-1)
        return torch.cat((head * cos + torch.cat((-x2, x1), dim=-1) * sin, tail), dim=-1)

    root = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    attention = types.ModuleType("transformer_engine.pytorch.attention")
    rope = types.ModuleType("transformer_engine.pytorch.attention.rope")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType(RECIPE_MODULE)
    pytorch.Linear, pytorch.autocast = Linear, autocast
    pytorch.DotProductAttention = _FakeDotProductAttention
    rope.apply_rotary_pos_emb = apply_rotary_pos_emb
    for name in ("Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"):
        setattr(recipe, name, type(name, (), {"__module__": RECIPE_MODULE}))
    root.pytorch, pytorch.attention, attention.rope = pytorch, attention, rope
    root.common, common.recipe = common, recipe
    for mod in (root, pytorch, attention, rope, common, recipe):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(am_backend, "HAVE_TE", True)
    monkeypatch.setattr(am_backend, "_CUDA", True)
    monkeypatch.setattr(am_fp8, "HAVE_TE", True)
    monkeypatch.setattr(am_fp8, "_patch_te_modules", am_fp8._make_lazy_te_patcher())
    monkeypatch.setattr(am_rope, "_te_installed", lambda: True)
    monkeypatch.setattr(_FakeDotProductAttention, "calls", [])
    return state, linear_calls, recipe


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
    te_linear = sys.modules["transformer_engine.pytorch"].Linear
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
    assert set(_FakeDotProductAttention.calls) == {"bshd:causal_bottom_right"}


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
    assert "thd:padding_causal" in _FakeDotProductAttention.calls
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
    state, linear_calls, recipe = fake_te
    hf, path = saved
    backend = _cuda_default(te_fp8=TEFp8Config("current"))
    ours = Gemma4ForConditionalGeneration.from_pretrained(path, backend=backend)
    ids = _ids(seed=7)
    out = ours(ids, labels=ids)
    assert len(linear_calls) >= 4 * 6  # q/k(/v)/o + 3 MLP projections per layer
    assert all(enabled for enabled, _ in linear_calls)
    assert all(type(r) is recipe.Float8CurrentScaling for _, r in linear_calls)
    assert state == {"enabled": False, "recipe": None}
    with torch.no_grad():
        assert rel_err(out.logits, hf(ids).logits) <= 1e-5
    linear_calls.clear()
    Gemma4ForConditionalGeneration.from_pretrained(path, backend=_cuda_default())(ids)
    assert linear_calls and not any(enabled for enabled, _ in linear_calls)
