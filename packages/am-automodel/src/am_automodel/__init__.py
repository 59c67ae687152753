"""am-automodel: every am package in one install, and `automodel train` from one recipe.

`automodel train RECIPE.yaml [--section.key=value ...]` (or `python -m am_automodel`) runs
on one process or under torchrun. In Python: `run(load_recipe(path, overrides))`.
Names are imported on first use, so `automodel --help` and recipe errors stay quick.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ModelSpec": "am_automodel.models",
    "register_model": "am_automodel.models",
    "register_preset": "am_automodel.models",
    "Recipe": "am_automodel.recipe",
    "RecipeError": "am_automodel.recipe",
    "load_recipe": "am_automodel.recipe",
    "TrainResult": "am_automodel.train",
    "run": "am_automodel.train",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'am_automodel' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
