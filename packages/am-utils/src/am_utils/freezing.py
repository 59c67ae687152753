"""Parameter freezing: by config (towers, embeddings, regex patterns) and for parameters that
a model holds but never uses (KV-shared layers, top-k indexers)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "apply_parameter_freezing",
    "freeze_deepseek_v4_indexer_params",
    "freeze_minimax_m3_indexer_params",
    "freeze_unused_kv_sharing_params",
]

# Boolean keys of the freeze config: key -> (default, model attribute, tower words). A module
# belongs to the part when one of its dotted name components begins with a tower word
# (case-insensitive): "vision" matches `model.vision_tower` and `vision_model`, never
# `revision` or `division_head`; "text" matches `text_model`, never `context_proj`.
_TOWER_KEYS: dict[str, tuple[bool, str, tuple[str, ...]]] = {
    "freeze_vision_tower": (True, "vision_tower", ("vision", "visual", "image_encoder")),
    "freeze_audio_tower": (False, "audio_tower", ("audio", "speech", "sound")),
    "freeze_language_model": (False, "language_model", ("language", "text", "llm")),
}
_BOOL_KEYS = (*_TOWER_KEYS, "freeze_embeddings", "freeze_video_embedder")
_PATTERN_KEYS = ("patterns", "unfreeze_patterns")
FREEZE_CONFIG_KEYS: tuple[str, ...] = (*_BOOL_KEYS, *_PATTERN_KEYS)

_VIDEO_EMBEDDER = "patch_generator.video_embedder"
_KV_SHARED_PARAM = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:k_proj|v_proj|k_norm|v_norm)\."
)
_NON_TEXT_TOWERS = ("vision", "visual", "audio")


def _has_component_starting_with(name: str, words) -> bool:
    """Whether a dotted module name has a component that begins with one of ``words``
    (case-insensitive), e.g. ``model.vision_tower.blocks`` for ``"vision"``."""
    return any(part.lower().startswith(tuple(words)) for part in name.split(".") if part)


def _freeze_module_by_attribute_and_patterns(model, attribute_name, name_patterns):
    """Freeze ``model.<attribute_name>`` and every module one of whose dotted name components
    begins with one of ``name_patterns`` (lower-case words, e.g. ``"vision"`` freezes
    ``model.vision_tower`` but not ``model.revision``)."""
    part = getattr(model, attribute_name, None)
    if isinstance(part, nn.Module):
        part.requires_grad_(False)
    words = tuple(pattern.lower() for pattern in name_patterns)
    for name, module in model.named_modules():
        if name and _has_component_starting_with(name, words):
            module.requires_grad_(False)


def _validate_freeze_config(freeze_config) -> dict:
    if freeze_config is None:
        return {}
    if not isinstance(freeze_config, Mapping):
        raise TypeError(
            f"freeze_config must be a mapping with keys from {list(FREEZE_CONFIG_KEYS)}, "
            f"got {type(freeze_config).__name__}"
        )
    unknown = sorted(set(freeze_config) - set(FREEZE_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown freeze_config keys {unknown}; accepted keys: {list(FREEZE_CONFIG_KEYS)}"
        )
    for key in _BOOL_KEYS:
        if key in freeze_config and not isinstance(freeze_config[key], bool):
            raise ValueError(f"freeze_config[{key!r}] must be a bool, got {freeze_config[key]!r}")
    for key in _PATTERN_KEYS:
        _compile_patterns(key, freeze_config.get(key, ()))
    return dict(freeze_config)


def _compile_patterns(key: str, patterns) -> list[re.Pattern]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"freeze_config[{key!r}] must be a list of regex strings, got {patterns!r}"
        )
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"freeze_config[{key!r}]: invalid regex {pattern!r}: {err}") from err
    return compiled


def _set_requires_grad_by_patterns(model: nn.Module, patterns: list[re.Pattern], value: bool):
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(value)


def _freeze_input_embeddings(model: nn.Module) -> None:
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    modules = [embeddings] if embeddings is not None else []
    if not modules:
        modules = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for module in modules:
        module.requires_grad_(False)


def apply_parameter_freezing(model, freeze_config):
    """Set ``requires_grad=False`` on the parts of ``model`` that ``freeze_config`` names.

    ``freeze_config`` keys (all optional; unknown keys raise ``ValueError``):

    - ``freeze_vision_tower`` (bool, default True): ``model.vision_tower`` and modules with a
      name component beginning with ``vision``, ``visual`` or ``image_encoder``
      (``vision_tower``, ``vision_model``, ``visual``; not ``revision``).
    - ``freeze_audio_tower`` (bool, default False): ``model.audio_tower`` and modules with a
      component beginning with ``audio``, ``speech`` or ``sound``.
    - ``freeze_language_model`` (bool, default False): ``model.language_model`` and modules
      with a component beginning with ``language``, ``text`` or ``llm`` (``text_model``; not
      ``context_proj``).
    - ``freeze_embeddings`` (bool, default False): the input embeddings
      (``get_input_embeddings()``, else every ``nn.Embedding``).
    - ``freeze_video_embedder`` (bool, default False): ``patch_generator.video_embedder``
      parameters (RADIO's video branch, unused on image-only data).
    - ``patterns`` (list of regex): parameters whose dotted name matches (``re.search``, so a
      plain substring works) are frozen.
    - ``unfreeze_patterns`` (list of regex): applied last, sets ``requires_grad=True`` on
      matching parameters (e.g. keep ``lm_head`` trainable under a frozen language model).
    """
    config = _validate_freeze_config(freeze_config)
    for key, (default, attribute, name_patterns) in _TOWER_KEYS.items():
        if config.get(key, default):
            _freeze_module_by_attribute_and_patterns(model, attribute, name_patterns)
    if config.get("freeze_embeddings", False):
        _freeze_input_embeddings(model)
    if config.get("freeze_video_embedder", False):
        _set_requires_grad_by_patterns(model, [re.compile(re.escape(_VIDEO_EMBEDDER))], False)
    _set_requires_grad_by_patterns(
        model, _compile_patterns("patterns", config.get("patterns", ())), False
    )
    unfreeze = _compile_patterns("unfreeze_patterns", config.get("unfreeze_patterns", ()))
    _set_requires_grad_by_patterns(model, unfreeze, True)


def _text_config(model):
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    return text_config if text_config is not None else config


def freeze_unused_kv_sharing_params(model) -> list[str]:
    """Freeze the dead K/V parameters of KV-shared layers; returns the frozen names.

    In Gemma 4 E2B/E4B style models the last ``num_kv_shared_layers`` layers reuse the
    keys/values of earlier layers, yet checkpoints (and models that keep that layout) still
    hold their ``k_proj``/``v_proj``/``k_norm``/``v_norm``. Those get no gradient, so an
    optimizer that tracks them saves no state for them and a resumed run fails to load.
    Call this before building the optimizer. Works on a pipeline-stage part too (layer
    indices are read from parameter names); vision/audio tower layers are never touched.
    """
    text_config = _text_config(model)
    num_shared = getattr(text_config, "num_kv_shared_layers", 0) or 0
    num_layers = getattr(text_config, "num_hidden_layers", 0) or 0
    if num_shared <= 0 or num_layers <= 0:
        return []
    first_shared = num_layers - num_shared
    frozen = []
    for name, param in model.named_parameters():
        match = _KV_SHARED_PARAM.search(name)
        if match is None or int(match.group(1)) < first_shared:
            continue
        if _has_component_starting_with(name[: match.start()], _NON_TEXT_TOWERS):
            continue
        param.requires_grad_(False)
        frozen.append(name)
    if frozen:
        logger.info(
            "Froze %d dead KV-sharing parameters in layers %d-%d (num_kv_shared_layers=%d)",
            len(frozen),
            first_shared,
            num_layers - 1,
            num_shared,
        )
    return frozen


def _freeze_by_substring(model, substring: str, label: str) -> list[str]:
    frozen = []
    for name, param in model.named_parameters():
        if substring in name:
            param.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.info("Froze %d %s parameters", len(frozen), label)
    return frozen


def freeze_deepseek_v4_indexer_params(model) -> list[str]:
    """Freeze DeepSeek V4 indexer parameters (``.self_attn.compressor.indexer.``).

    They only produce the discrete top-k selection mask, so no gradient reaches them. A
    no-op unless ``model.config.model_type == "deepseek_v4"``. Returns the frozen names.
    """
    if getattr(getattr(model, "config", None), "model_type", None) != "deepseek_v4":
        return []
    return _freeze_by_substring(model, ".self_attn.compressor.indexer.", "DeepSeek V4 indexer")


def freeze_minimax_m3_indexer_params(model) -> list[str]:
    """Freeze MiniMax M3 lightning-indexer parameters (``.self_attn.indexer.``).

    Like DeepSeek V4's indexer they only feed a discrete top-k mask. A no-op unless
    ``model.config.model_type`` starts with ``minimax_m3``. Returns the frozen names.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if not model_type.startswith("minimax_m3"):
        return []
    return _freeze_by_substring(model, ".self_attn.indexer.", "MiniMax M3 indexer")
