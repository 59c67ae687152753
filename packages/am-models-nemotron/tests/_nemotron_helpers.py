"""Tiny Nemotron-H configs and reference-model helpers shared by this package's tests."""

from __future__ import annotations

import torch
from transformers import NemotronHConfig

from am_dtype.backend import BackendConfig

PATTERN = ["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"]


def tiny_config(pattern=None, latent: int | None = None, **overrides) -> NemotronHConfig:
    """A few-thousand-parameter NemotronH config with every block type."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        layers_block_type=list(pattern or PATTERN),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        moe_latent_size=latent,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        dtype="float32",
    )
    values.update(overrides)
    return NemotronHConfig(**values)


def cpu_backend(**overrides) -> BackendConfig:
    """fp32-exact CPU backend (sdpa attention, per-expert loop)."""
    values = dict(attn="sdpa", linear="torch", rms_norm="torch_fp32", experts="torch")
    values.update(overrides)
    return BackendConfig(**values)


def randomize_hf(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the reference non-trivial correction biases and norm weights (init leaves them 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
