"""Nemotron-H building blocks: attention, dense relu2 MLP, the pre-norm block, the mixer table.

Every block is `x + mixer(norm(x))`; the mixer is chosen per layer from the
config's block pattern through `MIXER_BUILDERS`, which accepts both the
transformers 5 names (`layers_block_type`: "linear_attention",
"full_attention", "mlp", "moe") and the `hybrid_override_pattern`
characters of released checkpoints ("M", "*", "-", "E").

Attention has no positional embedding (Nemotron-H relies on its Mamba
layers for order) and uses grouped-query heads. Its kernel is am-utils'
`AttentionKernel`, picked by `BackendConfig.attn` from
`am_utils.attention.ATTENTION_KERNELS`: "sdpa", "eager" and "flex" run on CPU
and take a dense mask; "te" (Transformer Engine) needs CUDA and the `te`
extra, and takes packed or padded batches as sequence boundaries
(`VarlenSeqs`, Transformer Engine's THD / cu_seqlens form) instead of a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.backend import initialize_rms_norm_module as _rms_norm
from am_dtype.dtypes import config_dtype
from am_moe.activation_checkpointing import unwrap_checkpointed
from am_moe.layers import MLP
from am_utils.attention import AttentionKernel, VarlenSeqs

# Canonical block type for every spelling accepted in a config.
BLOCK_TYPE_ALIASES: dict[str, str] = {
    "M": "mamba",
    "mamba": "mamba",
    "linear_attention": "mamba",
    "*": "attention",
    "attention": "attention",
    "full_attention": "attention",
    "-": "mlp",
    "mlp": "mlp",
    "E": "moe",
    "moe": "moe",
}

# Canonical block type -> (HF layers_block_type name, pattern character).
HF_BLOCK_NAMES: dict[str, tuple[str, str]] = {
    "mamba": ("linear_attention", "M"),
    "attention": ("full_attention", "*"),
    "mlp": ("mlp", "-"),
    "moe": ("moe", "E"),
}


def canonical_block_type(name: str) -> str:
    """Map a `layers_block_type` name or pattern character to mamba/attention/mlp/moe."""
    try:
        return BLOCK_TYPE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unknown Nemotron-H block type {name!r}; accepted: {sorted(BLOCK_TYPE_ALIASES)}"
        ) from None


def resolve_block_types(config: Any, attr: str = "layers_block_type") -> list[str]:
    """Canonical block types of every layer, from `layers_block_type` or the pattern string."""
    pattern_attr = {
        "layers_block_type": "hybrid_override_pattern",
        "mtp_layers_block_type": "mtp_hybrid_override_pattern",
    }[attr]
    names = getattr(config, attr, None)
    if names is None:
        names = getattr(config, pattern_attr, None)
    if names is None:
        raise ValueError(f"config has neither {attr} nor {pattern_attr}")
    return [canonical_block_type(n) for n in names]


class NemotronMLP(MLP):
    """Dense non-gated MLP: down_proj(relu2(up_proj(x))), am-moe's `MLP` built from a config."""

    def __init__(self, config: Any, backend: BackendConfig, intermediate_size: int | None = None):
        super().__init__(
            config.hidden_size,
            intermediate_size or config.intermediate_size,
            backend.linear,
            config_dtype(config),
            activation="relu2",
            bias=config.mlp_bias,
            cpu_gemm=backend.cpu_gemm,
        )


class NemotronAttention(nn.Module):
    """Grouped-query self-attention without positional embedding (Nemotron-H).

    The kernel after the projections is am-utils' `AttentionKernel` (`BackendConfig.attn`,
    `compile_attn`), held as `attn`.
    """

    def __init__(self, config: Any, layer_idx: int, backend: BackendConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.attn = AttentionKernel(
            backend.attn,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            dropout=float(config.attention_dropout),
            compile=backend.compile_attn,
        )
        dtype, bias, hidden = config_dtype(config), config.attention_bias, config.hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        lin, gemm = backend.linear, backend.cpu_gemm
        self.q_proj = initialize_linear_module(
            lin, hidden, q_dim, bias=bias, dtype=dtype, cpu_gemm=gemm
        )
        self.k_proj = initialize_linear_module(
            lin, hidden, kv_dim, bias=bias, dtype=dtype, cpu_gemm=gemm
        )
        self.v_proj = initialize_linear_module(
            lin, hidden, kv_dim, bias=bias, dtype=dtype, cpu_gemm=gemm
        )
        self.o_proj = initialize_linear_module(
            lin, q_dim, hidden, bias=bias, dtype=dtype, cpu_gemm=gemm
        )

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        varlen: VarlenSeqs | None = None,
    ) -> torch.Tensor:
        """Attend over the sequence (and the cached keys/values when `kv_cache` is given).

        `attention_mask` is the dense mask of the sdpa / eager / flex kernels; `varlen`
        the sequence boundaries of the te kernel (each backend ignores the other's).
        """
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)
        out = self.attn(q, k, v, attention_mask, varlen)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, init_std: float = 0.02):
        """normal(0, init_std) q/k/v/o weights, zero biases (whatever linear class built them)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_linear(proj, init_std)


# --------------------------------------------------------------------------- the block


@dataclass
class BlockInputs:
    """What the mixers of one forward need besides the hidden states.

    attention_mask: dense attention mask (see am_utils.masks) or None for plain causal.
    token_mask: [B, S] bool, True = real token (not padding), consumed by Mamba and MoE.
    seq_idx: [B, S] int32 sequence index of packed (THD) tokens, consumed by Mamba.
    cache: a NemotronHybridCache for incremental decoding, or None.
    varlen: the same packing / padding as sequence boundaries (`VarlenSeqs`), consumed by
        attn='te' instead of `attention_mask`; None for plain causal.
    """

    attention_mask: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    seq_idx: torch.Tensor | None = None
    cache: Any = None
    varlen: VarlenSeqs | None = None


def _build_mamba(config, layer_idx, backend, moe_config):
    from am_models_nemotron.mamba import Mamba2Mixer

    return Mamba2Mixer(config, layer_idx=layer_idx, backend=backend)


def _build_attention(config, layer_idx, backend, moe_config):
    return NemotronAttention(config, layer_idx, backend)


def _build_mlp(config, layer_idx, backend, moe_config):
    return NemotronMLP(config, backend)


def _build_moe(config, layer_idx, backend, moe_config):
    from dataclasses import replace

    from am_moe.layers import MoE

    if moe_config is None:
        raise ValueError(f"layer {layer_idx} is a MoE block but no moe_config was given")
    if backend.gate_precision is None:
        # transformers' Nemotron-H router computes its logits in fp32 whatever the model dtype.
        backend = replace(backend, gate_precision=torch.float32)
    return MoE(moe_config, backend)


def _call_mamba(mixer, x, inputs: BlockInputs, layer_idx: int):
    state = inputs.cache.mamba_state(layer_idx) if inputs.cache is not None else None
    return mixer(x, attention_mask=inputs.token_mask, seq_idx=inputs.seq_idx, state=state)


def _call_attention(mixer, x, inputs: BlockInputs, layer_idx: int):
    return mixer(
        x, attention_mask=inputs.attention_mask, kv_cache=inputs.cache, varlen=inputs.varlen
    )


def _call_mlp(mixer, x, inputs: BlockInputs, layer_idx: int):
    return mixer(x)


def _call_moe(mixer, x, inputs: BlockInputs, layer_idx: int):
    # am-moe's padding_mask is True at padding.
    padding = None if inputs.token_mask is None else ~inputs.token_mask
    return mixer(x, padding_mask=padding)


# Canonical block type -> (builder, caller). One row per mixer kind.
MIXER_BUILDERS: dict[str, tuple[Callable[..., nn.Module], Callable[..., torch.Tensor]]] = {
    "mamba": (_build_mamba, _call_mamba),
    "attention": (_build_attention, _call_attention),
    "mlp": (_build_mlp, _call_mlp),
    "moe": (_build_moe, _call_moe),
}


class NemotronBlock(nn.Module):
    """Pre-norm residual block: `x + mixer(norm(x))` with the mixer named by `block_type`."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        block_type: str,
        backend: BackendConfig,
        moe_config: Any = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = canonical_block_type(block_type)
        build, self._call = MIXER_BUILDERS[self.block_type]
        self.norm = _rms_norm(
            backend.rms_norm,
            config.hidden_size,
            eps=config.layer_norm_epsilon,
            dtype=config_dtype(config),
        )
        self.mixer = build(config, layer_idx, backend, moe_config)

    def forward(self, x: torch.Tensor, inputs: BlockInputs | None = None) -> torch.Tensor:
        inputs = inputs if inputs is not None else BlockInputs()
        return x + self._call(self.mixer, self.norm(x), inputs, self.layer_idx)


# --------------------------------------------------------------------------- initialization
# transformers' NemotronH `_init_weights`: normal(0, initializer_range) for projections,
# router and experts, ones for norms. Every mixer has the components' one init API,
# `init_weights(buffer_device=None, init_std=...)`, with its own recipe (Mamba2Mixer: A_log /
# D / dt_bias, out_proj rescaling; am-moe's MoE: gate, experts, shared experts, latent
# projections). Projections are initialized by name, not by type, so every module
# `BackendConfig.linear` builds (nn.Linear, te.Linear) is covered.


def init_linear(module: nn.Module, std: float) -> None:
    """normal(0, std) weight, zero bias."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_norm(module: nn.Module) -> None:
    """RMSNorm weight to ones."""
    nn.init.ones_(module.weight)


@torch.no_grad()
def init_block_weights(block: nn.Module, config: Any, buffer_device=None) -> None:
    """Initialize one (possibly checkpoint-wrapped) Nemotron block or MTP sub-layer in place."""
    block = unwrap_checkpointed(block)
    init_norm(block.norm)
    block.mixer.init_weights(buffer_device, config.initializer_range)
    for name in ("enorm", "hnorm", "final_layernorm"):  # MTP sub-layer extras
        if hasattr(block, name):
            init_norm(getattr(block, name))
    if hasattr(block, "eh_proj"):
        init_linear(block.eh_proj, config.initializer_range)
