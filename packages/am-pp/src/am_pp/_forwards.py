"""Pipeline-stage forwards for HF text decoders and their CausalLM wrappers.

Every forward returns one tensor, the way `PipelineStage` hands it to the next stage:
hidden states, or logits on the stage that owns `lm_head`. A stage without `embed_tokens`
receives the previous stage's hidden states in the `input_ids` slot. Decoder layers are
held in a ModuleDict keyed by their original index (`am_pp.split` converts the ModuleList),
so parameter names and per-layer attention types stay those of the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from am_pp._masks import _build_or_reuse_pp_causal_mask, layer_types_of


def reject_unused(kwargs: dict, where: str) -> None:
    """Raise on inputs a stage forward would otherwise drop silently."""
    unused = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
    if unused:
        raise TypeError(f"{where}: pipeline forward does not support inputs {unused}")


def iter_layers(module: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(original index, layer) for the decoder layers this stage kept."""
    layers = module.layers
    if isinstance(layers, nn.ModuleDict):
        return ((int(k), v) for k, v in layers.items())
    return enumerate(layers)


def embed_or_pass_through(
    module: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Embeddings on the first stage; the received hidden states elsewhere."""
    if inputs_embeds is not None:
        return inputs_embeds
    if input_ids is None:
        raise ValueError(f"{type(module).__name__}: needs input_ids or inputs_embeds")
    if input_ids.is_floating_point():
        return input_ids  # hidden states from the previous stage
    if getattr(module, "embed_tokens", None) is None:
        raise ValueError(
            f"{type(module).__name__}: got token ids (dtype {input_ids.dtype}) but this stage "
            "has no embed_tokens; only the first stage takes token ids"
        )
    return module.embed_tokens(input_ids)


def default_position_ids(h: torch.Tensor, position_ids, cache_position) -> torch.Tensor:
    if position_ids is not None:
        return position_ids
    if cache_position is not None:
        return cache_position.unsqueeze(0)
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


def carried_position_ids(carried: tuple, position_ids):
    """Explicit position ids travel with the hidden states (`(h, position_ids)` from the
    previous stage, positionally): packed rows need them on every stage. The carried ones
    win: torch's shape inference also hands the first microbatch's root kwargs to later
    local stages of a multi-stage schedule (the same ids, so only shapes are checked)."""
    if not carried:
        return position_ids
    if len(carried) != 1 or (
        position_ids is not None and tuple(position_ids.shape) != tuple(carried[0].shape)
    ):
        raise TypeError(
            "a pipeline stage takes (hidden_states, position_ids) positionally; got "
            f"{1 + len(carried)} positional inputs and position_ids={position_ids is not None}"
        )
    return carried[0]


def norm_or_carry(module: nn.Module, h: torch.Tensor, position_ids):
    """Last stage (it owns the final norm): normed h. Other stages: h, plus the explicit
    position ids (if any) for the next stage."""
    norm = getattr(module, "norm", None)
    if norm is not None:
        return norm(h)
    return (h, position_ids) if position_ids is not None else h


def create_pipeline_forward_inner(model_class_name: str = "AutoModel") -> Callable:
    """Create a pipeline-compatible forward method for HuggingFace inner models.

    For Llama-style decoders (LlamaModel, Qwen3Model, MistralModel, ...): optional
    embed_tokens, one rotary call shared by all layers, a mask per attention type."""

    def forward(
        self,
        input_ids=None,
        *carried,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache_position=None,
        **kwargs,
    ) -> torch.Tensor:
        reject_unused(
            {"past_key_values": past_key_values, "use_cache": use_cache, **kwargs}, model_class_name
        )
        h = embed_or_pass_through(self, input_ids, inputs_embeds)
        position_ids = carried_position_ids(carried, position_ids)
        # The mask sees the ids as given: default positions are never packed (no check).
        masks = _build_or_reuse_pp_causal_mask(
            self, h, attention_mask, cache_position, position_ids
        )
        given_position_ids = position_ids
        position_ids = default_position_ids(h, position_ids, cache_position)
        position_embeddings = self.rotary_emb(h, position_ids)
        types_ = layer_types_of(self.config)
        for idx, layer in iter_layers(self):
            h = layer(
                h,
                attention_mask=masks[types_[idx]],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        return norm_or_carry(self, h, given_position_ids)

    forward.__qualname__ = f"{model_class_name}.pipeline_forward"
    return forward


def create_pipeline_forward_gemma4_text() -> Callable:
    """Pipeline-compatible forward for the Gemma4 text decoder backbone.

    Works for HF Gemma4TextModel (dense and MoE blocks): optional embed_tokens (hidden states
    arrive in the input_ids slot on non-first stages), full and sliding causal masks for the
    mixed layer types, and per-layer-type rotary embeddings
    (`Gemma4TextRotaryEmbedding.forward(x, position_ids, layer_type)`)."""

    def forward(
        self,
        input_ids=None,
        *carried,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache_position=None,
        per_layer_inputs=None,
        **kwargs,
    ) -> torch.Tensor:
        reject_unused(
            {
                "past_key_values": past_key_values,
                "use_cache": use_cache,
                "per_layer_inputs": per_layer_inputs,
                **kwargs,
            },
            "Gemma4TextModel",
        )
        h = embed_or_pass_through(self, input_ids, inputs_embeds)
        position_ids = carried_position_ids(carried, position_ids)
        # The mask sees the ids as given: default positions are never packed (no check).
        masks = _build_or_reuse_pp_causal_mask(
            self, h, attention_mask, cache_position, position_ids
        )
        given_position_ids = position_ids
        position_ids = default_position_ids(h, position_ids, cache_position)
        types_ = self.config.layer_types
        rotary = {t: self.rotary_emb(h, position_ids, t) for t in sorted(set(types_))}
        shared_kv_states: dict = {}  # written by layers that store full-length K/V; read by none
        for idx, layer in iter_layers(self):
            # Keywords only after h: transformers' layer takes per_layer_input second
            # (None here: validate rejects per-layer inputs), am-models-gemma4's rope.
            h = layer(
                h,
                shared_kv_states=shared_kv_states,
                position_embeddings=rotary[types_[idx]],
                attention_mask=masks[types_[idx]],
                position_ids=position_ids,
            )
        return norm_or_carry(self, h, given_position_ids)

    forward.__qualname__ = "Gemma4TextModel.pipeline_forward"
    return forward


def lm_head_or_hidden(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits (with the config's final-logit softcapping) on the last stage, else `h`."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        return h  # hidden states, or (hidden states, position ids) for the next stage
    logits = lm_head(h)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def create_pipeline_forward_causal_lm() -> Callable:
    """Create a pipeline-compatible forward method for causal LM wrappers (`model.model`
    decoder + `lm_head`): returns logits on the last stage, hidden states elsewhere."""

    def forward(
        self,
        input_ids=None,
        *carried,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep=0,
        **kwargs,
    ) -> torch.Tensor:
        if labels is not None:
            raise TypeError(
                f"{type(self).__name__}: under pipeline parallelism the loss is the schedule's "
                "loss_fn on the last stage; pass labels as the schedule's target, not to forward"
            )
        reject_unused({"logits_to_keep": logits_to_keep or None, **kwargs}, type(self).__name__)
        h = self.model(
            input_ids,
            *carried,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
        )
        return lm_head_or_hidden(self, h)

    forward.__qualname__ = "CausalLM.pipeline_forward"
    return forward
