"""Gemma4Gate / Gemma4MoE against transformers' Gemma4TextRouter / Gemma4TextExperts."""

from __future__ import annotations

import pytest
import torch
from _gemma4_helpers import cpu_backend, gemma4_config, rel_err, tiny_moe_text
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

from am_models_gemma4 import Gemma4Gate, Gemma4MoE, gemma4_moe_config
from am_moe.layers import MoE


def _text_config(**overrides):
    return gemma4_config(tiny_moe_text(**overrides)).text_config


def _random_router(config, seed=0):
    torch.manual_seed(seed)
    router = Gemma4TextRouter(config)
    with torch.no_grad():
        router.proj.weight.normal_(0, 0.3)
        router.scale.copy_(1 + 0.5 * torch.randn(config.hidden_size))
        router.per_expert_scale.copy_(1 + 0.5 * torch.randn(config.num_experts))
    return router


def test_gate_equals_transformers_router_and_its_gradients():
    config = _text_config()
    router = _random_router(config)
    gate = Gemma4Gate(config)
    gate.load_state_dict(router.state_dict())
    x = torch.randn(3, 7, config.hidden_size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights, indices, aux = gate(x)
    _, ref_weights, ref_indices = router(x_ref.reshape(-1, config.hidden_size))
    assert aux is None
    assert torch.equal(indices, ref_indices)
    assert weights.dtype == torch.float32
    assert rel_err(weights, ref_weights) <= 1e-6
    # per-expert scale applied after renormalization: rows do not sum to 1
    assert not torch.allclose(weights.sum(-1), torch.ones(21))
    probe = torch.randn_like(weights)
    (weights * probe).sum().backward()
    (ref_weights * probe).sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
    for name, param in gate.named_parameters():
        assert rel_err(param.grad, dict(router.named_parameters())[name].grad) <= 1e-5, name


@pytest.mark.parametrize("experts_impl", ["torch", "torch_mm"])
def test_moe_block_equals_transformers_router_plus_experts(experts_impl):
    config = _text_config()
    router = _random_router(config, seed=1)
    experts = Gemma4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    moe = Gemma4MoE(gemma4_moe_config(config), cpu_backend(experts=experts_impl), config)
    assert isinstance(moe, MoE)  # what am-moe's EP parallelizer looks for
    moe.gate.load_state_dict(router.state_dict())
    with torch.no_grad():
        moe.experts.gate_and_up_projs.copy_(experts.gate_up_proj.transpose(1, 2))
        moe.experts.down_projs.copy_(experts.down_proj.transpose(1, 2))
    residual = torch.randn(2, 9, config.hidden_size)
    normed = torch.randn(2, 9, config.hidden_size)
    _, w, idx = router(residual.reshape(-1, config.hidden_size))
    expected = experts(normed.reshape(-1, config.hidden_size), idx, w).view(normed.shape)
    got = moe(normed, gate_input=residual)
    assert rel_err(got, expected) <= 1e-5
    # without gate_input the router sees x itself, a different routing
    assert rel_err(moe(normed), expected) > 1e-3


def test_padding_tokens_skip_the_experts_and_leave_real_tokens_unchanged():
    config = _text_config()
    moe = Gemma4MoE(gemma4_moe_config(config), cpu_backend(), config)
    moe.init_weights(init_std=0.2)
    x = torch.randn(2, 5, config.hidden_size)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, :2] = True
    full = moe(x, gate_input=x)
    masked = moe(x, padding_mask=pad, gate_input=x)
    assert torch.equal(masked[pad], torch.zeros_like(masked[pad]))
    assert rel_err(masked[~pad], full[~pad]) <= 1e-6


def test_moe_config_from_text_config_and_its_errors():
    config = _text_config()
    moe_config = gemma4_moe_config(config, {"aux_loss_coeff": 0.0})
    assert (moe_config.n_routed_experts, moe_config.n_activated_experts) == (8, 2)
    assert moe_config.expert_activation == "geglu" and moe_config.score_func == "softmax"
    assert moe_config.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown keys \\['nope'\\]"):
        gemma4_moe_config(config, {"nope": 1})
    dense = gemma4_config(tiny_moe_text(enable_moe_block=False)).text_config
    with pytest.raises(ValueError, match="enable_moe_block=True"):
        gemma4_moe_config(dense)
