"""Introspection of model objects: forward signatures, the LM head, remote-code policy."""

from __future__ import annotations

import inspect
import logging
import os

import torch
from torch import nn

from am_dtype.dtensor import full_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "VLM_INPUT_KEYS",
    "enable_radio_vit_fused_attn",
    "filter_forward_kwargs",
    "get_lm_head_module",
    "get_lm_head_weight",
    "resolve_trust_remote_code",
]

# Multimodal forward kwargs across VLM families. Consumers take whichever of these keys a
# batch holds, so no per-model branching is needed; a new family appends its keys here.
VLM_INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    # image
    "pixel_values",
    "image_flags",
    "imgs_sizes",
    "image_position_ids",
    "mm_token_type_ids",
    "image_grid_hws",
    "image_grid_thw",
    "image_sizes",
    "patch_pixel_values",
    "num_patches",
    "patch_newline_mask",
    "image_embeds",
    # video
    "pixel_values_videos",
    # audio / sound
    "sound_features",
    "sound_attention_mask",
    "audio_input_values",
    "audio_attention_mask",
)

# Hub organisations whose remote code is trusted without the user opting in.
_TRUSTED_REMOTE_CODE_PREFIXES = ("nvidia/",)


def _get_forward_signature(model: nn.Module) -> inspect.Signature | None:
    """Best-effort ``inspect.signature(model.forward)``; ``None`` when it cannot be read."""
    forward = getattr(model, "forward", None)
    if not callable(forward):
        return None
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _has_var_keyword(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _supports_logits_to_keep(model: nn.Module) -> bool:
    """True when ``model.forward`` names a ``logits_to_keep`` parameter."""
    sig = _get_forward_signature(model)
    return sig is not None and "logits_to_keep" in sig.parameters


def _supports_seq_lens(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``seq_lens`` explicitly or through ``**kwargs``."""
    sig = _get_forward_signature(model)
    if sig is None:
        return False
    return "seq_lens" in sig.parameters or _has_var_keyword(sig)


def filter_forward_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """Return a copy of ``kwargs`` without the keys ``model.forward`` does not accept.

    A forward with ``**kwargs``, or one whose signature cannot be read, keeps every key.
    The input dict is never mutated.
    """
    sig = _get_forward_signature(model)
    if sig is None or _has_var_keyword(sig):
        return dict(kwargs)
    kept = {k: v for k, v in kwargs.items() if k in sig.parameters}
    dropped = sorted(set(kwargs) - set(kept))
    if dropped:
        logger.debug("Dropping kwargs %s not accepted by %s.forward", dropped, type(model).__name__)
    return kept


def get_lm_head_module(model: nn.Module) -> nn.Module | None:
    """Return the LM head: ``get_output_embeddings()`` if set, else a module named ``lm_head``."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is not None:
            return head
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head" and hasattr(module, "weight"):
            return module
    return None


def get_lm_head_weight(model: nn.Module) -> torch.Tensor:
    """Return the LM-head weight as a full tensor (DTensor weights are gathered).

    Gathering is a collective: with a sharded head every rank of its mesh must call this.
    """
    head = get_lm_head_module(model)
    if head is not None and getattr(head, "weight", None) is not None:
        return full_tensor(head.weight)
    for name, param in model.named_parameters(remove_duplicate=False):
        if "lm_head" in name and name.endswith(".weight"):
            return full_tensor(param)
    raise ValueError(
        f"No LM-head weight found in {type(model).__name__}: get_output_embeddings() returned "
        "None and no module or parameter is named 'lm_head'"
    )


def resolve_trust_remote_code(pretrained_model_name_or_path) -> bool:
    """True for Hub ids of whitelisted organisations (``nvidia/...``), never for local paths."""
    if not pretrained_model_name_or_path:
        return False
    name = str(pretrained_model_name_or_path)
    if os.path.isdir(name):
        return False
    return name.startswith(_TRUSTED_REMOTE_CODE_PREFIXES)


def enable_radio_vit_fused_attn(model) -> int:
    """Route RADIO ViT attention blocks through ``F.scaled_dot_product_attention``.

    RADIO's timm attention defaults to ``fused_attn=False``, which materialises the full
    ``(B, H, seq, seq)`` score tensor (GiBs per block at high patch counts). Setting
    ``fused_attn=True`` on every block avoids that. A model without a RADIO vision tower
    (``[model.]vision_model.radio_model.model.blocks``) is left untouched. Returns the
    number of blocks switched.
    """
    vision = getattr(model, "vision_model", None)
    if vision is None:
        vision = getattr(getattr(model, "model", None), "vision_model", None)
    radio_inner = getattr(getattr(vision, "radio_model", None), "model", None)
    blocks = getattr(radio_inner, "blocks", None)
    if blocks is None:
        return 0
    switched = 0
    for block in blocks:
        attn = getattr(block, "attn", None)
        if attn is not None:
            attn.fused_attn = True
            switched += 1
    if switched:
        logger.info("Enabled fused_attn on %d RADIO ViT blocks", switched)
    return switched
