"""Nemotron-H building blocks: attention, dense relu2 MLP, the pre-norm block, the mixer table.

Every block is `x + mixer(norm(x))`; the mixer is chosen per layer from the
config's block pattern through `MIXER_BUILDERS`, which accepts both the
transformers 5 names (`layers_block_type`: "linear_attention",
"full_attention", "mlp", "moe") and the `hybrid_override_pattern`
characters of released checkpoints ("M", "*", "-", "E").

Attention has no positional embedding (Nemotron-H relies on its Mamba
layers for order) and uses grouped-query heads. Its kernel is picked by
`BackendConfig.attn` from `ATTENTION_BACKENDS`: "sdpa", "eager" and "flex"
run on CPU and take a dense mask; "te" (Transformer Engine) needs CUDA and
the `te` extra, and takes packed or padded batches as sequence boundaries
(`VarlenSeqs`, Transformer Engine's THD / cu_seqlens form) instead of a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from am_dtype.backend import HAVE_TE, BackendConfig, initialize_linear_module
from am_dtype.backend import initialize_rms_norm_module as _rms_norm

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


def model_dtype(config: Any) -> torch.dtype:
    """Parameter dtype from `config.dtype` (a string or torch.dtype); bfloat16 when unset."""
    from am_dtype.backend import resolve_dtype

    # transformers 5 spells it `dtype` (reading `torch_dtype` there warns); v4 `torch_dtype`.
    value = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    return resolve_dtype(value, name="config.dtype") or torch.bfloat16


class _Relu2(torch.autograd.Function):
    """relu(x)^2 saving only r = relu(x); the gradient is 2 r g.

    Autograd through `square(relu(x))` runs pow's generic backward (pow(r, 1), two products)
    then relu's mask: measured ~3x slower on CPU than these two passes, for equal values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, Nemotron-H's MLP and expert activation."""
    return _Relu2.apply(x)


class NemotronMLP(nn.Module):
    """Dense non-gated MLP: down_proj(relu2(up_proj(x)))."""

    def __init__(self, config: Any, backend: BackendConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        dtype = model_dtype(config)
        bias = config.mlp_bias
        self.up_proj = initialize_linear_module(
            backend.linear, config.hidden_size, inter, bias=bias, dtype=dtype
        )
        self.down_proj = initialize_linear_module(
            backend.linear, inter, config.hidden_size, bias=bias, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


# --------------------------------------------------------------------------- attention kernels
# q: [B, H, Q, Dh]; k, v: [B, Hkv, K, Dh]; mask: None (plain causal when Q == K, none when
# Q == 1) or [B or 1, 1, Q, K] bool (True = may attend) / additive float.


def _to_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    # Additive float masks use 0 for "attend" and a large negative value for "blocked".
    return mask if mask.dtype == torch.bool else mask == 0


def _explicit_mask(q_len: int, k_len: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    if mask is not None:
        return _to_bool_mask(mask)
    # Causal aligned to the end of the keys (queries are the last q_len positions).
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]


def _sdpa_attention(module, q, k, v, mask, scale, varlen=None):
    q_len, k_len = q.shape[2], k.shape[2]
    if mask is None and q_len != k_len and q_len != 1:
        mask = _explicit_mask(q_len, k_len, None, q.device)
    is_causal = mask is None and q_len == k_len and q_len > 1
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        dropout_p=module.dropout_p if module.training else 0.0,
    )


def _eager_attention(module, q, k, v, mask, scale, varlen=None):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    elif mask is not None or q.shape[2] > 1:
        allowed = _explicit_mask(q.shape[2], k.shape[2], mask, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=module.dropout_p, training=module.training)
    return torch.matmul(probs, v)


def _flex_attention(module, q, k, v, mask, scale, varlen=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    allowed = _explicit_mask(q.shape[2], k.shape[2], mask, q.device)
    allowed = allowed.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        # torch's CPU FlexAttention has no backward; the same mask through SDPA is the same math.
        _warn_once("attn='flex' on CPU with autograd runs the equivalent masked SDPA")
        return _sdpa_attention(module, q, k, v, allowed, scale)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, 0, q_idx, kv_idx]

    block_mask = create_block_mask(
        mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device.type
    )
    return flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import logging

        logging.getLogger(__name__).warning(message)


@dataclass
class VarlenSeqs:
    """A packed or padded batch as Transformer Engine's THD ("varlen") attention takes it.

    The queries [B, Q] and keys [B, K] of one attention call are flattened row-major;
    `q_index` / `kv_index` pick, in order, the tokens that take part (None: all of them,
    as in a packed [1, T] batch without padding). The picked tokens are laid out as
    [T, heads, head_dim], sequence i holding rows cu_seqlens[i]:cu_seqlens[i + 1] and
    attending causally only within itself. Built once per forward by the model
    (`build_varlen_seqs` in model.py) and shared by every attention layer.

    cu_seqlens_q / cu_seqlens_kv: [N + 1] int32 cumulative sequence lengths.
    max_seqlen_q / max_seqlen_kv: the longest sequence (Python ints, no device sync later).
    attn_mask_type: "padding_causal" (queries and keys are the same tokens) or
        "padding_causal_bottom_right" (decoding a padded batch with a cache: each
        sequence's queries are its last keys).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int
    q_index: torch.Tensor | None = None
    kv_index: torch.Tensor | None = None
    attn_mask_type: str = "padding_causal"


def _to_thd(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    # [B, H, S, Dh] -> [B * S, H, Dh] (a view when x came from a projection), then the picked rows.
    t = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return t if index is None else t.index_select(0, index)


def _te_attention(module, q, k, v, mask, scale, varlen: VarlenSeqs | None = None):
    """Transformer Engine DotProductAttention; one module, the layout chosen per call.

    Without `varlen` (unpadded batches, decode with a cache): "bshd" [B, S, H, Dh] with
    the module's "causal_bottom_right" mask (plain causal when Q == K; decode rows see
    the whole cache). With `varlen` (packed and/or padded batches): "thd" [T, H, Dh]
    with `qkv_format`, `attn_mask_type`, `cu_seqlens_q/kv` and `max_seqlen_q/kv` passed
    to forward, which overrides the construction-time format and mask type; TE never
    attends across a cu_seqlens boundary. Query rows left out by `varlen.q_index`
    (padding) come back as zeros. TE's default softmax scale is head_dim**-0.5 == scale.
    """
    if mask is not None:
        raise ValueError(
            "attn='te' takes sequence boundaries, not a dense attention mask: pass packed "
            "sequences as cu_seqlens or seq_idx and padding as a 2D attention_mask or "
            "padding_mask; an explicit 4D attention_mask or causal_mask_mapping needs "
            "attn='sdpa', 'flex' or 'eager'"
        )
    B, H, Q, D = q.shape
    if varlen is None:
        out = module.te_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.view(B, Q, H, D).transpose(1, 2)
    out = module.te_attn(
        _to_thd(q, varlen.q_index),
        _to_thd(k, varlen.kv_index),
        _to_thd(v, varlen.kv_index),
        qkv_format="thd",
        attn_mask_type=varlen.attn_mask_type,
        cu_seqlens_q=varlen.cu_seqlens_q,
        cu_seqlens_kv=varlen.cu_seqlens_kv,
        max_seqlen_q=varlen.max_seqlen_q,
        max_seqlen_kv=varlen.max_seqlen_kv,
    ).reshape(-1, H * D)
    if varlen.q_index is not None:
        out = out.new_zeros(B * Q, H * D).index_copy(0, varlen.q_index, out)
    return out.view(B, Q, H, D).transpose(1, 2)


# Every kernel is kernel(module, q, k, v, mask, scale, varlen) with q/k/v [B, H, S, Dh]:
# sdpa / eager / flex read the dense `mask` (varlen is None for them), te the `varlen`
# sequence boundaries.
ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa_attention,
    "eager": _eager_attention,
    "flex": _flex_attention,
    "te": _te_attention,
}


class NemotronAttention(nn.Module):
    """Grouped-query self-attention without positional embedding (Nemotron-H)."""

    def __init__(self, config: Any, layer_idx: int, backend: BackendConfig):
        super().__init__()
        if backend.attn not in ATTENTION_BACKENDS:
            raise ValueError(
                f"BackendConfig.attn={backend.attn!r} is not supported by Nemotron-H attention; "
                f"accepted: {sorted(ATTENTION_BACKENDS)}"
            )
        self.layer_idx = layer_idx
        self.attn_backend = backend.attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        self.scale = self.head_dim**-0.5
        self.dropout_p = float(config.attention_dropout)
        dtype, bias, hidden = model_dtype(config), config.attention_bias, config.hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        lin = backend.linear
        self.q_proj = initialize_linear_module(lin, hidden, q_dim, bias=bias, dtype=dtype)
        self.k_proj = initialize_linear_module(lin, hidden, kv_dim, bias=bias, dtype=dtype)
        self.v_proj = initialize_linear_module(lin, hidden, kv_dim, bias=bias, dtype=dtype)
        self.o_proj = initialize_linear_module(lin, q_dim, hidden, bias=bias, dtype=dtype)
        if backend.attn == "te":
            self.te_attn = _build_te_attention(
                self.num_heads, self.num_kv_heads, self.head_dim, self.dropout_p
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
        kernel = ATTENTION_BACKENDS[self.attn_backend]
        out = kernel(self, q, k, v, attention_mask, self.scale, varlen)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


def _build_te_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, dropout: float = 0.0
) -> nn.Module:
    """One TE DotProductAttention per layer, built for the unpadded "bshd" path.

    `qkv_format` and `attn_mask_type` given here are defaults that TE's forward lets a
    call override (documented for both arguments); `_te_attention` overrides them with
    "thd" / "padding_causal[_bottom_right]" for packed or padded batches, so one module
    (one set of FP8 / backend state) serves both layouts.
    """
    if not HAVE_TE:
        raise ImportError("attn='te' needs transformer_engine; install the 'te' extra of am-dtype")
    import transformer_engine.pytorch as te

    return te.DotProductAttention(
        num_heads,
        head_dim,
        num_gqa_groups=num_kv_heads,
        attention_dropout=dropout,
        # Bottom-right alignment keeps decode rows (1 query, many cached keys) fully visible.
        attn_mask_type="causal_bottom_right",
        qkv_format="bshd",
    )


# --------------------------------------------------------------------------- the block


@dataclass
class BlockInputs:
    """What the mixers of one forward need besides the hidden states.

    attention_mask: attention mask (see ATTENTION_BACKENDS) or None for plain causal.
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
            dtype=model_dtype(config),
        )
        self.mixer = build(config, layer_idx, backend, moe_config)

    def forward(self, x: torch.Tensor, inputs: BlockInputs | None = None) -> torch.Tensor:
        inputs = inputs if inputs is not None else BlockInputs()
        return x + self._call(self.mixer, self.norm(x), inputs, self.layer_idx)


# --------------------------------------------------------------------------- initialization
# transformers' NemotronH `_init_weights`: normal(0, initializer_range) for projections,
# router and experts, ones for norms. Mamba2Mixer and am-moe's MoE carry their own recipes
# (A_log / D / dt_bias, out_proj rescaling; gate, experts, shared experts, latent projections).


def init_linear(module: nn.Module, std: float) -> None:
    """normal(0, std) weight, zero bias."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_norm(module: nn.Module) -> None:
    """RMSNorm weight to ones."""
    nn.init.ones_(module.weight)


def _init_projections(mixer: nn.Module, config: Any, buffer_device) -> None:
    for module in mixer.modules():
        if isinstance(module, nn.Linear):
            init_linear(module, config.initializer_range)


MIXER_INIT: dict[str, Callable[[nn.Module, Any, Any], None]] = {
    "mamba": lambda mixer, config, device: mixer.init_weights(),
    "attention": _init_projections,
    "mlp": _init_projections,
    "moe": lambda mixer, config, device: mixer.init_weights(device, config.initializer_range),
}


@torch.no_grad()
def init_block_weights(block: nn.Module, config: Any, buffer_device=None) -> None:
    """Initialize one (possibly checkpoint-wrapped) Nemotron block or MTP sub-layer in place."""
    block = getattr(block, "_checkpoint_wrapped_module", block)
    init_norm(block.norm)
    MIXER_INIT[block.block_type](block.mixer, config, buffer_device)
    for name in ("enorm", "hnorm", "final_layernorm"):  # MTP sub-layer extras
        if hasattr(block, name):
            init_norm(getattr(block, name))
    if hasattr(block, "eh_proj"):
        init_linear(block.eh_proj, config.initializer_range)
