"""The Gemma 4 MoE text decoder: `Gemma4MoEDecoderLayer` and `Gemma4MoETextModelBackend`.

Architecture (numerics follow transformers' `Gemma4TextModel` with `enable_moe_block=True`):

- Scaled token embedding (x sqrt(hidden_size)); a final RMSNorm (Gemma 4's: fp32, `x * w`).
- Per layer, by `config.layer_types[i]`: sliding-window attention ("sliding_attention",
  default RoPE) or full attention ("full_attention", proportional partial RoPE, wider heads,
  and with `attention_k_eq_v` one projection for keys and values). The attention is
  `am_models_gemma4.attention.Gemma4Attention` (the backend's linears, RoPE and attention
  kernel); the dense MLP is transformers' `Gemma4TextMLP` with the backend's linears.
- Sandwich norms around attention and the feed-forward; the feed-forward is the dense MLP
  *plus* the MoE block: `post_ff_1(mlp(pre_ff(x))) + post_ff_2(moe(pre_ff_2(x), gate_input=x))`,
  the router seeing the raw residual. Each layer ends with `* layer_scalar` (a buffer).
- K/V sharing (trailing `num_kv_shared_layers`) through the `shared_kv_states` store that
  transformers' attention reads and writes; `_FSDPSafeSharedKVStates` keeps it one object
  under FSDP2's input casting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4TextMLP,
    Gemma4TextModelOutputWithPast,
    Gemma4TextRotaryEmbedding,
    Gemma4TextScaledWordEmbedding,
)

from am_dtype.backend import BackendConfig
from am_dtype.dtypes import config_dtype
from am_models_gemma4.attention import Gemma4Attention, use_backend_linears
from am_models_gemma4.kv_sharing import _FSDPSafeSharedKVStates
from am_models_gemma4.moe import Gemma4MoE, gemma4_moe_config
from am_models_gemma4.norm import FusedGemma4RMSNorm
from am_moe.config import MoEConfig

__all__ = ["MLP_LINEARS", "Gemma4MoEDecoderLayer", "Gemma4MoETextModelBackend"]

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class Gemma4MoEDecoderLayer(GradientCheckpointingLayer):
    """One Gemma 4 decoder layer with transformers' attention and dense MLP and an am-moe
    `Gemma4MoE` in place of transformers' router + experts.

    A `GradientCheckpointingLayer`, so transformers' `gradient_checkpointing_enable()`
    checkpoints it as it does its own layers (am-moe's AC wraps it from outside instead).
    """

    def __init__(
        self, config: Any, layer_idx: int, moe_config: MoEConfig, backend: BackendConfig
    ) -> None:
        super().__init__()
        if getattr(config, "hidden_size_per_layer_input", 0):
            raise ValueError(
                "Gemma4MoEDecoderLayer does not implement per-layer input embeddings: "
                f"hidden_size_per_layer_input={config.hidden_size_per_layer_input} with "
                "enable_moe_block=True (no released Gemma 4 MoE uses them); set it to 0"
            )
        self.layer_idx = layer_idx
        self.attention_type = config.layer_types[layer_idx]
        self.hidden_size = config.hidden_size
        eps = config.rms_norm_eps

        def norm() -> FusedGemma4RMSNorm:
            return FusedGemma4RMSNorm(self.hidden_size, eps=eps)

        self.self_attn = Gemma4Attention(config, layer_idx, backend)
        self.mlp = Gemma4TextMLP(config, layer_idx)
        use_backend_linears(self.mlp, MLP_LINEARS, backend, config_dtype(config))
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.post_feedforward_layernorm_1 = norm()
        self.post_feedforward_layernorm_2 = norm()
        self.pre_feedforward_layernorm_2 = norm()
        self.moe = Gemma4MoE(moe_config, backend, config)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        cache_position: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        shared_kv_states: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """x: [B, S, D] -> [B, S, D]. `padding_mask` (True = padding) keeps padded tokens
        out of the experts; `shared_kv_states` is the K/V-sharing store of this forward."""
        residual = x
        h, _ = self.self_attn(
            hidden_states=self.input_layernorm(x),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            shared_kv_states=shared_kv_states if shared_kv_states is not None else {},
            past_key_values=past_key_values,
            position_ids=position_ids,
            **kwargs,
        )
        x = residual + self.post_attention_layernorm(h)

        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        routed = self.moe(
            self.pre_feedforward_layernorm_2(x), padding_mask=padding_mask, gate_input=x
        )
        h = self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(routed))
        x = residual + h
        # In the hidden dtype, as transformers' in-place `*=`: the buffer stays fp32 under
        # FSDP2 mixed precision (only parameters are cast), and a bf16 x fp32 product would
        # turn the residual stream fp32 (the root's final norm and lm_head then mismatch).
        return (x * self.layer_scalar).to(x.dtype)


class Gemma4MoETextModelBackend(nn.Module):
    """The Gemma 4 MoE text decoder (embeddings, `Gemma4MoEDecoderLayer`s, final norm, RoPE).

    Called by transformers' `Gemma4Model.forward` in place of its `Gemma4TextModel` (same
    keyword interface: `inputs_embeds`, a `{layer_type: mask}` dict as `attention_mask`,
    `position_ids`, `past_key_values`, `use_cache`), or directly with `input_ids`.
    """

    def __init__(
        self,
        config: Any,
        backend: BackendConfig,
        moe_config: MoEConfig | None = None,
        moe_overrides: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.moe_config = moe_config or gemma4_moe_config(config, moe_overrides)
        dtype = config_dtype(config)
        self.embed_tokens = Gemma4TextScaledWordEmbedding(
            config.vocab_size,
            config.hidden_size,
            self.padding_idx,
            embed_scale=config.hidden_size**0.5,
        ).to(dtype)
        self.layers = nn.ModuleList(
            Gemma4MoEDecoderLayer(config, i, self.moe_config, backend)
            for i in range(config.num_hidden_layers)
        )
        self.norm = FusedGemma4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma4TextRotaryEmbedding(config)
        self.unique_layer_types = sorted(set(config.layer_types))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | dict | None = None,
        position_ids: Tensor | None = None,
        cache_position: Tensor | None = None,
        padding_mask: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        cp_enabled: bool = False,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> Gemma4TextModelOutputWithPast:
        """Hidden states after the final norm (and the cache when one is used)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        for unused in ("per_layer_inputs", "labels", "logits_to_keep", "return_dict"):
            kwargs.pop(unused, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + start).unsqueeze(0)
        masks = attention_mask
        if not isinstance(masks, dict):
            masks = self._masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        rope = {t: self.rotary_emb(inputs_embeds, position_ids, t) for t in self.unique_layer_types}
        shared_kv_states = kwargs.pop("shared_kv_states", None)
        if shared_kv_states is None:
            shared_kv_states = _FSDPSafeSharedKVStates()
        want_hidden = bool(output_hidden_states)
        hidden: list[Tensor] = []
        x = inputs_embeds
        for layer in self.layers:
            if want_hidden:
                hidden.append(x)
            kind = self.config.layer_types[layer_index(layer)]
            x = layer(
                x,
                rope[kind],
                attention_mask=masks[kind],
                position_ids=position_ids,
                padding_mask=padding_mask,
                past_key_values=past_key_values,
                shared_kv_states=shared_kv_states,
                **kwargs,
            )
        x = self.norm(x)
        if want_hidden:
            hidden.append(x)  # as transformers: the last entry is the normed output
        return Gemma4TextModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values,
            hidden_states=tuple(hidden) if want_hidden else None,
        )

    def _masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        return {
            "full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs),
        }


def layer_index(layer: nn.Module) -> int:
    """The decoder-layer index of a (possibly checkpoint-wrapped) layer."""
    return getattr(layer, "_checkpoint_wrapped_module", layer).layer_idx
