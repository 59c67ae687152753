"""Split a model into pipeline stages by per-stage lists of module names.

    names = generate_stage_module_names(model, num_stages=4)          # or layers_per_stage=[...]
    stages = split_model_into_stages(model, names, stage_indices=[1])  # this rank's stages

A stage is a copy of the model with every module of the other stages removed: decoder
layers dropped (the kept ones keep their original index, so parameter names match the
full model), `embed_tokens`, `norm`, `lm_head`, vision towers ... set to None. The first
stage holds the embeddings and the multimodal encoders, the last the final norm and
`lm_head`; models adjust the lists through their `customize_pipeline_stage_modules` hook
(Nemotron-H pins its MTP head to the last stage). Pass a meta-device model: the copies are
then free, and `materialize_stage` gives each rank real tensors for its stages only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from am_pp.hf_utils import (
    MULTIMODAL_SUFFIXES,
    get_text_module,
    init_hf_model_buffers,
    model_keeps_self_forward,
    patch_hf_model_for_pp,
)

__all__ = [
    "ModelLayout",
    "generate_stage_module_names",
    "materialize_stage",
    "model_layout",
    "split_model_into_stages",
]


# Text-backbone modules that read the token ids or their embeddings, so they run where the
# embeddings are: the token embedding and Gemma 4's per-layer-input embedding + projection.
FIRST_STAGE_TEXT_ATTRS = (
    "embed_tokens",
    "embed_tokens_per_layer",
    "per_layer_model_projection",
    "per_layer_projection_norm",
)


@dataclass(frozen=True)
class ModelLayout:
    """Where the pipeline-relevant modules of a model live (dotted names, "" prefix = root)."""

    text_model: nn.Module
    text_prefix: str  # "model." for LlamaForCausalLM, "model.language_model." for VLMs
    num_layers: int
    first: tuple[str, ...]  # multimodal encoders + embeddings: always on the first stage
    last: tuple[str, ...]  # final norm + lm_head: always on the last stage

    @property
    def layers_prefix(self) -> str:
        return f"{self.text_prefix}layers"


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def _text_backbone(model: nn.Module) -> nn.Module:
    text = get_text_module(model)
    if text is model and not hasattr(model, "layers"):
        text = getattr(model, "model", None)
    if not isinstance(getattr(text, "layers", None), (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"{type(model).__name__}: found no decoder `layers` (ModuleList or ModuleDict) on the "
            "model, model.model, or its text module; cannot split it into pipeline stages"
        )
    return text


def _multimodal_modules(model: nn.Module, text_prefix: str) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(text_prefix) or module is None:
            continue
        if name.rsplit(".", 1)[-1] in MULTIMODAL_SUFFIXES and not any(
            name.startswith(f"{f}.") for f in found
        ):
            found.append(name)
    return found


def model_layout(model: nn.Module) -> ModelLayout:
    """Locate the decoder layers, embeddings, final norm, lm_head and multimodal encoders."""
    text = _text_backbone(model)
    path = _path_of(model, text)
    prefix = f"{path}." if path else ""
    first = [*_multimodal_modules(model, prefix)]
    first += [f"{prefix}{a}" for a in FIRST_STAGE_TEXT_ATTRS if getattr(text, a, None) is not None]
    last = [f"{prefix}norm"] if getattr(text, "norm", None) is not None else []
    if getattr(model, "lm_head", None) is not None:
        last.append("lm_head")
    return ModelLayout(text, prefix, len(text.layers), tuple(first), tuple(last))


def _layer_counts(num_layers: int, num_stages: int, layers_per_stage, name: str) -> list[int]:
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1")
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or any(c < 0 for c in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"layers_per_stage={counts} must have one non-negative entry per stage "
                f"({num_stages}) summing to the {num_layers} decoder layers of {name}"
            )
        return counts
    if num_stages > num_layers:
        raise ValueError(
            f"num_stages={num_stages} is more than the {num_layers} decoder layers of {name}: "
            "every stage needs at least one layer (or give layers_per_stage explicitly)"
        )
    # Earlier stages take the remainder: the last stage also runs norm + lm_head + loss.
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def generate_stage_module_names(
    model: nn.Module, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[list[str]]:
    """Per-stage module names: multimodal encoders and embeddings first, layers balanced (or
    `layers_per_stage`), final norm and lm_head last; then the model's
    `customize_pipeline_stage_modules(names, layers_prefix, text_model)` hook, if it has one."""
    layout = model_layout(model)
    counts = _layer_counts(layout.num_layers, num_stages, layers_per_stage, type(model).__name__)
    layer_keys = [str(k) for k in _layer_keys(layout.text_model)]
    names: list[list[str]] = []
    start = 0
    for count in counts:
        names.append([f"{layout.layers_prefix}.{k}" for k in layer_keys[start : start + count]])
        start += count
    names[0][:0] = layout.first
    names[-1].extend(layout.last)
    hook = getattr(model, "customize_pipeline_stage_modules", None)
    if callable(hook):
        names = hook(names, layout.layers_prefix, text_model=layout.text_model)
    return names


def _layer_keys(text: nn.Module) -> list:
    layers = text.layers
    return list(layers.keys()) if isinstance(layers, nn.ModuleDict) else list(range(len(layers)))


def _owner_stage(param: str, names_per_stage) -> list[int]:
    return [
        s
        for s, names in enumerate(names_per_stage)
        if any(param == n or param.startswith(f"{n}.") for n in names)
    ]


def _check_assignment(model: nn.Module, names_per_stage: list[list[str]]) -> None:
    """Every parameter on exactly one stage, every listed name a real module."""
    modules = dict(model.named_modules())
    unknown = sorted({n for names in names_per_stage for n in names} - set(modules))
    if unknown:
        raise ValueError(f"stage module names {unknown} are not modules of {type(model).__name__}")
    orphans, shared = [], []
    for name, _ in model.named_parameters():
        owners = _owner_stage(name, names_per_stage)
        (orphans if not owners else shared if len(owners) > 1 else []).append(name)
    if orphans or shared:
        raise ValueError(
            f"{type(model).__name__}: every parameter must belong to exactly one stage; "
            f"on no stage: {orphans[:8]}{'...' if len(orphans) > 8 else ''}; "
            f"on several stages: {shared[:8]}"
        )


def _drop_module(stage: nn.Module, name: str, layers_prefix: str) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = stage.get_submodule(parent_name) if parent_name else stage
    if parent_name == layers_prefix:
        del parent[attr]
    else:
        setattr(parent, attr, None)


def _layers_as_dict(text: nn.Module) -> None:
    # A ModuleList renumbers on deletion; a ModuleDict keyed by the original index keeps the
    # full model's parameter names and each layer's attention type.
    if isinstance(text.layers, nn.ModuleList):
        text.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(text.layers)})


def _layer_spans(names_per_stage: list[list[str]], layers_prefix: str) -> list[tuple[int, int]]:
    """[start, stop) of every stage's decoder layers; they must run consecutively, stage after
    stage (hidden states flow through the layers in order)."""
    spans, stop = [], 0
    for s, names in enumerate(names_per_stage):
        keys = sorted(
            int(n[len(layers_prefix) + 1 :])
            for n in names
            if n.startswith(f"{layers_prefix}.") and "." not in n[len(layers_prefix) + 1 :]
        )
        if keys and keys != list(range(stop, stop + len(keys))):
            raise ValueError(
                f"stage {s} holds decoder layers {keys}; each stage must take the next "
                f"consecutive layers (from layer {stop})"
            )
        spans.append((stop, stop + len(keys)))
        stop += len(keys)
    return spans


def split_model_into_stages(
    model: nn.Module,
    module_names_per_stage: list[list[str]],
    stage_indices: Sequence[int],
    patch_forward: bool = True,
) -> list[nn.Module]:
    """The stage modules for `stage_indices` (copies of `model`, pruned to each stage's
    names), with pipeline-aware forwards unless the model keeps its own
    (`model_keeps_self_forward`). `model` itself is left untouched."""
    num_stages = len(module_names_per_stage)
    bad = [s for s in stage_indices if not 0 <= s < num_stages]
    if bad:
        raise ValueError(f"stage_indices {bad} outside the {num_stages} stages")
    _check_assignment(model, module_names_per_stage)
    layers_prefix = model_layout(model).layers_prefix
    spans = _layer_spans(module_names_per_stage, layers_prefix)
    every = {n for names in module_names_per_stage for n in names}
    stages = []
    for s in stage_indices:
        stage = copy.deepcopy(model)
        text = model_layout(stage).text_model
        _layers_as_dict(text)
        text._pp_layer_span = spans[s]  # read by forwards whose state crosses stages
        for name in sorted(every - set(module_names_per_stage[s]), key=len, reverse=True):
            _drop_module(stage, name, layers_prefix)
        if patch_forward and not model_keeps_self_forward(stage):
            patch_hf_model_for_pp(stage)
        stages.append(stage)
    return stages


def materialize_stage(
    stage: nn.Module,
    device: torch.device | str,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Give a (meta-device) stage real storage on `device`, its weights from `state_dict`
    (a full-model state dict: only this stage's keys are read, and all of them must be
    there), and its non-persistent buffers (rotary inv_freq, ...) recomputed."""
    device = torch.device(device)
    if any(t.is_meta for t in [*stage.parameters(), *stage.buffers()]):
        stage.to_empty(device=device)
    else:
        stage.to(device)
    if state_dict is not None:
        own = stage.state_dict()
        missing = sorted(k for k in own if k not in state_dict)
        if missing:
            raise KeyError(f"state_dict lacks this stage's keys {missing[:8]}")
        stage.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    init_hf_model_buffers(stage, device)
    return stage
