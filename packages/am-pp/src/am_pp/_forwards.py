"""Pipeline-stage forwards for HF text decoders and their CausalLM wrappers.

A stage forward returns what `PipelineStage` hands, positionally, to the next stage: logits
on the stage that owns `lm_head`; elsewhere the hidden states, or the tuple
`(hidden_states, *model_state, [position_ids, [attention_mask]])` when the later stages
need more (`end_stage` builds it, `split_carried` unpacks it). A stage without
`embed_tokens` receives the hidden states in the `input_ids` slot. Decoder layers are held
in a ModuleDict keyed by their original index (`am_pp.split` converts the ModuleList), so
parameter names and per-layer attention types stay those of the full model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

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


def layer_span(module: nn.Module) -> tuple[int, int]:
    """[start, stop) of the decoder layers this stage runs: set by `am_pp.split` (which
    knows it also for a stage without layers), else read off the kept layers."""
    span = module.__dict__.get("_pp_layer_span")
    if span is not None:
        return span
    keys = [i for i, _ in iter_layers(module)]
    if not keys or keys != list(range(keys[0], keys[-1] + 1)):
        raise ValueError(
            f"{type(module).__name__}: decoder layers {keys} are not one consecutive run; "
            "split the model with am_pp.split_model_into_stages"
        )
    return keys[0], keys[-1] + 1


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


class StageInput(NamedTuple):
    """What a stage forward works with once its inputs are unpacked (`begin_stage`)."""

    h: torch.Tensor  # embeddings (first stage) or the previous stage's hidden states
    state: tuple  # model-specific tensors carried from the previous stage
    masks: dict  # {layer type: mask} for this stage's layers
    positions: torch.Tensor  # position ids (given, carried or default)
    given_position_ids: torch.Tensor | None  # explicit ones only (packed rows)
    attention_mask: torch.Tensor | None


def _same_shape(name: str, carried: torch.Tensor, given) -> None:
    if given is not None and tuple(given.shape) != tuple(carried.shape):
        raise TypeError(
            f"a pipeline stage got {name} {tuple(given.shape)} as a keyword and "
            f"{tuple(carried.shape)} from the previous stage"
        )


def split_carried(carried: tuple, n_state: int, position_ids, attention_mask):
    """Unpack what travels with the hidden states: `(*state, [position_ids, [attention_mask]])`.

    `state` holds the `n_state` model-specific tensors (Gemma 4's per-layer inputs and
    shared K/V); then explicit position ids (packed rows) and an explicit attention mask
    (padding; the position ids travel with it, defaulted if none were given). Carried
    values win over keywords: torch's multi-stage schedules also hand the microbatch's root
    kwargs to the later stages a rank holds (the same tensors, so only shapes are checked).
    Without carried values the keywords are used (stages chained by hand)."""
    state, user = tuple(carried[:n_state]), tuple(carried[n_state:])
    if len(state) != n_state or len(user) > 2:
        raise TypeError(
            f"a pipeline stage takes (hidden_states, *{n_state} model tensors, "
            "[position_ids, [attention_mask]]) positionally; got "
            f"{1 + len(carried)} positional inputs"
        )
    if user:
        _same_shape("position_ids", user[0], position_ids)
        position_ids = user[0]
    if len(user) == 2:
        _same_shape("attention_mask", user[1], attention_mask)
        attention_mask = user[1]
    elif user and attention_mask is not None:
        raise TypeError(
            "a pipeline stage got an attention_mask keyword but the previous stage carried "
            "none: every stage must see the same mask"
        )
    return state, position_ids, attention_mask


def begin_stage(
    module: nn.Module, input_ids, inputs_embeds, carried, attention_mask, position_ids,
    cache_position, n_state: int = 0,
) -> StageInput:  # fmt: skip
    """Embed (or take the received hidden states), unpack the carried tensors, build or
    reuse the stage's masks, and default the positions."""
    h = embed_or_pass_through(module, input_ids, inputs_embeds)
    state, position_ids, attention_mask = split_carried(
        carried, n_state, position_ids, attention_mask
    )
    # The mask sees the ids as given: default positions are never packed (no check).
    masks = _build_or_reuse_pp_causal_mask(module, h, attention_mask, cache_position, position_ids)
    positions = default_position_ids(h, position_ids, cache_position)
    return StageInput(h, state, masks, positions, position_ids, attention_mask)


def end_stage(module: nn.Module, h: torch.Tensor, stage: StageInput, state_out: tuple = ()):
    """Last stage (it owns the final norm): normed h. Other stages: h, or the tuple
    `(h, *state_out, [position_ids, [attention_mask]])` the next stage unpacks."""
    norm = getattr(module, "norm", None)
    if norm is not None:
        return norm(h)
    extras = list(state_out)
    if stage.attention_mask is not None:
        extras += [stage.positions, stage.attention_mask]
    elif stage.given_position_ids is not None:
        extras.append(stage.given_position_ids)
    return (h, *extras) if extras else h


def create_text_stage_forward(
    name: str,
    run_layers: Callable,
    n_state: Callable[[nn.Module], int] = lambda module: 0,
    own_inputs: tuple[str, ...] = (),
) -> Callable:
    """A text-backbone stage forward: the shared prologue (`begin_stage`) and epilogue
    (`end_stage`) around `run_layers(module, stage, input_ids, **own) -> (h, state_out)`,
    the model-specific part. `n_state(module)` counts the model tensors this stage receives;
    `own_inputs` are extra keywords handed to `run_layers` (None when not given)."""

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
        own = {k: kwargs.pop(k, None) for k in own_inputs}
        reject_unused({"past_key_values": past_key_values, "use_cache": use_cache, **kwargs}, name)
        stage = begin_stage(
            self, input_ids, inputs_embeds, carried, attention_mask, position_ids,
            cache_position, n_state(self),
        )  # fmt: skip
        h, state_out = run_layers(self, stage, input_ids, **own)
        return end_stage(self, h, stage, state_out)

    forward.__qualname__ = f"{name}.pipeline_forward"
    return forward


def _run_decoder_layers(module: nn.Module, stage: StageInput, input_ids) -> tuple:
    """Llama-style layers: one rotary call shared by all, a mask per attention type."""
    position_embeddings = module.rotary_emb(stage.h, stage.positions)
    types_ = layer_types_of(module.config)
    h = stage.h
    for idx, layer in iter_layers(module):
        h = layer(
            h,
            attention_mask=stage.masks[types_[idx]],
            position_ids=stage.positions,
            position_embeddings=position_embeddings,
        )
    return h, ()


def create_pipeline_forward_inner(model_class_name: str = "AutoModel") -> Callable:
    """Create a pipeline-compatible forward method for HuggingFace inner models.

    For Llama-style decoders (LlamaModel, Qwen3Model, MistralModel, ...): optional
    embed_tokens, one rotary call shared by all layers, a mask per attention type."""
    return create_text_stage_forward(model_class_name, _run_decoder_layers)


def lm_head_or_hidden(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits (with the config's final-logit softcapping) on the last stage, else `h`."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        return h  # hidden states, or the tuple the next stage unpacks
    logits = lm_head(h)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def create_pipeline_forward_causal_lm() -> Callable:
    """Create a pipeline-compatible forward method for causal LM wrappers (`model.model`
    decoder + `lm_head`): returns logits on the last stage, hidden states elsewhere. Every
    other input goes to the patched decoder, which rejects what it would drop."""

    def forward(self, input_ids=None, *carried, labels=None, logits_to_keep=0, **kwargs):
        if labels is not None:
            raise TypeError(
                f"{type(self).__name__}: under pipeline parallelism the loss is the schedule's "
                "loss_fn on the last stage; pass labels as the schedule's target, not to forward"
            )
        reject_unused({"logits_to_keep": logits_to_keep or None}, type(self).__name__)
        return lm_head_or_hidden(self, self.model(input_ids, *carried, **kwargs))

    forward.__qualname__ = "CausalLM.pipeline_forward"
    return forward
