"""Gemma 4 text attention on the shared kernels: `Gemma4Attention`.

Same parameters (names, shapes, init) and numerics as transformers' `Gemma4TextAttention`,
which it subclasses, with the parts a `BackendConfig` selects routed through the shared
plumbing:

- projections: `am_dtype.backend.initialize_linear_module(backend.linear, ...)` (q/k/v/o);
- q/k RMSNorm (scaled), v RMSNorm (unscaled), then RoPE through
  `am_utils.rope.apply_rotary_pos_emb(fused=backend.rope_fusion)` (Gemma 4's cos/sin:
  default RoPE on sliding layers, proportional partial RoPE on full layers);
- the attention itself: `am_utils.attention.AttentionKernel(backend.attn,
  compile=backend.compile_attn)` with softmax scale 1.0 (Gemma 4's queries are pre-normed).
  "sdpa", "flex" and "eager" read the dense mask transformers builds for the layer type
  (bool, `None` = plain causal; the sliding window and image blocks are part of it), eager
  in its additive form so fully padded rows stay finite. "te" reads sequence boundaries:
  the layer's mask must be exactly causal (and windowed on sliding layers) over the real
  tokens of a padded batch, which is checked against the 2D padding mask (`_TEBoundaries`);
  any other pattern (image blocks, packed documents, a custom 4D mask) is an error naming
  the kernels that take it, never attended wrongly. On CPU, "sdpa" runs per query chunk
  over the keys the chunk may see: in fp32 on oneDNN GEMMs (causal or a bool mask,
  `am_models_gemma4.gemm_attention`), else through sdpa with a bool mask
  (`am_models_gemma4.windowed`);
- K/V sharing (E2B/E4B): a "reuse" layer reads its source layer's K/V from the per-forward
  `shared_kv_states` store, a "store" layer writes it, as transformers does;
- context parallelism: after `setup_cp_attention` (`_am_cp_group` set) the ring attention
  of `am_models_gemma4.cp` replaces the kernel.

Shape legend: B batch, S queries, K keys, H heads, G K/V heads, D head dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

from am_dtype.backend import BackendConfig, initialize_linear_module
from am_dtype.cpu_gemm import CpuGemmLinear, resolve_cpu_gemm
from am_dtype.dtypes import config_dtype
from am_models_gemma4.gemm_attention import gemm_attention
from am_models_gemma4.norm import FusedGemma4RMSNorm
from am_models_gemma4.windowed import chunked_masked_attention
from am_utils.attention import AttentionKernel, VarlenSeqs, build_varlen_seqs, is_block_mask
from am_utils.masks import causal_mask, to_additive_mask, to_bool_mask
from am_utils.rope import apply_rotary_pos_emb

__all__ = ["Gemma4Attention", "TE_MASK", "use_backend_linears"]

# transformers attention-implementation name the text config carries under attn="te": its
# mask function builds the usual bool masks, which `Gemma4Attention` checks and turns into
# TE's boundaries.
TE_MASK = "am_gemma4_te"


def use_backend_linears(
    module: torch.nn.Module, names: tuple[str, ...], backend: BackendConfig, dtype: torch.dtype
) -> None:
    """Rebuild `module`'s `nn.Linear` children `names` with `backend.linear` (same shapes,
    bias and names). "torch" keeps transformers' parameters in an `am_dtype.CpuGemmLinear`
    (an `nn.Linear` whose fp32 CPU GEMMs run on `backend.cpu_gemm`'s kernel)."""
    for name in names:
        old = getattr(module, name, None)
        if old is None:
            continue
        if backend.linear == "torch":
            setattr(module, name, CpuGemmLinear.from_linear(old, backend.cpu_gemm))
            continue
        new = initialize_linear_module(
            backend.linear,
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=dtype,
        )
        setattr(module, name, new)


class _TEBoundaries:
    """Per-forward THD boundaries for attn="te": the 2D padding mask of the batch (True =
    real token; None = no padding) and the boundaries built per (queries, keys, mask) once."""

    def __init__(self, token_mask: Tensor | None) -> None:
        self.token_mask = token_mask
        self._built: dict[tuple, VarlenSeqs | None] = {}

    def get(self, mask: Tensor | None, q_len: int, k_len: int, batch: int, window: int | None):
        key = (id(mask), q_len, k_len, window)
        if key not in self._built:
            if mask is not None:
                self._check(mask, q_len, k_len, batch, window)
            token_mask = self.token_mask
            if token_mask is not None and bool(token_mask.all()):
                token_mask = None
            self._built[key] = build_varlen_seqs(q_len, k_len, batch, token_mask, None)
        return self._built[key]

    def _check(self, mask: Tensor, q_len: int, k_len: int, batch: int, window: int | None):
        """The layer's dense mask must be what TE computes from the boundaries (on every
        real query row; TE returns zeros on padded ones)."""
        expected = causal_mask(q_len, k_len, sliding_window=window, device=mask.device)
        expected = expected.expand(batch, 1, q_len, k_len)
        real_q = torch.ones(batch, q_len, dtype=torch.bool, device=mask.device)
        if self.token_mask is not None:
            keys = self.token_mask[:, -k_len:].to(mask.device, torch.bool)
            expected = expected & keys[:, None, None, :]
            real_q = keys[:, -q_len:]
        got = to_bool_mask(mask).expand(batch, 1, q_len, k_len)
        if not bool((got == expected).all(-1).squeeze(1)[real_q].all()):
            raise ValueError(
                "attn='te' attends causally (within the sliding window on sliding layers) over "
                "the real tokens given by a 2D attention_mask; this batch needs another pattern "
                "(image tokens attending both ways, packed documents, or a custom 4D mask), "
                "which needs BackendConfig(attn='sdpa'), 'flex' or 'eager'"
            )


class Gemma4Attention(Gemma4TextAttention):
    """transformers' Gemma 4 text attention with the backend-selected linear, RoPE and
    attention kernel (see the module docstring). Parameters keep transformers' names."""

    def __init__(self, config: Any, layer_idx: int, backend: BackendConfig) -> None:
        super().__init__(config, layer_idx)
        dtype = config_dtype(config)
        use_backend_linears(self, ("q_proj", "k_proj", "v_proj", "o_proj"), backend, dtype)
        # The per-head norms with the hand-written backward (transformers' numerics).
        for name in ("q_norm", "k_norm", "v_norm"):
            old = getattr(self, name, None)
            if old is not None:
                new = FusedGemma4RMSNorm(self.head_dim, eps=old.eps, with_scale=old.with_scale)
                setattr(self, name, new.to(dtype))
        self.rope_fusion = backend.rope_fusion
        heads = config.num_attention_heads
        kv_heads = heads // self.num_key_value_groups
        self.attn_backend = backend.attn
        self.cpu_gemm = backend.cpu_gemm
        # Under "te" the window is the TE module's; the other kernels read it from the mask.
        window = self.sliding_window if backend.attn == "te" else None
        self.kernel = AttentionKernel(
            backend.attn,
            heads,
            kv_heads,
            self.head_dim,
            scale=self.scaling,
            dropout=self.attention_dropout,
            sliding_window=window,
            compile=backend.compile_attn,
        )
        self._am_cp_group = None
        self._bidirectional_images = config.use_bidirectional_attention == "vision"

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        shared_kv_states: Any,
        past_key_values: Any = None,
        position_ids: Tensor | None = None,
        am_te_boundaries: _TEBoundaries | None = None,
        am_cp_meta: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, None]:
        """hidden_states [B, S, H*D] -> ([B, S, hidden], None)."""
        B, S = hidden_states.shape[:2]
        shape = (B, S, -1, self.head_dim)
        cos, sin = position_embeddings
        q = self.q_norm(self.q_proj(hidden_states).view(shape))
        if self.is_kv_shared_layer:
            q, _ = apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2, fused=self.rope_fusion)
            k, v = shared_kv_states[self.layer_type]
        else:
            k_raw = self.k_proj(hidden_states).view(shape)
            # attention_k_eq_v full layers: the values are the keys' projection (pre-norm).
            v_raw = self.v_proj(hidden_states).view(shape) if self.v_proj is not None else k_raw
            q, k = apply_rotary_pos_emb(
                q, self.k_norm(k_raw), cos, sin, unsqueeze_dim=2, fused=self.rope_fusion
            )
            k = k.transpose(1, 2)
            v = self.v_norm(v_raw).transpose(1, 2)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
        if self.store_full_length_kv:
            shared_kv_states[self.layer_type] = k, v
        q = q.transpose(1, 2)
        if self._am_cp_group is not None:
            from am_models_gemma4.cp import cp_attention

            out, _ = cp_attention(
                self,
                q,
                k,
                v,
                None,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                sliding_window=self.sliding_window,
                position_ids=position_ids,
                cp_meta=am_cp_meta,
                bidirectional_images=self.is_sliding and self._bidirectional_images,
            )
            out = out.transpose(1, 2)
        else:
            out = self._attend(q, k, v, attention_mask, am_te_boundaries)
        out = out.transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out), None

    def _attend(self, q, k, v, mask, boundaries) -> Tensor:
        if is_block_mask(mask):  # attn='flex' takes it as is; the kernel rejects it otherwise
            return self.kernel(q, k, v, mask=mask)
        if self.attn_backend == "te":
            if mask is not None and mask.dim() != 4:
                raise ValueError(
                    f"attn='te' needs a dense 4D layer mask to check, got {type(mask).__name__}"
                )
            boundaries = boundaries or _TEBoundaries(None)
            varlen = boundaries.get(mask, q.shape[2], k.shape[2], q.shape[0], self.sliding_window)
            return self.kernel(q, k, v, varlen=varlen)
        if mask is not None and not isinstance(mask, Tensor):
            accepted = " or a FlexAttention BlockMask" if self.attn_backend == "flex" else ""
            raise TypeError(
                f"attn={self.attn_backend!r} takes a dense [B, 1, S, K] mask (bool or "
                f"additive){accepted}, got {type(mask).__name__}"
            )
        if mask is not None and self.attn_backend == "eager" and mask.dtype == torch.bool:
            mask = to_additive_mask(mask, q.dtype)
        if self.attn_backend == "sdpa" and resolve_cpu_gemm(self.cpu_gemm, q.dtype) == "onednn":
            # CPU fp32: the attention's GEMMs on oneDNN, per query chunk over its key range.
            out = gemm_attention(q, k, v, mask, self.scaling, self._dropout_active())
            if out is not None:
                return out
        if mask is not None and self.attn_backend == "sdpa" and not self._dropout_active():
            # CPU: skip the key blocks a query chunk cannot see (sliding windows, padding).
            out = chunked_masked_attention(self.kernel, q, k, v, mask)
            if out is not None:
                return out
        return self.kernel(q, k, v, mask=mask)

    def _dropout_active(self) -> bool:
        # Chunked calls would draw a different dropout pattern than one call.
        return self.training and self.attention_dropout > 0
