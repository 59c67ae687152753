"""Make Hugging Face models runnable as `torch.distributed.pipelining` stages.

A pipeline stage is a copy of the model with the modules of other stages removed (set to
None, decoder layers dropped). HF forwards assume the whole model, so `patch_hf_model_for_pp`
swaps in forwards that:

- embed on the stage that owns the embeddings, and otherwise take the previous stage's
  hidden states positionally (they arrive in the `input_ids` slot, as `PipelineStage` passes
  them);
- run only the decoder layers the stage kept, with the per-layer-type masks and rotary
  embeddings the model uses;
- return a tensor: hidden states, or logits on the stage that owns `lm_head`.

Which forwards a model gets is data: `_PP_FORWARDS` maps a `config.model_type` to its
(inner, outer) factories; everything else gets the generic CausalLM pair. The forwards
themselves live in `am_pp._forwards` (text) and `am_pp._vlm_forwards` (VLMs).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from am_pp._forwards import create_pipeline_forward_causal_lm, create_pipeline_forward_inner
from am_pp._gemma4 import create_pipeline_forward_gemma4_text
from am_pp._masks import _build_or_reuse_pp_causal_mask
from am_pp._vlm_forwards import (
    create_pipeline_forward_gemma4_vlm,
    create_pipeline_forward_mistral3_vlm,
)

logger = logging.getLogger(__name__)

__all__ = [
    "_build_or_reuse_pp_causal_mask",
    "MULTIMODAL_SUFFIXES",
    "TEXT_MODULE_ATTRS",
    "create_pipeline_forward_causal_lm",
    "create_pipeline_forward_gemma4_text",
    "create_pipeline_forward_gemma4_vlm",
    "create_pipeline_forward_inner",
    "create_pipeline_forward_mistral3_vlm",
    "get_text_module",
    "init_hf_model_buffers",
    "model_keeps_self_forward",
    "patch_hf_model_for_pp",
    "register_pp_forwards",
    "validate_hf_model_for_pipeline_support",
]

# Submodules of a VLM that only the first stage runs (encoders and their projectors).
MULTIMODAL_SUFFIXES = (
    "vision_tower",
    "visual",
    "vision_model",
    "image_encoder",
    "vision_encoder",
    "embed_vision",
    "multi_modal_projector",
    "audio_tower",
    "embed_audio",
)
# Attribute names under which VLMs hold their text backbone.
TEXT_MODULE_ATTRS = ("language_model", "text_model", "text_decoder")
_PP_VLM_MODEL_TYPES_WITH_DEDICATED_FORWARD: tuple[str, ...] = ("gemma4", "mistral3")


# ----------------------------------------------------------------------------- detection


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _is_vlm(model: nn.Module) -> bool:
    """Best-effort check for whether `model` is a vision-language model.

    Markers: a nested `text_config` distinct from the config itself, a `vision_tower` on the
    outer model, or a `visual` / `vision_tower` on the inner model (Qwen-VL convention)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return True
    if getattr(model, "vision_tower", None) is not None:
        return True
    inner = getattr(model, "model", None)
    return inner is not None and any(
        getattr(inner, name, None) is not None for name in ("visual", "vision_tower")
    )


def _is_gemma4_vlm(model: nn.Module) -> bool:
    """True only for Gemma4 VLM variants (by `model_type`, not by structure: Kimi-VL, Qwen3-VL-MoE,
    Llava-OneVision also hold `model.model.language_model` and must not get Gemma4's
    sliding/full-attention and softcapping logic)."""
    inner = getattr(model, "model", None)
    return _model_type(model) == "gemma4" and hasattr(inner, "language_model")


def _is_mistral3_vlm(model: nn.Module) -> bool:
    """True for Mistral3ForConditionalGeneration (Pixtral vision tower + Mistral/Ministral text)."""
    return _model_type(model) == "mistral3" and hasattr(
        getattr(model, "model", None), "vision_tower"
    )


def get_text_module(model: nn.Module) -> nn.Module:
    """Return the nested text/LLM module if present, else the model itself.

    Looks for `TEXT_MODULE_ATTRS` on the model and then on `model.model`: the outer
    `Mistral3ForConditionalGeneration` of transformers 5.x keeps its text model at
    `model.model.language_model` (no attribute on the outer model)."""
    for holder in (model, getattr(model, "model", None)):
        if not isinstance(holder, nn.Module):
            continue
        for attr in TEXT_MODULE_ATTRS:
            text = getattr(holder, attr, None)
            if isinstance(text, nn.Module):
                return text
    return model


def model_keeps_self_forward(model: nn.Module) -> bool:
    """Return True when *model* opts out of pipeline-aware forward patching.

    Models whose own `forward` is already PP-aware set `_pp_keep_self_forward = True`
    (our Nemotron-H does); the split call site then skips `patch_hf_model_for_pp`."""
    return getattr(model, "_pp_keep_self_forward", False) is True


# ----------------------------------------------------------------------------- registry


class PPForwards(NamedTuple):
    """The forward factories one model type needs: its text backbone and its outer model."""

    inner: Callable[[], Callable]
    outer: Callable[[], Callable]


# model_type -> forwards. Adding a model is one entry here (or `register_pp_forwards`).
_PP_FORWARDS: dict[str, PPForwards] = {
    "gemma4": PPForwards(create_pipeline_forward_gemma4_text, create_pipeline_forward_gemma4_vlm),
    "gemma4_text": PPForwards(
        create_pipeline_forward_gemma4_text, create_pipeline_forward_causal_lm
    ),
    "mistral3": PPForwards(create_pipeline_forward_inner, create_pipeline_forward_mistral3_vlm),
}


def register_pp_forwards(
    model_type: str, inner: Callable[[], Callable], outer: Callable[[], Callable]
) -> None:
    """Register the PP forward factories for `model_type` (overrides the generic pair)."""
    _PP_FORWARDS[model_type] = PPForwards(inner, outer)


def _bind(module: nn.Module, forward: Callable) -> None:
    module.forward = types.MethodType(forward, module)


def patch_hf_model_for_pp(
    model, patch_inner_model: bool = True, patch_causal_lm_model: bool = True
) -> None:
    """Patch a HF model/module to produce pipeline-compatible forward.

    The caller skips this for models with `model_keeps_self_forward(model)`. Flavours:

    * Gemma4 VLM (`model_type == 'gemma4'`, text backbone at `model.model.language_model`):
      Gemma4 text forward on the backbone, Gemma4 VLM forward on the outer model.
    * Mistral3 VLM: generic inner forward on the backbone, Mistral3 VLM forward outside.
    * Other models with `model.model` (LlamaForCausalLM, Qwen3ForCausalLM, ...): the generic
      inner + CausalLM forwards (or the registered pair for the model's `model_type`).
    * Else (a bare decoder such as LlamaModel): the module itself gets the inner forward.
    """
    entry = _PP_FORWARDS.get(_model_type(model))
    if _is_gemma4_vlm(model) or _is_mistral3_vlm(model):
        if patch_inner_model:
            _bind(get_text_module(model), entry.inner())
        if patch_causal_lm_model:
            _bind(model, entry.outer())
        return
    inner_factory = entry.inner if entry else create_pipeline_forward_inner
    outer_factory = entry.outer if entry else create_pipeline_forward_causal_lm
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        if patch_inner_model:
            _bind(inner, inner_factory())
        if patch_causal_lm_model:
            _bind(model, outer_factory())
    else:
        _bind(model, inner_factory())


# ----------------------------------------------------------------------------- validation


def _input_output_weights(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    return getattr(emb, "weight", None), getattr(head, "weight", None)


def _gemma4_text_problems(text_config) -> list[str]:
    # Per-layer inputs and K/V sharing cross stage boundaries (am_pp._gemma4); the vision
    # blocks' bidirectional mask would need mm_token_type_ids on every stage.
    if getattr(text_config, "use_bidirectional_attention", None) == "vision":
        return [
            "use_bidirectional_attention='vision': the vision blocks' mask needs "
            "mm_token_type_ids on every stage"
        ]
    return []


def _generic_forward_problems(model: nn.Module) -> list[str]:
    """What the patched forwards need from the text backbone: decoder layers and RoPE."""
    text = get_text_module(model)
    if text is model and not hasattr(model, "layers"):
        text = getattr(model, "model", None)
    if not isinstance(getattr(text, "layers", None), (nn.ModuleList, nn.ModuleDict)):
        return ["no decoder `layers` found on the model, model.model or its text module"]
    if getattr(text, "rotary_emb", None) is None:
        return [
            f"{type(text).__name__} has no rotary_emb: the pipeline forwards support RoPE "
            "decoders (register model-specific forwards with register_pp_forwards)"
        ]
    return []


def validate_hf_model_for_pipeline_support(model: torch.nn.Module) -> None:
    """Validate if a model is compatible with torch.distributed.pipelining; raise ValueError
    naming every problem found.

    Rejects tied input/output embeddings (the embedding lives on the first stage and the
    head on the last, so one tensor cannot be both): the governing flag is the top-level
    `config.tie_word_embeddings` (what transformers' `tie_weights` reads, also for VLMs such
    as Mistral3 whose `text_config` carries its own), and the weights themselves are checked
    for sharing. Also rejects encoder-decoder models, Gemma 4's vision-bidirectional masks
    (their block ids do not reach later stages) and backbones the forwards cannot run."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    problems: list[str] = []
    if config is not None and getattr(config, "tie_word_embeddings", False):
        problems.append(
            "config.tie_word_embeddings=True: the input embedding and lm_head would have to "
            "share one tensor across the first and last stage; untie them (set "
            "tie_word_embeddings=False and give lm_head its own weight)"
        )
    emb_w, head_w = _input_output_weights(model)
    if emb_w is not None and head_w is not None and emb_w is head_w:
        problems.append("lm_head.weight is the same tensor as the input embedding weight")
    if config is not None and getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not supported (is_encoder_decoder=True)")
    if _model_type(model) in ("gemma4", "gemma4_text"):
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        problems += _gemma4_text_problems(text_config)
    if not model_keeps_self_forward(model):
        problems += _generic_forward_problems(model)
    if problems:
        raise ValueError(
            f"{name} cannot run under pipeline parallelism: " + "; ".join(problems) + "."
        )


# ----------------------------------------------------------------------------- buffers


def _restore_rotary(module: nn.Module, device: torch.device) -> None:
    # transformers 5.x rotary modules no longer keep `rope_init_fn`; rebuilding the module
    # from its own config recomputes every inv_freq buffer (per layer type for Gemma 4, axial
    # for the vision towers) exactly as __init__ did.
    with torch.device("cpu"):
        fresh = type(module)(module.config)
    for name, buf in fresh.named_buffers(recurse=False):
        setattr(module, name, buf.to(device))
    for attr, value in vars(fresh).items():
        if attr.endswith("attention_scaling"):
            setattr(module, attr, value)


def _restore_embed_scale(module: nn.Module, device: torch.device) -> None:
    # Gemma-style scaled embeddings keep the scale both as a float and as a buffer.
    module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)


# (predicate, restorer): modules whose non-persistent buffers a checkpoint does not carry.
_BUFFER_RESTORERS: tuple[tuple[Callable[[nn.Module], bool], Callable], ...] = (
    (
        lambda m: type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "config"),
        _restore_rotary,
    ),
    (
        lambda m: hasattr(m, "scalar_embed_scale") and hasattr(m, "embed_scale"),
        _restore_embed_scale,
    ),
)


def _non_persistent_buffers(module: nn.Module) -> list[str]:
    return [
        n for n, _ in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set
    ]


def init_hf_model_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Initialize HuggingFace model buffers needed before pipeline execution.

    After a meta-device build and `to_empty`, parameters and persistent buffers come from a
    checkpoint, but non-persistent buffers (rotary `inv_freq`, Gemma's `embed_scale`) hold
    garbage. This recomputes them from the modules' configs on `device`; a non-persistent
    buffer it does not know how to restore is logged as a warning, by name."""
    device = torch.device(device)
    for name, module in model.named_modules():
        if not _non_persistent_buffers(module):
            continue
        for predicate, restore in _BUFFER_RESTORERS:
            if predicate(module):
                restore(module, device)
                break
        else:
            logger.warning(
                "init_hf_model_buffers: no rule restores the non-persistent buffers %s of %s (%s)",
                _non_persistent_buffers(module),
                name or "<root>",
                type(module).__name__,
            )
