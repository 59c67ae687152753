"""Released Gemma 4 configurations built on the meta device under init_empty_weights.

The values below are those of the published `config.json` files of google/gemma-4-26B-A4B-it
(MoE + vision) and google/gemma-4-E2B-it (dense + audio + vision, K/V sharing), written in by
hand (nothing is downloaded). The parameter counts are checked against transformers' own
model built from the same config on the meta device, and against the model cards' totals.
"""

from __future__ import annotations

import time

import torch
from transformers import Gemma4Config
from transformers import Gemma4ForConditionalGeneration as HFGemma4

from am_models_gemma4 import Gemma4ForConditionalGeneration, Gemma4MoE
from am_utils import count_model_parameters, init_empty_weights

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


def _layer_types(n: int, every: int) -> list[str]:
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


GEMMA4_26B_A4B = dict(
    text_config=dict(
        vocab_size=262_144,
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_experts=128,
        top_k_experts=8,
        enable_moe_block=True,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        attention_k_eq_v=True,
        sliding_window=1024,
        layer_types=_layer_types(30, 6),
        max_position_embeddings=262_144,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        rope_parameters=_ROPE,
        use_bidirectional_attention="vision",
        dtype="bfloat16",
    ),
    vision_config=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=10_240,
        standardize=True,
        dtype="bfloat16",
    ),
    audio_config=None,
    tie_word_embeddings=True,
    dtype="bfloat16",
)

GEMMA4_E2B = dict(
    text_config=dict(
        vocab_size=262_144,
        vocab_size_per_layer_input=262_144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        sliding_window=512,
        layer_types=_layer_types(35, 5),
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        max_position_embeddings=131_072,
        final_logit_softcapping=30.0,
        rope_parameters=_ROPE,
        dtype="bfloat16",
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        patch_size=16,
        pooling_kernel_size=3,
        dtype="bfloat16",
    ),
    audio_config=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8),
    tie_word_embeddings=True,
    dtype="bfloat16",
)


def _build(values: dict):
    config = Gemma4Config(**values)
    start = time.perf_counter()
    with init_empty_weights():
        ours = Gemma4ForConditionalGeneration(config)
    seconds = time.perf_counter() - start
    with torch.device("meta"):
        reference = HFGemma4(Gemma4Config(**values))
    return ours, reference, seconds


def test_gemma4_26b_a4b_on_meta():
    ours, reference, seconds = _build(GEMMA4_26B_A4B)
    total = count_model_parameters(ours)[1]
    print(f"gemma-4-26B-A4B-it: {total:,} parameters, built on meta in {seconds:.2f} s")
    assert all(p.is_meta for p in ours.parameters())
    assert total == sum(p.numel() for p in reference.parameters())
    assert 25.5e9 < total < 26.2e9  # model card: 25.2B language model + ~0.55B vision encoder
    assert sum(isinstance(m, Gemma4MoE) for m in ours.modules()) == 30
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert seconds < 30


def test_gemma4_e2b_on_meta():
    ours, reference, seconds = _build(GEMMA4_E2B)
    total = count_model_parameters(ours)[1]
    print(f"gemma-4-E2B-it: {total:,} parameters, built on meta in {seconds:.2f} s")
    assert total == sum(p.numel() for p in reference.parameters())
    assert 4.5e9 < total < 5.5e9  # model card: 5.1B with embeddings (2.3B effective)
    caps = Gemma4ForConditionalGeneration.get_capabilities(ours.config)
    assert (caps.variant, caps.kv_sharing, caps.audio) == ("dense_audio", True, True)
    assert seconds < 30
