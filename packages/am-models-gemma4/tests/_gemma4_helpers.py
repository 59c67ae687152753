"""Tiny Gemma 4 configs and reference-model helpers shared by this package's tests."""

from __future__ import annotations

import torch
from transformers import Gemma4Config

from am_dtype.backend import BackendConfig

VOCAB = 128
TEXT_VOCAB = VOCAB - 8  # ids above are the special (image, video, audio, ...) tokens
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_moe_text(**overrides) -> dict:
    """A 4-layer MoE text config: sliding window 6 (< the test sequences), k_eq_v full layers
    with wider heads and one K/V head, final softcapping, 8 experts top-2."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=6,
        layer_types=list(LAYER_TYPES),
        attention_k_eq_v=True,
        final_logit_softcapping=30.0,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=16,
        hidden_size_per_layer_input=0,
        initializer_range=0.2,  # logits far from uniform, so losses discriminate
        dtype="float32",
    )
    values.update(overrides)
    return values


def tiny_kv_shared_text(**overrides) -> dict:
    """An E2B-like dense text config: per-layer input embeddings, double-wide MLP in the
    K/V-shared layers, the last 2 of 5 layers sharing K/V."""
    values = dict(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        global_head_dim=16,
        sliding_window=6,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        final_logit_softcapping=30.0,
        initializer_range=0.2,
        dtype="float32",
    )
    values.update(overrides)
    return values


def tiny_vision() -> dict:
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=2,
        pooling_kernel_size=2,
        position_embedding_size=64,
        dtype="float32",
    )


def gemma4_config(text: dict, vision: dict | None = None, **top) -> Gemma4Config:
    values = dict(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        dtype="float32",
        image_token_id=VOCAB - 1,
        boi_token_id=VOCAB - 2,
        eoi_token_id=VOCAB - 3,
        video_token_id=VOCAB - 4,
        audio_token_id=VOCAB - 5,
        boa_token_id=VOCAB - 6,
        eoa_token_index=VOCAB - 7,
    )
    values.update(top)
    return Gemma4Config(**values)


def cpu_backend(**overrides) -> BackendConfig:
    """fp32-exact CPU backend (sdpa attention)."""
    values = dict(attn="sdpa", linear="torch", rms_norm="torch_fp32")
    values.update(overrides)
    return BackendConfig(**values)


def randomize_hf(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial router scales, per-expert scales, norm weights and layer scalars
    (transformers' init leaves them all at 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or leaf in ("scale", "per_expert_scale", "layer_scalar"):
                tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=gen))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
