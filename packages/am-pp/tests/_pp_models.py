"""Tiny transformers models and batches for the am-pp tests (built in code, never downloaded).

Each `CASES[name]()` returns a fresh fp32 model in train mode (dropout 0, so train and eval
agree), seeded so that every rank builds the same weights, and `batch(name, ...)` returns a
global batch: input_ids, labels (with ignored targets), and the first stage's image inputs
split per microbatch where the model takes images.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.gemma4 import (
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

VOCAB = 96
IMAGE_TOKEN = 5  # Mistral3 / Gemma4 image placeholder id (inside the vocab)
SEQ = 12
N_LAYERS = 4
IGNORE_INDEX = -100


_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _gemma4_text(**fields) -> dict:
    return {
        **_DECODER,
        **dict(
            head_dim=8,
            global_head_dim=16,
            sliding_window=5,
            hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2),
            final_logit_softcapping=30.0,
            tie_word_embeddings=False,
            pad_token_id=0,
        ),
        **fields,
    }


_PIXTRAL = dict(
    model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    num_attention_heads=2, head_dim=8, image_size=8, patch_size=2, num_channels=3,
)  # fmt: skip
_GEMMA4_VISION = dict(
    hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, patch_size=2, pooling_kernel_size=2,
    position_embedding_size=16,
)  # fmt: skip
_UNTIED = dict(tie_word_embeddings=False)

# name -> (config class, model class, config fields). Every model: fp32, untied embeddings.
SPECS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {**_DECODER, **_UNTIED, "attn_implementation": "eager"}),
    # two sliding layers, window shorter than SEQ: both mask kinds are exercised
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {
        **_DECODER, **_UNTIED, "head_dim": 8, "attn_implementation": "sdpa",
        "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2,
    }),
    "mistral3": (Mistral3Config, Mistral3ForConditionalGeneration, {
        "text_config": {**_DECODER, "model_type": "mistral", "head_dim": 8, "sliding_window": None},
        "vision_config": _PIXTRAL, "image_token_id": IMAGE_TOKEN, "spatial_merge_size": 2,
        "vision_feature_layer": -1, **_UNTIED, "attn_implementation": "eager",
    }),
    "gemma4_moe": (Gemma4TextConfig, Gemma4ForCausalLM, _gemma4_text(
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        attn_implementation="eager",
    )),
    # E2B-like dense: per-layer inputs, and layers 2 (sliding) and 3 (full) attend with the
    # K/V of layers 0 and 1: the sharing crosses every boundary of a 2- or 4-stage split
    # (through layer 2's stage, unchanged, for the full-attention pair).
    "gemma4_e2b": (Gemma4TextConfig, Gemma4ForCausalLM, _gemma4_text(
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=N_LAYERS - 2, attn_implementation="eager",
    )),
    "gemma4_vlm": (Gemma4Config, Gemma4ForConditionalGeneration, {
        "text_config": _gemma4_text(), "vision_config": _GEMMA4_VISION, "audio_config": None,
        "image_token_id": IMAGE_TOKEN, **_UNTIED, "attn_implementation": "eager",
    }),
}  # fmt: skip


def build(name: str, **overrides):
    """A fresh seeded fp32 model of kind `name` in train mode; `overrides` replace config
    fields (a nested dict for `text_config` / `vision_config` replaces fields inside)."""
    config_cls, model_cls, fields = SPECS[name]
    fields = dict(fields)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(fields.get(key), dict)
        fields[key] = {**fields[key], **value} if nested else value
    torch.manual_seed(0)
    return model_cls(config_cls(**fields)).float().train()


CASES = {name: functools.partial(build, name) for name in SPECS}
llama, qwen3, mistral3 = CASES["llama"], CASES["qwen3"], CASES["mistral3"]


# Image token slots per image: Pixtral 8x8 pixels / patch 2 = 4x4 patches, merged 2x2 -> 4;
# Gemma4 4x4 patches pooled 2x2 -> 4.
TOKENS_PER_IMAGE = 4


def _mistral3_image(g):
    return torch.randn(1, 3, 8, 8, generator=g), torch.tensor([[8, 8]])


def _gemma4_image(g):
    pixels = torch.rand(1, 16, 3 * 2 * 2, generator=g)
    xy = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1)
    return pixels, xy.reshape(1, 16, 2)


def batch(name: str, batch_size: int, n_microbatches: int, seed: int = 1) -> dict:
    """A global batch. VLM cases put one image into rows 0 and batch_size // 2 (two images
    in all), so some microbatches carry an image and others none; `image_kwargs_mbs` holds
    the first stage's per-microbatch image kwargs and `image_kwargs` the whole batch's."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE_TOKEN + 1, VOCAB, (batch_size, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 3] = labels[-1, 7] = IGNORE_INDEX
    out = {"input_ids": ids, "labels": labels, "image_kwargs": {}, "image_kwargs_mbs": None}
    if name not in ("mistral3", "gemma4_vlm"):
        return out
    rows = [0, batch_size // 2]
    make = _mistral3_image if name == "mistral3" else _gemma4_image
    keys = (
        ("pixel_values", "image_sizes")
        if name == "mistral3"
        else ("pixel_values", "image_position_ids")
    )
    images = {r: make(g) for r in rows}
    for r in rows:
        ids[r, 2 : 2 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
        labels[r, 2 : 2 + TOKENS_PER_IMAGE] = IGNORE_INDEX
    out["image_kwargs"] = {k: torch.cat([images[r][i] for r in rows]) for i, k in enumerate(keys)}
    mb = batch_size // n_microbatches
    mbs = []
    for m in range(n_microbatches):
        inside = [r for r in rows if m * mb <= r < (m + 1) * mb]
        mbs.append(
            {k: torch.cat([images[r][i] for r in inside]) for i, k in enumerate(keys)}
            if inside
            else {}
        )
    out["image_kwargs_mbs"] = mbs
    return out
