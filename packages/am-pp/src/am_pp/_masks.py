"""Per-stage causal masks for pipeline stages, built once and reused when that is safe."""

from __future__ import annotations

from torch import nn
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)


def layer_types_of(config) -> list[str]:
    """Attention type of every decoder layer: `config.layer_types` when the model has one
    (Qwen3, Gemma), all sliding when only `sliding_window` is set (Mistral), else all full."""
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def _mask_layer_types(module: nn.Module) -> tuple[str, ...]:
    kinds = module.__dict__.get("_pp_mask_layer_types")
    if kinds is None:  # once per stage: the layer types never change
        unknown = set(layer_types_of(module.config)) - set(_MASK_BUILDERS)
        if unknown:
            raise ValueError(
                f"{type(module).__name__}: no pipeline mask builder for layer types "
                f"{sorted(unknown)}; known: {sorted(_MASK_BUILDERS)}"
            )
        kinds = tuple(sorted(set(layer_types_of(module.config))))
        module.__dict__["_pp_mask_layer_types"] = kinds
    return kinds


def _build_masks(module, inputs_embeds, attention_mask, position_ids, kinds) -> dict:
    module._pp_causal_mask_builds = getattr(module, "_pp_causal_mask_builds", 0) + 1
    return {
        kind: _MASK_BUILDERS[kind](
            config=module.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        for kind in kinds
    }


def _build_or_reuse_pp_causal_mask(
    module, inputs_embeds, attention_mask, cache_position, position_ids
):
    """Build a stage's `causal_mask_mapping` ({layer type: mask}), caching it per stage when safe.

    Non-first stages receive no mask, and fixed-length / packed training often gives none
    to the first stage either: then the causal mask depends only on the sequence length,
    batch size, dtype and device, so it is built once per stage and reused across
    microbatches and steps (`module._pp_causal_mask_builds` counts real builds). An explicit
    `attention_mask` (per-batch padding) is rebuilt on every call, and so are packed rows
    (position_ids restarting inside a row): their mask is block-diagonal, never the plain
    causal one a cache entry holds. `cache_position` stands in for missing position_ids."""
    if position_ids is None and cache_position is not None:
        position_ids = cache_position.unsqueeze(0)
    kinds = _mask_layer_types(module)
    packed = position_ids is not None and (
        position_ids.shape[-1] > 1 and find_packed_sequence_indices(position_ids) is not None
    )
    if attention_mask is not None or packed:
        return _build_masks(module, inputs_embeds, attention_mask, position_ids, kinds)
    batch, seq = inputs_embeds.shape[:2]
    key = (kinds, seq, batch, inputs_embeds.dtype, inputs_embeds.device)
    cache = module.__dict__.setdefault("_pp_causal_mask_cache", {})
    if key not in cache:
        cache[key] = _build_masks(module, inputs_embeds, None, position_ids, kinds)
    return cache[key]
