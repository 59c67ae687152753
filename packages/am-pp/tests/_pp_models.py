"""Tiny transformers models and batches for the am-pp tests (built in code, never downloaded).

Each `CASES[name]()` returns a fresh fp32 model in train mode (dropout 0, so train and eval
agree), seeded so that every rank builds the same weights, and `batch(name, ...)` returns a
global batch: input_ids, labels (with ignored targets), and the first stage's image inputs
split per microbatch where the model takes images.
"""

from __future__ import annotations

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


def _seeded(build):
    def make(**overrides):
        torch.manual_seed(0)
        model = build(**overrides).float()
        return model.train()

    make.__name__ = build.__name__
    return make


@_seeded
def llama(**overrides):
    cfg = LlamaConfig(
        **{
            **dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
                attn_implementation="eager",
            ),
            **overrides,
        }
    )
    return LlamaForCausalLM(cfg)


@_seeded
def qwen3(**overrides):
    cfg = Qwen3Config(
        **{
            **dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=64,
                tie_word_embeddings=False,
                attn_implementation="sdpa",
                # two sliding layers, window shorter than SEQ: both mask kinds are exercised
                use_sliding_window=True,
                sliding_window=5,
                max_window_layers=2,
            ),
            **overrides,
        }
    )
    return Qwen3ForCausalLM(cfg)


def _pixtral_config():
    return dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=8,
        patch_size=2,
        num_channels=3,
    )


@_seeded
def mistral3(**overrides):
    text = dict(
        model_type="mistral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=None,
    )
    cfg = Mistral3Config(
        **{
            **dict(
                text_config=text,
                vision_config=_pixtral_config(),
                image_token_id=IMAGE_TOKEN,
                spatial_merge_size=2,
                vision_feature_layer=-1,
                tie_word_embeddings=False,
                attn_implementation="eager",
            ),
            **overrides,
        }
    )
    return Mistral3ForConditionalGeneration(cfg)


def _gemma4_text(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        max_position_embeddings=64,
        sliding_window=5,
        hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2),
        final_logit_softcapping=30.0,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    base.update(overrides)
    return base


@_seeded
def gemma4_moe(**overrides):
    cfg = Gemma4TextConfig(
        **_gemma4_text(
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
            attn_implementation="eager",
            **overrides,
        ),
    )
    return Gemma4ForCausalLM(cfg)


@_seeded
def gemma4_vlm(**overrides):
    vision = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=2,
        pooling_kernel_size=2,
        position_embedding_size=16,
    )
    cfg = Gemma4Config(
        **{
            **dict(
                text_config=_gemma4_text(),
                vision_config=vision,
                audio_config=None,
                image_token_id=IMAGE_TOKEN,
                tie_word_embeddings=False,
                attn_implementation="eager",
            ),
            **overrides,
        }
    )
    return Gemma4ForConditionalGeneration(cfg)


CASES = {
    "llama": llama,
    "qwen3": qwen3,
    "mistral3": mistral3,
    "gemma4_moe": gemma4_moe,
    "gemma4_vlm": gemma4_vlm,
}

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
