"""Parameter counting on meta and real models, quantized logical sizes, the summary."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from am_utils import count_model_parameters, init_empty_weights, print_trainable_parameters
from am_utils.params import _get_logical_numel, _get_model_param_stats


def tiny_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=tie,
    )


def expected_llama_count(tie: bool) -> int:
    h, f, v, layers, kv = 32, 64, 64, 2, 2 * (32 // 4)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h  # q, k, v, o, mlp, 2 norms
    return v * h + layers * per_layer + h + (0 if tie else v * h)


def test_meta_model_counts_match_real_and_formula():
    for tie in (False, True):
        with init_empty_weights():
            meta = LlamaForCausalLM(tiny_config(tie))
        real = LlamaForCausalLM(tiny_config(tie))
        assert all(p.is_meta for p in meta.parameters())
        trainable, total = count_model_parameters(meta)
        assert (trainable, total) == count_model_parameters(real)
        assert total == trainable == expected_llama_count(tie)


def test_trainable_counts_follow_requires_grad():
    with init_empty_weights():
        model = LlamaForCausalLM(tiny_config(False))
    model.model.embed_tokens.weight.requires_grad_(False)
    trainable, total = count_model_parameters(model)
    assert total - trainable == 64 * 32


class FakeQuantState:
    def __init__(self, shape):
        self.shape = torch.Size(shape)


def fake_params4bit(shape) -> nn.Parameter:
    """A Params4bit look-alike: packed uint8 storage of half the elements plus quant_state."""
    packed = nn.Parameter(
        torch.zeros(math.prod(shape) // 2, 1, dtype=torch.uint8), requires_grad=False
    )
    packed.quant_state = FakeQuantState(shape)
    return packed


def test_logical_numel_of_quantized_param():
    param = fake_params4bit((16, 8))
    assert param.numel() == 64
    assert _get_logical_numel(param) == 128
    assert _get_logical_numel(nn.Parameter(torch.zeros(3, 5))) == 15


def test_counts_use_logical_numel():
    model = nn.Linear(8, 16, bias=True)
    model.weight = fake_params4bit((16, 8))
    trainable, total = count_model_parameters(model)
    assert total == 128 + 16 and trainable == 16


def test_param_stats_and_summary(caplog):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
        model.bias.copy_(torch.tensor([4.0, 0.0]))
    model.bias.requires_grad_(False)
    total, trainable, sq = _get_model_param_stats(model)
    assert (total, trainable) == (8, 6)
    assert sq == 25.0
    with caplog.at_level(logging.INFO, logger="am_utils.params"):
        assert print_trainable_parameters(model, name="Draft") == (6, 8)
    assert "Draft summary" in caplog.text
    assert "75.00%" in caplog.text and "5.0000" in caplog.text


def test_param_stats_skip_meta():
    with init_empty_weights():
        model = nn.Linear(4, 4)
    assert _get_model_param_stats(model) == (20, 20, 0.0)
    assert print_trainable_parameters(nn.Module()) == (0, 0)
