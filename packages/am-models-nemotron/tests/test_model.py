"""Model plumbing: block table, construction errors, init, gradient checkpointing, PP trimming."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _nemotron_helpers import cpu_backend, rel_err, tiny_config
from transformers import NemotronHConfig

from am_models_nemotron import NemotronHForCausalLM, NemotronV3Model, resolve_block_types


def _model(**kwargs):
    torch.manual_seed(0)
    m = NemotronHForCausalLM(tiny_config(**kwargs), backend=cpu_backend())
    m.initialize_weights(dtype=torch.float32)
    return m


def test_block_types_from_names_or_pattern_characters():
    names = SimpleNamespace(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"])
    chars = SimpleNamespace(layers_block_type=None, hybrid_override_pattern="ME*-")
    expected = ["mamba", "moe", "attention", "mlp"]
    assert resolve_block_types(names) == resolve_block_types(chars) == expected
    legacy = NemotronHConfig(hybrid_override_pattern="M*E-", vocab_size=8)
    assert resolve_block_types(legacy) == ["mamba", "attention", "moe", "mlp"]
    with pytest.raises(ValueError, match=r"unknown Nemotron-H block type 'X'.*accepted"):
        resolve_block_types(SimpleNamespace(layers_block_type=None, hybrid_override_pattern="MX"))


def test_construction_rejects_bad_arguments():
    with pytest.raises(ValueError, match="moe_overrides has unknown keys \\['n_experts'\\]"):
        NemotronV3Model(tiny_config(), cpu_backend(), moe_overrides={"n_experts": 3})
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        NemotronHForCausalLM(tiny_config(), cpu_backend(), bogus=1)


def test_moe_overrides_reach_the_moe_blocks():
    m = NemotronV3Model(tiny_config(), cpu_backend(), moe_overrides={"route_scale": 3.0})
    assert m.moe_config.route_scale == 3.0
    assert m.layers["1"].mixer.gate.route_scale == 3.0


def test_initialize_weights_samples_in_fp32_and_casts_keeping_fp32_bias():
    torch.manual_seed(0)
    m = NemotronHForCausalLM(tiny_config(hidden_size=64), backend=cpu_backend())
    m.initialize_weights(dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    gate = m.model.layers["1"].mixer.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert not gate.e_score_correction_bias.any()
    assert abs(m.model.embed_tokens.weight.float().std().item() - 0.02) < 0.003
    mamba = m.model.layers["0"].mixer
    assert torch.allclose(mamba.A_log.float(), torch.log(torch.arange(1.0, 5.0)), rtol=1e-2)
    assert torch.all(m.model.layers["0"].norm.weight == 1)
    experts = m.model.layers["1"].mixer.experts.gate_and_up_projs
    assert 0.015 < experts.float().std().item() < 0.025


def test_initialize_weights_skips_parts_removed_by_a_pipeline_split():
    m = _model()
    m.lm_head = None
    m.model.embed_tokens = None
    m.model.norm = None
    m.initialize_weights(dtype=torch.float32)  # must not touch the missing parts
    assert m._is_pipeline_parallel_stage()


def test_gradient_checkpointing_is_idempotent_and_exact():
    m = _model()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    m(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    keys = set(m.state_dict())
    m.zero_grad()
    m.gradient_checkpointing_enable()
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    wrapped = m.model.layers["0"]
    assert wrapped._checkpoint_wrapped_module.block_type == "mamba"
    assert set(m.state_dict()) == keys
    m(ids, labels=ids).loss.backward()
    for name, param in m.named_parameters():
        clean = name.replace("._checkpoint_wrapped_module", "")
        assert rel_err(param.grad, plain[clean]) <= 1e-6, name
    m.gradient_checkpointing_disable()
    m.gradient_checkpointing_disable()
    assert not m.is_gradient_checkpointing
    assert set(dict(m.named_parameters())) == set(plain)


def test_logits_to_keep_and_pipeline_hidden_state_input():
    m = _model().eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids).logits
        last = m(ids, logits_to_keep=1).logits
        h = m.model.embed_tokens(ids)
        embed = m.model.embed_tokens
        m.model.embed_tokens = None  # a non-first stage: hidden states arrive as input_ids
        staged = m(h)
        m.model.embed_tokens = embed
    assert last.shape == (2, 1, 64) and rel_err(last, full[:, -1:]) <= 1e-6
    assert rel_err(staged, full) <= 1e-6
    with pytest.raises(ValueError, match="embed_tokens: input_ids must be the upstream"):
        m.model.embed_tokens = None
        m.model(ids)
