"""compute_lm_head_logits (every documented case) and get_rope_config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Gemma4TextConfig, LlamaConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from am_utils import compute_lm_head_logits, get_rope_config

H, V = 8, 11


@pytest.fixture
def head():
    torch.manual_seed(0)
    return nn.Linear(H, V, bias=False)


def reference(head, x):
    """Float64 reference projection."""
    return x.double() @ head.weight.double().T


def test_lm_head_none_passes_hidden_states_through():
    hidden = torch.randn(2, 5, H)
    out = compute_lm_head_logits(None, hidden, logits_to_keep=3, fp32_lm_head=True)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.logits is hidden and out.hidden_states is None


def test_lm_head_none_thd_restores_batch_dim():
    hidden = torch.randn(7, H)
    out = compute_lm_head_logits(None, hidden, is_thd=True, output_hidden_states=True)
    assert out.logits.shape == (1, 7, H) and out.hidden_states.shape == (1, 7, H)


@pytest.mark.parametrize("shape", [(2, 5, H), (9, H)])
def test_keep_all_positions(head, shape):
    hidden = torch.randn(*shape)
    out = compute_lm_head_logits(head, hidden)
    assert out.logits.shape == (*shape[:-1], V)
    torch.testing.assert_close(out.logits.double(), reference(head, hidden), rtol=1e-5, atol=1e-6)


def test_keep_last_n_3d_and_2d(head):
    hidden = torch.randn(2, 5, H)
    out = compute_lm_head_logits(head, hidden, logits_to_keep=2)
    assert out.logits.shape == (2, 2, V)
    torch.testing.assert_close(
        out.logits.double(), reference(head, hidden[:, -2:]), rtol=1e-5, atol=1e-6
    )
    packed = torch.randn(9, H)
    out = compute_lm_head_logits(head, packed, logits_to_keep=1)
    assert out.logits.shape == (1, V)
    torch.testing.assert_close(
        out.logits.double(), reference(head, packed[-1:]), rtol=1e-5, atol=1e-6
    )


def test_keep_index_tensor_3d_and_2d(head):
    index = torch.tensor([0, 3])
    hidden = torch.randn(2, 5, H)
    out = compute_lm_head_logits(head, hidden, logits_to_keep=index)
    torch.testing.assert_close(
        out.logits.double(), reference(head, hidden[:, [0, 3]]), rtol=1e-5, atol=1e-6
    )
    packed = torch.randn(9, H)
    out = compute_lm_head_logits(head, packed, logits_to_keep=index, is_thd=True)
    assert out.logits.shape == (1, 2, V)
    torch.testing.assert_close(
        out.logits[0].double(), reference(head, packed[[0, 3]]), rtol=1e-5, atol=1e-6
    )


def test_thd_unsqueezes_2d_only(head):
    packed = torch.randn(9, H)
    out = compute_lm_head_logits(head, packed, is_thd=True, output_hidden_states=True)
    assert out.logits.shape == (1, 9, V)
    assert out.hidden_states.shape == (1, 9, H)
    assert torch.equal(out.hidden_states[0], packed)
    already_batched = torch.randn(1, 9, H)  # inputs_embeds path already produced [1, T, H]
    out = compute_lm_head_logits(head, already_batched, is_thd=True, output_hidden_states=True)
    assert out.logits.shape == (1, 9, V) and out.hidden_states is already_batched


def test_output_hidden_states_is_full_sequence(head):
    hidden = torch.randn(2, 5, H)
    out = compute_lm_head_logits(head, hidden, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape == (2, 1, V) and out.hidden_states is hidden
    assert compute_lm_head_logits(head, hidden).hidden_states is None


def test_fp32_lm_head_projects_in_fp32_and_casts_back(head):
    hidden = torch.randn(2, 5, H).to(torch.bfloat16)
    seen = {}

    def record_input_dtype(module, args):
        seen["dtype"] = args[0].dtype

    head.register_forward_pre_hook(record_input_dtype)
    out = compute_lm_head_logits(head, hidden, fp32_lm_head=True)
    assert seen["dtype"] == torch.float32
    assert out.logits.dtype == torch.bfloat16
    expected = (hidden.float() @ head.weight.T).to(torch.bfloat16)
    assert torch.equal(out.logits, expected)


def test_gradients_reach_hidden_states_and_head(head):
    hidden = torch.randn(2, 5, H, dtype=torch.float64, requires_grad=True)
    head = head.double()
    out = compute_lm_head_logits(head, hidden, logits_to_keep=torch.tensor([1, 4]))
    out.logits.square().sum().backward()
    w = head.weight.detach()
    expected = torch.zeros_like(hidden)
    expected[:, [1, 4]] = 2 * (hidden.detach()[:, [1, 4]] @ w.T) @ w
    torch.testing.assert_close(hidden.grad, expected)
    assert head.weight.grad is not None


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_logits_to_keep(head, bad):
    with pytest.raises((ValueError, TypeError), match="logits_to_keep"):
        compute_lm_head_logits(head, torch.randn(2, 5, H), logits_to_keep=bad)


def test_bad_hidden_rank(head):
    with pytest.raises(ValueError, match=r"\[T, H\] or \[B, S, H\]"):
        compute_lm_head_logits(head, torch.randn(1, 2, 5, H), logits_to_keep=1)


def test_rope_config_flat():
    config = LlamaConfig(rope_theta=12345.0)
    theta, params, partial = get_rope_config(config)
    assert theta == 12345.0 and params["rope_theta"] == 12345.0 and partial == 1.0
    config.rope_parameters["partial_rotary_factor"] = 0.5
    assert get_rope_config(config)[2] == 0.5
    assert get_rope_config(config, layer_type="full_attention")[0] == 12345.0


def test_rope_config_per_layer_type():
    config = Gemma4TextConfig(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]
    )
    for layer_type, params in config.rope_parameters.items():
        theta, got, _ = get_rope_config(config, layer_type=layer_type)
        assert theta == params["rope_theta"] and got is params
    with pytest.raises(ValueError, match="keyed by layer type.*full_attention"):
        get_rope_config(config)


def test_rope_config_legacy_attributes():
    legacy = SimpleNamespace(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    theta, params, partial = get_rope_config(legacy)
    assert (theta, params["factor"], params["rope_type"], partial) == (500.0, 2.0, "linear", 1.0)
    legacy = SimpleNamespace(rope_theta=10.0, partial_rotary_factor=0.25)
    assert get_rope_config(legacy) == (10.0, {"rope_type": "default", "rope_theta": 10.0}, 0.25)
    with pytest.raises(ValueError, match="neither rope_parameters nor rope_theta"):
        get_rope_config(SimpleNamespace())
    with pytest.raises(ValueError, match="no 'rope_theta'"):
        get_rope_config(SimpleNamespace(rope_parameters={"rope_type": "default"}))


class _RecordingHead(nn.Linear):
    """nn.Linear that records the dtype and shape of what it is given."""

    def forward(self, x):
        self.seen = (x.dtype, tuple(x.shape))
        return super().forward(x)


@pytest.mark.parametrize("keep", [0, 2])
def test_hidden_states_are_cast_to_the_head_dtype_after_slicing(keep):
    torch.manual_seed(0)
    head = _RecordingHead(H, V, bias=False)  # an fp32 head under a bf16 trunk
    hidden = torch.randn(2, 5, H, dtype=torch.bfloat16)
    out = compute_lm_head_logits(head, hidden, logits_to_keep=keep)
    kept = 5 if keep == 0 else keep
    assert head.seen == (torch.float32, (2, kept, H))  # sliced first, then cast
    assert out.logits.dtype == torch.float32
    want = reference(head, hidden[:, -kept:].float())
    torch.testing.assert_close(out.logits.double(), want, rtol=1e-5, atol=1e-6)
    # And the other way: a bf16 head given fp32 hidden states.
    compute_lm_head_logits(head.to(torch.bfloat16), hidden.float(), logits_to_keep=keep)
    assert head.seen[0] == torch.bfloat16
