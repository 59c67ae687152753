"""The model on the shared plumbing: init whatever linear class is built, compile_attn, dtypes."""

from __future__ import annotations

import functools

import pytest
import torch
from _nemotron_helpers import cpu_backend, tiny_config

import am_dtype.backend as am_backend
from am_dtype.fake_te import install_fake_transformer_engine
from am_models_nemotron import NemotronHForCausalLM

SENTINEL = 7.0  # what the stand-in's parameters hold until someone initializes them


@pytest.fixture
def te_linear(monkeypatch):
    """The shared fake TE, its `te.Linear` holding SENTINEL until someone initializes it."""
    fake = install_fake_transformer_engine(monkeypatch)

    class SentinelLinear(fake.pytorch.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with torch.no_grad():
                for p in self.parameters():
                    p.fill_(SENTINEL)

    monkeypatch.setattr(fake.pytorch, "Linear", SentinelLinear)
    return SentinelLinear


@pytest.mark.parametrize("bias", [False, True])
def test_initialize_weights_covers_te_linear_projections(te_linear, bias):
    config = tiny_config(latent=8, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(0)
    ref = NemotronHForCausalLM(config, backend=cpu_backend())
    te = NemotronHForCausalLM(config, backend=cpu_backend(linear="te"))
    projections = [n for n, m in te.named_modules() if isinstance(m, te_linear)]
    # q/k/v/o, the dense MLP, shared experts, latent projections, Mamba in/out, the LM head.
    assert {n.rsplit(".", 1)[-1] for n in projections} >= {
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
        "fc1_latent_proj", "fc2_latent_proj", "in_proj", "out_proj", "lm_head",
    }  # fmt: skip
    for model in (ref, te):
        torch.manual_seed(1)
        model.initialize_weights(dtype=torch.float32)
    ref_state, te_state = ref.state_dict(), te.state_dict()
    assert ref_state.keys() == te_state.keys()
    for name, value in te_state.items():
        assert not (value == SENTINEL).any(), f"{name} was not initialized"
        assert torch.equal(value, ref_state[name]), name  # same recipe, same random draws
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(te(ids).logits, ref(ids).logits, rtol=1e-6, atol=1e-6)


def test_compile_attn_compiles_the_attention_kernel(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch.manual_seed(0)
    eager = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    eager.initialize_weights(dtype=torch.float32)
    compiled = NemotronHForCausalLM(tiny_config(), backend=cpu_backend(compile_attn=True))
    compiled.load_state_dict(eager.state_dict())
    attn = [b.mixer.attn for b in compiled.model.layers.values() if b.block_type == "attention"]
    assert attn and all(a.compiled for a in attn)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        got = compiled(ids).logits
    assert counter.frame_count >= 1  # the kernel call went through torch.compile
    torch.testing.assert_close(got, eager(ids).logits, rtol=0, atol=0)


def test_compile_attn_with_te_is_rejected_at_construction(monkeypatch):
    monkeypatch.setattr(am_backend, "HAVE_TE", True)
    with pytest.raises(ValueError, match="compile_attn=True cannot be combined with attn='te'"):
        cpu_backend(attn="te", compile_attn=True)


def test_bf16_build_keeps_the_correction_bias_fp32():
    model = NemotronHForCausalLM(tiny_config(dtype="bfloat16"), backend=cpu_backend())
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_from_pretrained_accepts_every_dtype_spelling(tmp_path):
    torch.manual_seed(0)
    model = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    model.initialize_weights(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    for spelling in ("bf16", "bfloat16", torch.bfloat16):
        again = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=spelling)
        assert again.lm_head.weight.dtype == torch.bfloat16, spelling
