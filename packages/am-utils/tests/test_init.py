"""init_empty_weights and skip_random_init."""

from __future__ import annotations

import pytest
import torch
import transformers.initialization as hf_init
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from am_utils import init_empty_weights, skip_random_init


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.register_buffer("scale", torch.arange(3.0))


def test_parameters_on_meta_buffers_untouched():
    with init_empty_weights():
        module = WithBuffer()
    assert module.proj.weight.is_meta and module.proj.bias.is_meta
    assert isinstance(module.proj.weight, nn.Parameter) and module.proj.weight.requires_grad
    assert torch.equal(module.scale, torch.arange(3.0))
    assert not WithBuffer().proj.weight.is_meta  # patch removed on exit


def test_include_buffers():
    with init_empty_weights(include_buffers=True):
        module = WithBuffer()
    assert module.scale.is_meta and module.proj.weight.is_meta


def test_explicit_device_and_requires_grad():
    with init_empty_weights(device="cpu"):
        layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu"

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2), requires_grad=False)

    with init_empty_weights():
        frozen = Frozen()
    assert frozen.w.is_meta and not frozen.w.requires_grad


class TaggedParameter(nn.Parameter):
    """Parameter subclass carrying attributes, as some backends attach (e.g. TP flags)."""


def test_parameter_subclass_and_attributes_kept():
    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            param = TaggedParameter(torch.ones(3))
            param.tensor_model_parallel = True
            self.w = param

    with init_empty_weights():
        module = Tagged()
    assert type(module.w) is TaggedParameter
    assert module.w.is_meta and module.w.tensor_model_parallel is True


def test_tied_weights_stay_tied_on_meta():
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
        tie_word_embeddings=True,
    )
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_meta
    assert not model.model.rotary_emb.inv_freq.is_meta


def test_patch_restored_after_exception():
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="boom"), init_empty_weights(include_buffers=True):
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is original
    assert nn.Module.register_buffer.__qualname__ == "Module.register_buffer"


@pytest.fixture
def init_spies(monkeypatch):
    """Replace initializers by counting wrappers; skip_random_init must bypass them."""
    calls = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(f"{module.__name__}.{name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return wrapper

    spies = {
        "kaiming": spy(torch.nn.init, "kaiming_uniform_"),
        "uniform": spy(torch.nn.init, "uniform_"),
        "normal": spy(torch.nn.init, "normal_"),
        "hf_normal": spy(hf_init, "normal_"),
        "reset": spy(nn.Linear, "reset_parameters"),
    }
    return calls, spies


def test_skip_random_init_skips_torch_inits(init_spies):
    calls, spies = init_spies
    nn.Linear(3, 3)
    assert calls, "sanity: the spies do see a normal construction"
    calls.clear()
    rng_before = torch.random.get_rng_state()
    with skip_random_init():
        layer = nn.Linear(3, 3)
        embedding = nn.Embedding(5, 4)
        assert torch.nn.init.kaiming_uniform_ is not spies["kaiming"]
    assert calls == []
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no random number drawn
    assert layer.weight.shape == (3, 3) and embedding.weight.shape == (5, 4)
    # restored: the spies are in place again
    assert torch.nn.init.kaiming_uniform_ is spies["kaiming"]
    assert hf_init.normal_ is spies["hf_normal"]
    assert nn.Linear.reset_parameters is spies["reset"]


def test_skip_random_init_on_transformers_model():
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
        tie_word_embeddings=True,
    )
    original_init_weights = LlamaForCausalLM._init_weights
    rng_before = torch.random.get_rng_state()
    with skip_random_init():
        model = LlamaForCausalLM(config)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying still happens
    assert LlamaForCausalLM._init_weights is original_init_weights
    torch.manual_seed(0)
    a = LlamaForCausalLM(config)
    torch.manual_seed(0)
    b = LlamaForCausalLM(config)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)  # normal init restored


def test_skip_random_init_restores_after_exception():
    originals = (torch.nn.init.normal_, hf_init.trunc_normal_, nn.Linear.reset_parameters)
    with pytest.raises(ValueError, match="inside"), skip_random_init():
        assert torch.nn.init.normal_ is not originals[0]
        raise ValueError("inside")
    assert (torch.nn.init.normal_, hf_init.trunc_normal_, nn.Linear.reset_parameters) == originals
