"""Model configs that are not transformers ``PretrainedConfig`` objects.

Users of the reference build models from plain config objects (a small class, a
``types.SimpleNamespace``) as well as from transformers configs. A model reads attributes off
either; these helpers cover the two places that need more than attributes: transformers'
``generate()`` / ``save_pretrained`` machinery (which wants a real ``PretrainedConfig``) and
the model's ``GenerationConfig``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["config_attributes", "generation_config_for", "is_pretrained_config"]


def is_pretrained_config(config: Any) -> bool:
    """True for a transformers ``PretrainedConfig`` (which generate() and save need)."""
    from transformers import PretrainedConfig

    return isinstance(config, PretrainedConfig)


def config_attributes(config: Any) -> dict[str, Any]:
    """The public, non-callable attributes of a plain config object (instance and class ones),
    or ``to_dict()`` of a ``PretrainedConfig``."""
    if is_pretrained_config(config):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    out = {}
    for name in dir(config):
        if name.startswith("_"):
            continue
        try:
            value = getattr(config, name)
        except AttributeError:  # a property that cannot answer
            continue
        if not callable(value):
            out[name] = value
    return out


def generation_config_for(config: Any):
    """The ``GenerationConfig`` a model built from ``config`` starts with.

    transformers' ``GenerationConfig.from_model_config`` for a ``PretrainedConfig`` (token ids
    and generation fields come from it); for a plain object the same from its attributes; and
    transformers' defaults when the config cannot provide one (its attributes do not form a
    valid generation config).
    """
    from transformers import GenerationConfig

    source = config if is_pretrained_config(config) else config_attributes(config)
    try:
        return GenerationConfig.from_model_config(source)
    except (AttributeError, TypeError, ValueError):
        return GenerationConfig()
