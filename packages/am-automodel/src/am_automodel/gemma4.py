"""Gemma 4 in `automodel train`: the model spec (am-models-gemma4) and the `tiny-gemma4-moe` preset.

Packed rows reach the model as `position_ids` (restarting at each document) and a prebuilt
`{"full_attention", "sliding_attention"}` additive mask mapping from the rows' `seq_idx`
(`_build_packed_gemma4_causal_mask_mapping`), so no token attends across a document
boundary on either layer type. Context parallelism goes through the model's own hooks
(`setup_cp_attention`, `prepare_model_inputs_for_cp`), see `am_automodel.cp`.
"""

from __future__ import annotations

from typing import Any

import torch

from am_automodel.models import ModelSpec, register_model, register_preset

__all__ = ["gemma4_inputs", "tiny_gemma4_moe"]


def _build(config, backend):
    from am_models_gemma4 import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_config(config, backend=backend)


def _init(model, dtype):
    model.initialize_weights(dtype=dtype)


def _from_pretrained(path, dtype, backend, config=None):
    from am_models_gemma4 import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        path, config=config, dtype=dtype, backend=backend
    )


def _text(config):
    return config.get_text_config()


def _experts(config) -> int | None:
    text = _text(config)
    return int(text.num_experts) if getattr(text, "enable_moe_block", False) else None


def _model_class(config):
    from am_models_gemma4 import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration


def gemma4_inputs(batch: dict[str, torch.Tensor], config, device, dtype) -> dict[str, Any]:
    """Forward keywords for packed rows: global-per-document positions and the mask mapping."""
    from am_models_gemma4 import _build_packed_gemma4_causal_mask_mapping

    seq_idx = batch["seq_idx"].to(device)
    masks = _build_packed_gemma4_causal_mask_mapping(
        seq_idx.long() + 1,  # 1-based document ids; the padding segment is a document too
        None,
        dtype,
        _text(config).sliding_window,
        as_additive=True,
    )
    return {"position_ids": batch["position_ids"].to(device), "attention_mask": masks}


register_model(
    "gemma4",
    ModelSpec(
        build=_build,
        init_weights=_init,
        from_pretrained=_from_pretrained,
        packing="position_ids",
        num_layers=lambda c: int(_text(c).num_hidden_layers),
        num_experts=_experts,
        model_class=_model_class,
        inputs=gemma4_inputs,
    ),
)


def tiny_gemma4_moe(vocab_size: int):
    """Gemma 4 MoE, text only: 4 layers (3 sliding + 1 full), 8 experts top-2, hidden 64,
    tied embeddings, logit soft-capping: trains on a CPU in minutes. The vocabulary is
    `vocab_size` text ids plus 8 for the (unused) multimodal placeholder tokens."""
    from transformers import Gemma4Config

    text = dict(
        vocab_size=vocab_size + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        sliding_window=32,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab_size + 8,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    # The multimodal placeholder ids get rows of their own past the text vocabulary:
    # transformers looks their embeddings up (to find placeholders in inputs_embeds).
    special = dict(zip(("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                        "eoi_token_id", "boa_token_id", "eoa_token_index"),
                       range(vocab_size, vocab_size + 7), strict=True))  # fmt: skip
    return Gemma4Config(
        text_config=text,
        vision_config=None,
        audio_config=None,
        **special,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


register_preset("tiny-gemma4-moe", tiny_gemma4_moe)
