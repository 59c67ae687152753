"""NemotronV3Model: embeddings, the hybrid Mamba2 / attention / MLP / MoE blocks, final norm."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from am_dtype.backend import BackendConfig
from am_dtype.backend import initialize_rms_norm_module as _rms_norm
from am_dtype.cast import enforce_strict_fp32
from am_dtype.dtypes import config_dtype
from am_models_nemotron.cache import NemotronHybridCache
from am_models_nemotron.config import nemotron_config
from am_models_nemotron.inputs import check_model_inputs
from am_models_nemotron.layers import (
    BlockInputs,
    NemotronBlock,
    init_block_weights,
    init_norm,
    resolve_block_types,
)
from am_models_nemotron.moe_config import resolve_moe_config
from am_moe.config import MoEConfig
from am_utils.attention import build_varlen_seqs
from am_utils.masks import build_attention_mask, seq_idx_from_cu_seqlens, token_mask_from


class NemotronV3Model(nn.Module):
    """NemotronV3 base model (without LM head): embeddings, hybrid blocks, final norm."""

    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(
        self,
        config: Any,
        backend: BackendConfig | None = None,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ):
        super().__init__()
        config = nemotron_config(config)
        self.config = config
        self.backend = backend or BackendConfig()
        self.moe_config = resolve_moe_config(config, moe_config, moe_overrides)
        dtype = config_dtype(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleDict(
            {
                str(i): NemotronBlock(config, i, block_type, self.backend, self.moe_config)
                for i, block_type in enumerate(resolve_block_types(config))
            }
        )
        self.norm = _rms_norm(
            self.backend.rms_norm, config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype
        )
        enforce_strict_fp32(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal_mask_mapping: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: NemotronHybridCache | None = None,
        cache_position: torch.LongTensor | None = None,
        return_block_inputs: bool = False,
        hidden_states_out: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, BlockInputs]:
        """Hidden states [B, S, H] (or [T, H] for a THD input), normed on the last stage.

        Pipeline stages: with `embed_tokens` None, `input_ids` carries the
        upstream hidden states; with `norm` None the final norm is skipped.
        kwargs: `padding_mask` [B, S] (True = padding), `seq_idx` [B, S] or `cu_seqlens` for
        packed sequences; others (`qkv_format`, `max_seqlen`, ...) are accepted and ignored.
        With attn='te' packing and padding reach attention as THD sequence boundaries
        (`build_varlen_seqs`), with the other kernels as a dense mask (`build_attention_mask`).
        `return_block_inputs=True` also returns the BlockInputs the blocks ran with ([B, S]
        form), so the MTP heads reuse the same packing / padding without rebuilding it.
        `hidden_states_out`, when a list, receives the embeddings output and each block's
        output (transformers' hidden states before the final norm), shaped like the result.
        Inputs are checked first (`inputs.check_model_inputs`).
        """
        check_model_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values, kwargs)
        h = self._embed_or_pass_through(input_ids, inputs_embeds)
        thd = h.dim() == 2
        if thd:
            h = h.unsqueeze(0)
        inputs = self._block_inputs(h, attention_mask, causal_mask_mapping, past_key_values, kwargs)
        collect = hidden_states_out.append if hidden_states_out is not None else None
        if collect:
            collect(h.squeeze(0) if thd else h)
        for block in self.layers.values():
            h = block(h, inputs)
            if collect:
                collect(h.squeeze(0) if thd else h)
        if past_key_values is not None:
            past_key_values.advance(h.shape[1])
        if self.norm is not None:
            h = self.norm(h)
        h = h.squeeze(0) if thd else h
        return (h, inputs) if return_block_inputs else h

    def _embed_or_pass_through(self, input_ids, inputs_embeds) -> torch.Tensor:
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            raise ValueError("NemotronV3Model.forward needs input_ids or inputs_embeds")
        if self.embed_tokens is None:
            if input_ids.is_floating_point():
                return input_ids
            raise ValueError(
                "this pipeline stage has no embed_tokens: input_ids must be the upstream "
                f"hidden states (floating point), got dtype {input_ids.dtype}"
            )
        return self.embed_tokens(input_ids)

    def _block_inputs(self, h, attention_mask, causal_mask_mapping, cache, kwargs) -> BlockInputs:
        token_mask = token_mask_from(attention_mask, kwargs.get("padding_mask"))
        attn_mask = (causal_mask_mapping or {}).get("full_attention")
        if attn_mask is None and attention_mask is not None and attention_mask.dim() == 4:
            attn_mask = attention_mask
        seq_idx = kwargs.get("seq_idx")
        if seq_idx is None and kwargs.get("cu_seqlens") is not None:
            seq_idx = seq_idx_from_cu_seqlens(kwargs["cu_seqlens"], h.shape[1]).to(h.device)
        if seq_idx is not None and seq_idx.dim() == 1:
            seq_idx = seq_idx.unsqueeze(0)
        q_len = h.shape[1]
        kv_len = q_len + (cache.get_seq_length() if cache is not None else 0)
        current = token_mask[:, -q_len:] if token_mask is not None else None
        if self.backend.attn == "te":
            # Boundaries, not a [B, 1, Q, K] mask; cu_seqlens is taken as given unless
            # seq_idx (which wins, as for the mask) was passed too.
            cu = kwargs.get("cu_seqlens") if kwargs.get("seq_idx") is None else None
            varlen = build_varlen_seqs(q_len, kv_len, h.shape[0], token_mask, seq_idx, cu)
            return BlockInputs(attn_mask, current, seq_idx, cache, varlen)
        if attn_mask is None:
            attn_mask = build_attention_mask(q_len, kv_len, token_mask, seq_idx)
        return BlockInputs(attn_mask, current, seq_idx, cache)

    @torch.no_grad()
    def initialize_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize weights as transformers' NemotronH does; skips parts a PP split removed."""
        std = self.config.initializer_range
        with torch.device(buffer_device or _first_device(self)):
            if self.embed_tokens is not None:
                nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
            if self.norm is not None:
                init_norm(self.norm)
            for block in self.layers.values():
                init_block_weights(block, self.config, buffer_device)


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
