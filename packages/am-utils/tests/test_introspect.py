"""Forward-signature helpers, LM-head lookup, trust_remote_code policy, RADIO fused attn."""

from __future__ import annotations

import pytest
from torch import nn

from am_utils import (
    VLM_INPUT_KEYS,
    enable_radio_vit_fused_attn,
    filter_forward_kwargs,
    get_lm_head_module,
    get_lm_head_weight,
    resolve_trust_remote_code,
)
from am_utils.introspect import (
    _get_forward_signature,
    _supports_logits_to_keep,
    _supports_seq_lens,
)


class Explicit(nn.Module):
    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        return input_ids


class WithSeqLens(nn.Module):
    def forward(self, input_ids, seq_lens=None):
        return input_ids


class VarKw(nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


class Unreadable(nn.Module):
    forward = 3  # not callable: no signature


class BuiltinForward(nn.Module):
    forward = staticmethod(max)  # a builtin whose signature inspect cannot read


def test_forward_signature():
    assert list(_get_forward_signature(Explicit()).parameters) == [
        "input_ids",
        "attention_mask",
        "logits_to_keep",
    ]
    assert _get_forward_signature(Unreadable()) is None
    assert _get_forward_signature(BuiltinForward()) is None


def test_supports_flags():
    assert _supports_logits_to_keep(Explicit()) and not _supports_logits_to_keep(VarKw())
    assert not _supports_logits_to_keep(Unreadable())
    assert _supports_seq_lens(WithSeqLens()) and _supports_seq_lens(VarKw())
    assert not _supports_seq_lens(Explicit()) and not _supports_seq_lens(Unreadable())


def test_filter_forward_kwargs():
    kwargs = {"input_ids": 1, "attention_mask": 2, "pixel_values": 3, "seq_lens": 4}
    filtered = filter_forward_kwargs(Explicit(), kwargs)
    assert filtered == {"input_ids": 1, "attention_mask": 2}
    assert len(kwargs) == 4  # input untouched
    passthrough = filter_forward_kwargs(VarKw(), kwargs)
    assert passthrough == kwargs and passthrough is not kwargs
    assert filter_forward_kwargs(Unreadable(), kwargs) == kwargs


def test_lm_head_module_lookup():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    hf = LlamaForCausalLM(config)
    assert get_lm_head_module(hf) is hf.lm_head
    assert get_lm_head_weight(hf) is hf.lm_head.weight

    wrapper = nn.Module()
    wrapper.body = nn.Module()
    wrapper.body.lm_head = nn.Linear(4, 9, bias=False)
    assert get_lm_head_module(wrapper) is wrapper.body.lm_head
    assert get_lm_head_weight(wrapper) is wrapper.body.lm_head.weight

    class NoOutput(nn.Module):
        def get_output_embeddings(self):
            return None

    headless = NoOutput()
    headless.proj = nn.Linear(2, 2)
    assert get_lm_head_module(headless) is None
    with pytest.raises(ValueError, match="No LM-head weight found in NoOutput"):
        get_lm_head_weight(headless)


def test_lm_head_weight_by_parameter_name():
    model = nn.Module()
    model.lm_head_fp32 = nn.Linear(2, 3, bias=False)
    assert get_lm_head_module(model) is None  # no module named exactly lm_head
    assert get_lm_head_weight(model) is model.lm_head_fp32.weight


def test_resolve_trust_remote_code(tmp_path):
    assert resolve_trust_remote_code("nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    assert not resolve_trust_remote_code("google/gemma-4-e2b")
    assert not resolve_trust_remote_code("")
    assert not resolve_trust_remote_code(None)
    local = tmp_path / "nvidia"
    local.mkdir()
    assert not resolve_trust_remote_code(str(local))


def test_vlm_input_keys():
    assert VLM_INPUT_KEYS[0] == "input_ids"
    assert {"pixel_values", "pixel_values_videos", "image_grid_thw", "audio_attention_mask"} <= set(
        VLM_INPUT_KEYS
    )
    assert len(set(VLM_INPUT_KEYS)) == len(VLM_INPUT_KEYS)


def _radio_model(n_blocks: int, nested: bool) -> nn.Module:
    blocks = nn.ModuleList()
    for _ in range(n_blocks):
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.fused_attn = False
        blocks.append(block)
    inner = nn.Module()
    inner.blocks = blocks
    radio = nn.Module()
    radio.model = inner
    vision = nn.Module()
    vision.radio_model = radio
    top = nn.Module()
    if nested:
        top.model = nn.Module()
        top.model.vision_model = vision
    else:
        top.vision_model = vision
    return top


@pytest.mark.parametrize("nested", [False, True])
def test_enable_radio_vit_fused_attn(nested):
    model = _radio_model(3, nested)
    assert enable_radio_vit_fused_attn(model) == 3
    root = model.model if nested else model
    assert all(b.attn.fused_attn for b in root.vision_model.radio_model.model.blocks)


def test_enable_radio_vit_fused_attn_noop():
    assert enable_radio_vit_fused_attn(nn.Linear(2, 2)) == 0
