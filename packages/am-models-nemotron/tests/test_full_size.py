"""A released Nemotron-H configuration built on the meta device, with an exact parameter count."""

from __future__ import annotations

import time

import torch
from transformers import NemotronHConfig

from am_models_nemotron import NemotronHForCausalLM
from am_utils import count_model_parameters, init_empty_weights

# Published values of NVIDIA-Nemotron-3-Nano-30B-A3B (config.json of the Hugging Face repo
# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16): 52 layers = 23 Mamba2 + 23 MoE + 6 attention.
NANO_30B_A3B = dict(
    vocab_size=131072,
    hidden_size=2688,
    hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=1856,
    mamba_num_heads=64,
    mamba_head_dim=64,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    expand=2,
    chunk_size=128,
    n_routed_experts=128,
    num_experts_per_tok=6,
    moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    use_bias=False,
    use_conv_bias=True,
    mlp_bias=False,
    attention_bias=False,
    dtype="bfloat16",
)


def _expected_parameters(c: dict) -> int:
    """Closed-form count from the published shapes (independent of the model code)."""
    H, V = c["hidden_size"], c["vocab_size"]
    inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    conv_dim = inner + 2 * c["n_groups"] * c["ssm_state_size"]
    heads = c["mamba_num_heads"]
    mamba = (
        H * (inner + conv_dim + heads)  # in_proj
        + conv_dim * c["conv_kernel"]
        + conv_dim  # depthwise conv weight + bias
        + 3 * heads  # dt_bias, A_log, D
        + inner  # gated norm
        + inner * H  # out_proj
    )
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    attention = H * q + 2 * H * kv + q * H
    E, F, Fs = (
        c["n_routed_experts"],
        c["moe_intermediate_size"],
        c["moe_shared_expert_intermediate_size"],
    )
    moe = E * H + E * 2 * H * F + 2 * H * Fs  # router + experts (up, down) + shared expert
    mlp = 2 * H * c["intermediate_size"]
    per_type = {"M": mamba, "*": attention, "E": moe, "-": mlp}
    blocks = sum(per_type[t] + H for t in c["hybrid_override_pattern"])  # + block norm
    return 2 * V * H + H + blocks  # embeddings + lm_head + final norm


def test_nano_30b_a3b_builds_on_meta_fast_with_exact_parameter_count():
    config = NemotronHConfig(**NANO_30B_A3B)
    start = time.perf_counter()
    with init_empty_weights():
        model = NemotronHForCausalLM(config)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"building on meta took {elapsed:.1f}s"
    assert all(p.is_meta for p in model.parameters())
    assert model.model.layers["5"].block_type == "attention"
    _, total = count_model_parameters(model)
    assert (
        total == _expected_parameters(NANO_30B_A3B) == 31_577_937_344
    )  # ~31.6B, the published total
    # e_score_correction_bias is a buffer: in the state dict, not among the parameters.
    assert "model.layers.1.mixer.gate.e_score_correction_bias" in model.state_dict()
    assert model.model.layers["1"].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
