"""apply_rotary_pos_emb: transformers' numbers on the PyTorch path and through TE's fused
kernel, the latter against the shared emulation (`am_dtype.fake_te`) of TE's documented
`apply_rotary_pos_emb(t, freqs, tensor_format, interleaved, fused, ...)` (no TE or CUDA here)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

import am_utils.rope as rope
from am_dtype.fake_te import install_fake_transformer_engine
from am_utils.rope import apply_rotary_pos_emb, rotate_half

B, H, S, D = 2, 3, 7, 8


def _cos_sin(positions, dim=D, dtype=torch.float64, scaling=1.0):
    config = LlamaConfig(hidden_size=dim * H, num_attention_heads=H, head_dim=dim)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=dtype)
    cos, sin = rotary(x, positions)
    return cos * scaling, sin * scaling


def _qk(layout="bhsd", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
    q = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    return q, k


SAME_POSITIONS = torch.arange(S).expand(B, S)
OWN_POSITIONS = torch.stack([torch.arange(S), torch.arange(S) + 5])  # a decoding offset


def _close(ours, ref, tol=1e-12):
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_plain_path_equals_transformers_values_and_grads(unsqueeze_dim, scaling):
    cos, sin = _cos_sin(OWN_POSITIONS, scaling=scaling)
    q, k = _qk("bhsd" if unsqueeze_dim == 1 else "bshd")
    ours = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    ref = hf_apply(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    _close(ours, ref)
    probe = torch.randn_like(q)
    g_ours = torch.autograd.grad(((ours[0] + ours[1]) * probe).sum(), (q, k))
    g_ref = torch.autograd.grad(((ref[0] + ref[1]) * probe).sum(), (q, k))
    _close(g_ours, g_ref)


def test_positional_call_as_transformers_makes_it():
    cos, sin = _cos_sin(SAME_POSITIONS)
    q, k = _qk()
    _close(apply_rotary_pos_emb(q, k, cos, sin, None, 1), hf_apply(q, k, cos, sin))


def test_partial_rotary_rotates_the_first_dims_only():
    cos, sin = _cos_sin(SAME_POSITIONS, dim=4)
    q, k = _qk()
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    ref_q, ref_k = hf_apply(q[..., :4], k[..., :4], cos, sin)
    _close((rq[..., :4], rk[..., :4]), (ref_q, ref_k))
    _close((rq[..., 4:], rk[..., 4:]), (q[..., 4:], k[..., 4:]))


def test_rotate_half():
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]


def test_bad_arguments_are_rejected():
    cos, sin = _cos_sin(SAME_POSITIONS)
    q, k = _qk()
    with pytest.raises(ValueError, match="unsqueeze_dim=3 is not supported"):
        apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="even number of dims"):
        apply_rotary_pos_emb(q, k, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="head_dim=8"):
        apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    with pytest.raises(ValueError, match="must match"):
        apply_rotary_pos_emb(q, k, cos, sin[..., :4])


# --------------------------------------------------------------------------- fused (emulated TE)


@pytest.fixture
def fake_te_rope(monkeypatch):
    """The shared fake TE (am_dtype.fake_te); returns its log of fused RoPE calls."""
    return install_fake_transformer_engine(monkeypatch).rope_calls


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
@pytest.mark.parametrize("positions", ["same", "own"])
def test_fused_path_equals_transformers(fake_te_rope, unsqueeze_dim, scaling, positions):
    pos = SAME_POSITIONS[:1] if positions == "same" else OWN_POSITIONS
    cos, sin = _cos_sin(pos, scaling=scaling, dtype=torch.float32)
    q, k = _qk("bhsd" if unsqueeze_dim == 1 else "bshd", dtype=torch.float32)
    ours = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, fused=True)
    ref = hf_apply(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    _close(ours, ref, tol=2e-6)
    # One TE call per tensor when every row shares its positions, else one per row.
    per_tensor = 1 if positions == "same" else B
    assert len(fake_te_rope) == 2 * per_tensor
    assert all(c["format"] == "bshd" and c["fused"] for c in fake_te_rope)
    probe = torch.randn_like(q)
    g_ours = torch.autograd.grad(((ours[0] + ours[1]) * probe).sum(), (q, k))
    g_ref = torch.autograd.grad(((ref[0] + ref[1]) * probe).sum(), (q, k))
    _close(g_ours, g_ref, tol=2e-6)


def test_fused_partial_rotary(fake_te_rope):
    cos, sin = _cos_sin(SAME_POSITIONS, dim=4, dtype=torch.float32)
    q, k = _qk(dtype=torch.float32)
    _close(
        apply_rotary_pos_emb(q, k, cos, sin, fused=True),
        apply_rotary_pos_emb(q, k, cos, sin),
        tol=2e-6,
    )


def test_fused_without_transformer_engine_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(rope, "_te_installed", lambda: False)
    cos, sin = _cos_sin(SAME_POSITIONS)
    q, k = _qk()
    with pytest.raises(ImportError, match=r"fused RoPE kernel.*am-dtype\[te\].*rope_fusion=False"):
        apply_rotary_pos_emb(q, k, cos, sin, fused=True)


def test_equals_transformers_gemma4_rotary_per_tensor():
    # Gemma 4 (the next model) applies the rotation to one tensor at a time.
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb as gemma4_apply

    cos, sin = _cos_sin(OWN_POSITIONS)
    q, k = _qk("bshd")
    ours = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    _close(ours, (gemma4_apply(q, cos, sin, 2), gemma4_apply(k, cos, sin, 2)))


def test_hand_written_rotation_backward_is_used_and_matches_autograd(monkeypatch):
    """Constant cos/sin go through `_Rotate` (two passes each way); its values and gradients
    equal autograd's composition, mixed dtypes included; cos/sin that need gradients take
    the autograd path and get them."""
    calls = []
    apply = rope._Rotate.apply
    monkeypatch.setattr(rope._Rotate, "apply", lambda *a: calls.append(1) or apply(*a))
    cos, sin = _cos_sin(OWN_POSITIONS, dtype=torch.float32, scaling=0.7)
    for x_dtype in (torch.float32, torch.bfloat16):
        q, k = _qk("bshd", dtype=x_dtype)
        calls.clear()
        ours = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        assert len(calls) == 2
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        ref = [t * c + rotate_half(t) * s for t in (q, k)]
        probe = torch.randn(ours[0].shape)
        g_ours = torch.autograd.grad(((ours[0] + 2 * ours[1]) * probe).sum(), (q, k))
        g_ref = torch.autograd.grad(((ref[0] + 2 * ref[1]) * probe).sum(), (q, k))
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        # bf16 inputs: autograd rounds each branch's gradient to bf16 before adding them,
        # ours adds in fp32 and rounds once.
        tol = 1e-6 if x_dtype == torch.float32 else 2e-2
        for a, b in zip(g_ours, g_ref, strict=True):
            assert a.dtype == b.dtype == x_dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    cos = cos.clone().requires_grad_(True)
    q, k = _qk("bshd", dtype=torch.float32)
    calls.clear()
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    (rq.sum() + rk.sum()).backward()
    assert not calls and cos.grad is not None and cos.grad.abs().sum() > 0
