"""LM-head projection and RoPE config helpers shared by the custom model forwards."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["compute_lm_head_logits", "get_rope_config"]


def _select_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor):
    """Keep the requested sequence positions of ``[T, H]`` or ``[B, S, H]`` hidden states."""
    if isinstance(logits_to_keep, torch.Tensor):
        index = logits_to_keep
    elif isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise ValueError(
                f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}"
            )
        if logits_to_keep == 0:
            # Deliberately no slice: slice(0, None) on a DTensor hits an unsupported alias op
            # under tensor parallelism with sequence parallelism.
            return hidden_states
        index = slice(-logits_to_keep, None)
    else:
        raise TypeError(
            "logits_to_keep must be an int or a tensor of position indices, "
            f"got {type(logits_to_keep).__name__}"
        )
    if hidden_states.dim() == 2:
        return hidden_states[index, :]
    if hidden_states.dim() == 3:
        return hidden_states[:, index, :]
    raise ValueError(
        f"hidden_states must be [T, H] or [B, S, H], got shape {tuple(hidden_states.shape)}"
    )


def _to_weight_dtype(hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """`hidden` in the head's floating weight dtype (a bf16 trunk feeding an fp32 head)."""
    weight = getattr(lm_head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        if hidden.is_floating_point() and hidden.dtype != weight.dtype:
            return hidden.to(weight.dtype)
    return hidden


def compute_lm_head_logits(
    lm_head: nn.Module | None,
    hidden_states: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    is_thd: bool = False,
    fp32_lm_head: bool = False,
    output_hidden_states: bool = False,
) -> CausalLMOutputWithPast:
    """Project hidden states through ``lm_head`` and wrap them in a ``CausalLMOutputWithPast``.

    - ``lm_head is None`` (a pipeline stage without the head): ``hidden_states`` pass through
      as ``logits`` so the next stage receives them.
    - ``logits_to_keep``: ``0`` projects every position (no slicing, which DTensors under
      sequence parallelism cannot do); a positive int keeps the last N positions; a tensor
      keeps those position indices. Works on 2D ``[T, H]`` and 3D ``[B, S, H]`` inputs.
    - ``is_thd``: a 2D result (logits and the attached hidden states) gets its batch dim of 1
      back (``[1, T, *]``); tensors that are already 3D are left as they are.
    - The kept positions are cast to the head's weight dtype when they differ (a bf16 trunk
      with an fp32 head), after slicing so only those positions are converted; the logits
      come out in the head's dtype.
    - ``fp32_lm_head``: project in fp32 through the module itself (so DTensor redistribution
      still applies) and cast the logits back to the input dtype.
    - ``output_hidden_states``: attach the full-sequence hidden states (for fused
      cross-entropy that recomputes logits); otherwise the field is ``None``.
    """
    if lm_head is None:
        logits = hidden_states
    else:
        selected = _select_positions(hidden_states, logits_to_keep)
        if fp32_lm_head:
            logits = lm_head(selected.float()).to(hidden_states.dtype)
        else:
            logits = lm_head(_to_weight_dtype(selected, lm_head))
    if is_thd and logits.dim() == 2:
        logits = logits.unsqueeze(0)

    hidden_out = None
    if output_hidden_states:
        hidden_out = hidden_states
        if is_thd and hidden_out.dim() == 2:
            hidden_out = hidden_out.unsqueeze(0)
    return CausalLMOutputWithPast(logits=logits, hidden_states=hidden_out)


def get_rope_config(config, *, layer_type: str | None = None) -> tuple[float, dict, float]:
    """Return ``(rope_theta, rope_parameters, partial_rotary_factor)`` of a HF config.

    Reads ``config.rope_parameters`` (transformers 5). Configs whose rope parameters are
    keyed by layer type (Gemma 4: ``{"sliding_attention": {...}, "full_attention": {...}}``)
    need ``layer_type`` (ignored for flat parameters). Older configs without ``rope_parameters`` fall back to the
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` attributes.
    """
    rope_parameters = getattr(config, "rope_parameters", None)
    if rope_parameters is None:
        rope_parameters = _legacy_rope_parameters(config)
    if _is_per_layer_type(rope_parameters):
        if layer_type not in rope_parameters:
            raise ValueError(
                f"rope_parameters of {type(config).__name__} are keyed by layer type; "
                f"layer_type={layer_type!r} is not one of {sorted(rope_parameters)}"
            )
        rope_parameters = rope_parameters[layer_type]
    if "rope_theta" not in rope_parameters:
        raise ValueError(
            f"{type(config).__name__}.rope_parameters has no 'rope_theta' "
            f"(keys: {sorted(rope_parameters)})"
        )
    partial = rope_parameters.get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", None)
    )
    return rope_parameters["rope_theta"], rope_parameters, 1.0 if partial is None else partial


def _is_per_layer_type(rope_parameters: Mapping) -> bool:
    return bool(rope_parameters) and all(isinstance(v, Mapping) for v in rope_parameters.values())


def _legacy_rope_parameters(config) -> dict:
    """Build a transformers-5 style dict from the v4 attributes."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise ValueError(
            f"{type(config).__name__} has neither rope_parameters nor rope_theta; "
            "cannot determine the RoPE base"
        )
    params = dict(getattr(config, "rope_scaling", None) or {"rope_type": "default"})
    params["rope_theta"] = theta
    return params
