"""Construction, dtype, tying, capabilities and the mask helpers of Gemma4ForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch
from _gemma4_helpers import (
    TEXT_VOCAB,
    VOCAB,
    cpu_backend,
    gemma4_config,
    tiny_kv_shared_text,
    tiny_moe_text,
    tiny_vision,
)

from am_models_gemma4 import (
    Gemma4ForConditionalGeneration,
    Gemma4MoETextModelBackend,
    _convert_bool_4d_mask_to_additive,
    _derive_padding_mask,
    _kv_sharing_active,
)
from am_utils import init_empty_weights


def _moe_vlm_config(**top):
    return gemma4_config(tiny_moe_text(), tiny_vision(), **top)


def test_float32_config_gives_float32_parameters_everywhere():
    config = _moe_vlm_config()
    config.vision_config.dtype = "bfloat16"  # the reference would leave the tower in bf16
    model = Gemma4ForConditionalGeneration(config, backend=cpu_backend())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert isinstance(model.model.language_model, Gemma4MoETextModelBackend)
    rope = model.model.language_model.rotary_emb
    assert rope.full_attention_inv_freq.dtype == torch.float32


def test_bf16_config_keeps_rope_buffers_fp32():
    model = Gemma4ForConditionalGeneration(_moe_vlm_config(dtype="bfloat16"), backend=cpu_backend())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.language_model.rotary_emb.sliding_attention_inv_freq.dtype == torch.float32


def test_bf16_parameters_with_fp32_buffers_keep_a_bf16_residual_stream():
    """FSDP2 mixed precision casts parameters, not buffers: with bf16 weights and the fp32
    `layer_scalar` buffers the decoder layers' outputs stay bf16 (as transformers' in-place
    `*=` keeps them), so the final norm and the bf16 lm_head agree. It failed before
    ("expected m1 and m2 to have the same dtype": an fp32 hidden state into the lm_head)."""
    model = Gemma4ForConditionalGeneration(gemma4_config(tiny_moe_text()), backend=cpu_backend())
    for layer in model.model.language_model.layers:
        layer.layer_scalar.fill_(0.7)  # a value bf16 cannot hold exactly
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert model.model.language_model.layers[0].layer_scalar.dtype == torch.float32
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out))
             for layer in model.model.language_model.layers]  # fmt: skip
    ids = torch.randint(0, TEXT_VOCAB, (1, 8))
    logits = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    assert logits.dtype == torch.bfloat16
    assert outputs and all(o.dtype == torch.bfloat16 for o in outputs)


@pytest.mark.parametrize("top_tie", [True, False])
def test_top_level_tie_flag_decides_and_tie_is_one_parameter(top_tie):
    config = _moe_vlm_config(tie_word_embeddings=top_tie)
    config.text_config.tie_word_embeddings = not top_tie
    model = Gemma4ForConditionalGeneration(config, backend=cpu_backend())
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) == top_tie
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) == (not top_tie)
    model.tie_weights("ignored", recompute_mapping=False)  # extra arguments are ignored
    assert (model.lm_head.weight is embed) == top_tie


def test_tie_survives_initialize_weights_and_a_meta_build():
    with init_empty_weights():
        model = Gemma4ForConditionalGeneration(_moe_vlm_config(), backend=cpu_backend())
    assert all(p.is_meta for p in model.parameters())
    model.tie_weights()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    model.initialize_weights(dtype=torch.float32)
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embed and not embed.is_meta
    gate = model.model.layers[0].moe.gate
    assert torch.equal(gate.scale, torch.ones_like(gate.scale))
    experts = model.model.layers[0].moe.experts.gate_and_up_projs
    assert 0.1 < experts.std().item() < 0.3  # normal(0, initializer_range=0.2)
    assert torch.isfinite(model(torch.randint(0, TEXT_VOCAB, (1, 9))).logits).all()


def test_initialize_weights_casts_to_the_requested_dtype():
    model = Gemma4ForConditionalGeneration(_moe_vlm_config(), backend=cpu_backend())
    model.initialize_weights(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_get_capabilities_dispatches_moe_dense_audio_dense():
    moe = Gemma4ForConditionalGeneration.get_capabilities(_moe_vlm_config())
    assert (moe.variant, moe.moe, moe.vision, moe.expert_parallel) == ("moe", True, True, True)
    dense = Gemma4ForConditionalGeneration.get_capabilities(
        gemma4_config(tiny_moe_text(enable_moe_block=False))
    )
    assert (dense.variant, dense.moe, dense.audio, dense.kv_sharing) == (
        "dense",
        False,
        False,
        False,
    )
    audio_config = gemma4_config(tiny_kv_shared_text(), audio_config={"hidden_size": 16})
    audio = Gemma4ForConditionalGeneration.get_capabilities(audio_config)
    assert (audio.variant, audio.audio, audio.kv_sharing) == ("dense_audio", True, True)


def test_kv_sharing_active_only_for_dense_configs_with_shared_layers():
    assert _kv_sharing_active(gemma4_config(tiny_kv_shared_text()).text_config)
    assert not _kv_sharing_active(
        gemma4_config(tiny_kv_shared_text(num_kv_shared_layers=0)).text_config
    )
    assert not _kv_sharing_active(gemma4_config(tiny_moe_text()).text_config)


def test_pad_token_id_and_special_image_mask():
    model = Gemma4ForConditionalGeneration(_moe_vlm_config(), backend=cpu_backend())
    assert model._get_text_pad_token_id() == 0
    ids = torch.tensor([[3, VOCAB - 1, VOCAB - 1, 5]])
    assert model._get_special_image_mask(ids).tolist() == [[False, True, True, False]]
    types = torch.tensor([[0, 1, 0, 0]])
    assert model._get_special_image_mask(ids, types).tolist() == [[False, True, False, False]]


def test_bad_arguments_are_named():
    config = _moe_vlm_config()
    with pytest.raises(ValueError, match="BackendConfig.rms_norm='torch' is not supported.*fp32"):
        Gemma4ForConditionalGeneration(config, backend=cpu_backend(rms_norm="torch"))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        Gemma4ForConditionalGeneration(config, bogus=1)
    with pytest.raises(ValueError, match="unknown Gemma4TextConfig fields \\['nope'\\]"):
        Gemma4ForConditionalGeneration(config, text_config={"nope": 1})


def test_text_config_overrides_apply_before_building():
    model = Gemma4ForConditionalGeneration(
        _moe_vlm_config(), backend=cpu_backend(), text_config={"top_k_experts": 3}
    )
    assert model.model.layers[0].moe.gate.topk == 3


def test_derive_padding_mask_from_1d_2d_and_4d_masks():
    mask_2d = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    expected = mask_2d == 0
    assert torch.equal(_derive_padding_mask(mask_2d), expected)
    assert torch.equal(_derive_padding_mask(mask_2d[0]), expected[:1])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask_2d.bool()[:, None, None, :]
    assert torch.equal(_derive_padding_mask(allowed), expected)
    additive = _convert_bool_4d_mask_to_additive(allowed, torch.float32)
    assert torch.equal(_derive_padding_mask(additive), expected)
    with pytest.raises(ValueError, match="1D, 2D or 4D"):
        _derive_padding_mask(torch.ones(1, 2, 3))


def test_bool_4d_mask_to_additive_and_the_model_accepts_it():
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    additive = _convert_bool_4d_mask_to_additive(allowed, torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed) and torch.isinf(additive[~allowed]).all()
    assert torch.equal(
        _convert_bool_4d_mask_to_additive(additive, torch.float64), additive.double()
    )
    with pytest.raises(ValueError, match="4D"):
        _convert_bool_4d_mask_to_additive(allowed[0], torch.float32)
    with pytest.raises(ValueError, match="bool or floating"):
        _convert_bool_4d_mask_to_additive(allowed.long(), torch.float32)
    model = Gemma4ForConditionalGeneration(
        gemma4_config(tiny_moe_text(sliding_window=64)), backend=cpu_backend()
    ).eval()
    ids = torch.randint(0, TEXT_VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.allclose(
            model(ids, attention_mask=allowed).logits, model(ids).logits, atol=1e-6
        )
