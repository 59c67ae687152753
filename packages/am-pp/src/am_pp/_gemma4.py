"""The Gemma 4 text-backbone stage forward, with the state Gemma 4 layers share across stages.

Two Gemma 4 features make a later layer depend on more than the hidden states:

- per-layer inputs (E2B / E4B, `hidden_size_per_layer_input > 0`): one tensor
  [B, S, num_layers, d] computed on the first stage from the token ids (its own embedding
  table) and the input embeddings (a projection); layer i reads slice i;
- K/V sharing (`num_kv_shared_layers > 0`): the trailing layers attend with the keys and
  values of the last earlier layer of the same attention type (its `"store"` layer).

So a stage sends, after the hidden states and before the generic position ids / mask
(`am_pp._forwards.split_carried`): the per-layer inputs of the layers after it (sliced, so
each boundary carries only what is still needed) and, for every attention type whose store
layer is before the boundary and whose sharing layers are after it, that store layer's
keys and values. What crosses a boundary follows from the config and the stage's layer
span alone (`Gemma4Carry`), so sender and receiver agree without any side channel, and
the gradients reach the first stage's per-layer embeddings and the store layers'
projections through the pipeline's own backward. Every split works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import KVSharingDict

from am_pp._forwards import create_text_stage_forward, iter_layers, layer_span


class Gemma4Carry(NamedTuple):
    """What a Gemma 4 stage with layers [start, stop) receives and sends besides h."""

    start: int
    stop: int
    first: bool  # holds the embeddings (computes the per-layer inputs)
    last: bool  # holds the final norm (sends nothing)
    per_layer: bool  # the model has per-layer inputs
    kv_in: tuple[str, ...]  # attention types whose shared K/V arrive here
    kv_out: tuple[str, ...]  # ... and leave here

    @property
    def n_in(self) -> int:
        return int(self.per_layer and not self.first) + 2 * len(self.kv_in)


def _kv_crossing(config, boundary: int) -> tuple[str, ...]:
    """Attention types whose store layer is before `boundary` and some sharing layer after."""
    if not getattr(config, "num_kv_shared_layers", 0):
        return ()
    modes, types_ = config.kv_sharing_modes, config.layer_types
    crossing = []
    for kind in sorted(set(types_)):
        stores = [i for i, m in enumerate(modes) if m == "store" and types_[i] == kind]
        users = [i for i, m in enumerate(modes) if m == "reuse" and types_[i] == kind]
        if stores and users and stores[0] < boundary <= users[-1]:
            crossing.append(kind)
    return tuple(crossing)


def gemma4_carry(module: nn.Module) -> Gemma4Carry:
    """This stage's `Gemma4Carry` (computed once per stage)."""
    plan = module.__dict__.get("_pp_gemma4_carry")
    if plan is None:
        config = module.config
        start, stop = layer_span(module)
        first = getattr(module, "embed_tokens", None) is not None
        last = getattr(module, "norm", None) is not None
        plan = Gemma4Carry(
            start, stop, first, last,
            per_layer=bool(getattr(config, "hidden_size_per_layer_input", 0)),
            kv_in=() if first else _kv_crossing(config, start),
            kv_out=() if last else _kv_crossing(config, stop),
        )  # fmt: skip
        module.__dict__["_pp_gemma4_carry"] = plan
    return plan


def _per_layer_inputs(module, plan: Gemma4Carry, stage, token_ids, given) -> torch.Tensor | None:
    """[B, S, num_layers - start, d]: computed on the first stage (as transformers'
    `Gemma4TextModel.forward` does), received on the others."""
    if not plan.first:
        if given is not None:
            raise TypeError(
                "per_layer_inputs go to the first stage only (later stages receive them)"
            )
        if not plan.per_layer:
            return None
        received = stage.state[0]
        expected = module.config.num_hidden_layers - plan.start
        if received.shape[2] != expected:
            raise ValueError(
                f"stage with layers [{plan.start}, {plan.stop}) received per-layer inputs for "
                f"{received.shape[2]} layers, expected {expected}"
            )
        return received
    if not plan.per_layer:
        return None
    if given is None:
        given = module.get_per_layer_inputs(token_ids, stage.h)
    return module.project_per_layer_inputs(stage.h, given)


def _shared_kv(plan: Gemma4Carry, stage) -> KVSharingDict:
    kv = stage.state[int(plan.per_layer and not plan.first) :]
    return KVSharingDict({kind: (kv[2 * j], kv[2 * j + 1]) for j, kind in enumerate(plan.kv_in)})


def _sendable(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (p2p sends need it; K/V are transposed views), and never the received
    tensor itself: a tensor passed on unchanged still gets its own autograd node here."""
    out = t.contiguous()
    return out.view_as(out) if out is t else out


def _state_out(plan: Gemma4Carry, per_layer, shared_kv) -> tuple:
    if plan.last:
        return ()
    out = []
    if per_layer is not None:
        out.append(_sendable(per_layer[:, :, plan.stop - plan.start :]))
    for kind in plan.kv_out:
        out.extend(_sendable(t) for t in shared_kv[kind])
    return tuple(out)


def _padding_mask(module, attention_mask) -> dict:
    """`{"padding_mask": [B, S] bool, True = padding}` for layers that take one (our MoE
    layers keep padded tokens out of the experts, as am-models-gemma4's own forward does),
    from a 2D attention mask; else {}."""
    takes = module.__dict__.get("_pp_layers_take_padding_mask")
    if takes is None:
        layer = next((m for _, m in iter_layers(module)), None)
        takes = layer is not None and "padding_mask" in inspect.signature(layer.forward).parameters
        module.__dict__["_pp_layers_take_padding_mask"] = takes
    if not takes or attention_mask is None or attention_mask.dim() != 2:
        return {}
    return {"padding_mask": ~attention_mask.bool()}


def _run_gemma4_layers(module, stage, input_ids, per_layer_inputs=None) -> tuple:
    plan = gemma4_carry(module)
    padding = _padding_mask(module, stage.attention_mask)
    token_ids = input_ids if input_ids is not None and not input_ids.is_floating_point() else None
    per_layer = _per_layer_inputs(module, plan, stage, token_ids, per_layer_inputs)
    shared_kv = _shared_kv(plan, stage)
    types_ = module.config.layer_types
    rotary = {t: module.rotary_emb(stage.h, stage.positions, t) for t in sorted(set(types_))}
    h = stage.h
    for idx, layer in iter_layers(module):
        # Keywords only after h: transformers' layer takes per_layer_input second,
        # am-models-gemma4's MoE layer (no per-layer inputs) its rope.
        extra = {} if per_layer is None else {"per_layer_input": per_layer[:, :, idx - plan.start]}
        h = layer(
            h,
            shared_kv_states=shared_kv,
            position_embeddings=rotary[types_[idx]],
            attention_mask=stage.masks[types_[idx]],
            position_ids=stage.positions,
            **extra,
            **padding,
        )
    return h, _state_out(plan, per_layer, shared_kv)


def create_pipeline_forward_gemma4_text() -> Callable:
    """Pipeline-compatible forward for the Gemma4 text decoder backbone.

    Works for HF Gemma4TextModel (dense and MoE blocks, per-layer inputs, K/V sharing) and
    am-models-gemma4's MoE backbone: optional embed_tokens (hidden states arrive in the
    input_ids slot on non-first stages), full and sliding causal masks for the mixed layer
    types, per-layer-type rotary embeddings
    (`Gemma4TextRotaryEmbedding.forward(x, position_ids, layer_type)`), and the per-layer
    inputs and shared K/V later stages need (module docstring)."""
    return create_text_stage_forward(
        "Gemma4TextModel",
        _run_gemma4_layers,
        n_state=lambda module: gemma4_carry(module).n_in,
        own_inputs=("per_layer_inputs",),
    )
