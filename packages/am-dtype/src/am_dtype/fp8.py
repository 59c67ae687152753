"""Transformer Engine FP8 configuration and the TE runtime patches.

`TEFp8Config` names an FP8 recipe ("current", "block", "mxfp8" or a recipe
object built by the caller) and turns it into TE's recipe and autocast
context. The global microbatch / optimizer-step flags let a training loop
tell TE layers when to re-quantize weights: FP8 weight caching quantizes on
the first microbatch of a gradient-accumulation window and reuses the cached
copy for the rest. `_patch_te_modules` wires that flag into TE's linear
layers and makes them tolerate meta/fake tensors (pipeline-parallel shape
inference runs modules on unallocated tensors, which TE kernels reject).

Transformer Engine is never imported when this module is imported; it is
imported on first use, and asking for it without it installed raises an
ImportError naming the `te` extra.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from am_dtype.availability import HAVE_TE

logger = logging.getLogger(__name__)

IS_FIRST_MICROBATCH: bool | None = None
IS_OPTIM_STEP: bool = False

# Recipe shorthand -> class name in transformer_engine.common.recipe.
_RECIPES = {
    "current": "Float8CurrentScaling",
    "block": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}


def get_is_first_microbatch() -> bool | None:
    """Return the global IS_FIRST_MICROBATCH flag (True, False, or None = no caching)."""
    return IS_FIRST_MICROBATCH


def set_is_first_microbatch(value: bool | None) -> None:
    """Set IS_FIRST_MICROBATCH: True quantizes and caches FP8 weights, False reuses the cache."""
    global IS_FIRST_MICROBATCH
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"is_first_microbatch must be True, False or None, got {value!r}")
    IS_FIRST_MICROBATCH = value


def get_is_optim_step() -> bool:
    """Return the global IS_OPTIM_STEP flag (whether this step ends with an optimizer update)."""
    return IS_OPTIM_STEP


def set_is_optim_step(value: bool) -> None:
    """Set the global IS_OPTIM_STEP flag."""
    global IS_OPTIM_STEP
    if not isinstance(value, bool):
        raise TypeError(f"is_optim_step must be True or False, got {value!r}")
    IS_OPTIM_STEP = value


def _import_te(module: str, what: str) -> Any:
    """Import a transformer_engine submodule, or explain which extra provides it."""
    missing = ImportError(
        f"{what} needs Transformer Engine ('transformer_engine'), which is not installed; "
        "install it with `pip install am-dtype[te]`"
    )
    if not HAVE_TE:
        raise missing
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise missing from err


@dataclass
class TEFp8Config:
    """Configuration for Transformer Engine FP8 quantization.

    Present (not None) in `BackendConfig.te_fp8` means FP8 is on. `recipe` is
    a shorthand -- "current" (Float8CurrentScaling), "block"
    (Float8BlockScaling) or "mxfp8" (MXFP8BlockScaling: e4m3 data with e8m0
    block scales) -- or a recipe object built by the caller, e.g.
    `Float8CurrentScaling(fp8_dpa=True)`, used as is.
    """

    recipe: Literal["current", "block", "mxfp8"] | Any = "current"

    def __post_init__(self) -> None:
        if isinstance(self.recipe, str):
            if self.recipe not in _RECIPES:
                raise ValueError(
                    f"TEFp8Config.recipe={self.recipe!r} is not a known recipe; accepted: "
                    f"{sorted(_RECIPES)} or a transformer_engine recipe object"
                )
        elif self.recipe is None:
            raise ValueError(
                "TEFp8Config.recipe=None; pass a recipe name or object, or set te_fp8=None"
            )
        elif not _is_te_recipe(self.recipe):
            raise TypeError(
                f"TEFp8Config.recipe={self.recipe!r} must be one of {sorted(_RECIPES)} or a "
                "transformer_engine recipe object (e.g. "
                "transformer_engine.common.recipe.Float8CurrentScaling())"
            )

    def build_recipe(self) -> Any:
        """Return the TE recipe object: the given object, or a new one for a shorthand."""
        if not isinstance(self.recipe, str):
            return self.recipe
        recipe_mod = _import_te("transformer_engine.common.recipe", f"TEFp8Config({self.recipe!r})")
        return getattr(recipe_mod, _RECIPES[self.recipe])()

    def maybe_te_autocast(self, fp8_group: Any = None) -> Any:
        """Return TE's FP8 autocast context manager for this recipe.

        `fp8_group` is the process group TE reduces amax statistics over (None: TE's
        default, the whole world).
        """
        te = _import_te("transformer_engine.pytorch", "TEFp8Config.maybe_te_autocast")
        recipe = self.build_recipe()
        group = {} if fp8_group is None else {"amax_reduction_group": fp8_group}
        # TE >= 2.8 renamed fp8_autocast(fp8_recipe=, fp8_group=) to autocast(recipe=,
        # amax_reduction_group=).
        if hasattr(te, "autocast"):
            return te.autocast(enabled=True, recipe=recipe, **group)
        old_group = {} if fp8_group is None else {"fp8_group": fp8_group}
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe, **old_group)


def _is_te_recipe(obj: Any) -> bool:
    """Whether `obj` is an instance of a class defined in transformer_engine (no TE import)."""
    return any(
        (getattr(cls, "__module__", "") or "").startswith("transformer_engine")
        for cls in type(obj).__mro__
    )


def fp8_autocast(te_fp8: TEFp8Config | None, fp8_group: Any = None) -> Any:
    """The context a model's forward runs in: TE's FP8 autocast for `te_fp8`, else a no-op.

    `te_fp8` is `BackendConfig.te_fp8`; with None nothing is imported and the context does
    nothing. Transformer Engine is imported on first use.
    """
    if te_fp8 is None:
        return contextlib.nullcontext()
    return te_fp8.maybe_te_autocast(fp8_group)


def fp8_autocast_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a model's `forward` to run under `fp8_autocast(self.backend.te_fp8)`.

    TE records the recipe on the autograd graph, so the backward of that forward runs in
    FP8 too. The signature seen by `inspect.signature` is the wrapped forward's.
    """

    @functools.wraps(forward)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        te_fp8 = getattr(getattr(self, "backend", None), "te_fp8", None)
        with fp8_autocast(te_fp8):
            return forward(self, *args, **kwargs)

    return wrapped


def is_tensor_unallocated(tensor: torch.Tensor) -> bool:
    """True if `tensor` has no real storage: meta, fake (FakeTensorMode) or unreadable.

    TE kernels cannot run on such tensors; callers short-circuit instead.
    A DTensor is judged by its local shard.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    from am_dtype.dtensor import to_local

    tensor = to_local(tensor)
    if tensor.is_meta or isinstance(tensor, FakeTensor):
        return True
    try:
        return tensor.numel() > 0 and tensor.untyped_storage().data_ptr() == 0
    except (RuntimeError, NotImplementedError):
        return True


# Output shape of each patched TE module for an input of shape (..., in_features).
def _linear_out_shape(module: Any, x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], module.out_features)


def _same_shape(module: Any, x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


# TE class name -> output shape for an input of shape (..., in_features).
_TE_PATCHES: dict[str, Callable[[Any, torch.Tensor], tuple[int, ...]]] = {
    "Linear": _linear_out_shape,
    "GroupedLinear": _linear_out_shape,
    "LayerNormLinear": _linear_out_shape,
    "RMSNorm": _same_shape,
    "LayerNorm": _same_shape,
}


def _microbatch_arg_index(forward: Callable[..., Any]) -> int | None:
    """Position of `is_first_microbatch` among the arguments after (self, inp), if any."""
    try:
        names = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # no introspectable signature: never inject
        return None
    if "is_first_microbatch" not in names:
        return None
    return names.index("is_first_microbatch") - 2


def _wrap_te_forward(
    forward: Callable[..., Any], out_shape: Callable[[Any, torch.Tensor], tuple[int, ...]]
) -> Callable[..., Any]:
    microbatch_index = _microbatch_arg_index(forward)

    @functools.wraps(forward)
    def patched(self: Any, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inp, torch.Tensor) and is_tensor_unallocated(inp):
            return inp.new_empty(out_shape(self, inp))
        flag = get_is_first_microbatch()
        given = kwargs.get("is_first_microbatch") is not None or (
            microbatch_index is not None and len(args) > microbatch_index
        )
        if microbatch_index is not None and flag is not None and not given:
            kwargs["is_first_microbatch"] = flag
        return forward(self, inp, *args, **kwargs)

    patched._am_te_patched = True  # type: ignore[attr-defined]
    return patched


def _make_lazy_te_patcher() -> Callable[[], bool]:
    """Return a callable that patches TE modules exactly once.

    The closure remembers whether it already ran, and transformer_engine is
    imported only on the first call. Two patches go on the forwards of TE's
    Linear, GroupedLinear, LayerNormLinear, RMSNorm and LayerNorm:
    - a meta/fake input short-circuits to an empty output of the right shape
      (pipeline-parallel shape inference; TE kernels reject such tensors);
    - the linear ones get the global IS_FIRST_MICROBATCH flag as
      `is_first_microbatch` unless the caller passed one (FP8 weight caching
      across gradient accumulation).
    The short-circuit returns a single tensor, so it assumes the default
    `return_bias=False` / `return_layernorm_output=False`. Returns True once patched.
    """
    done = False

    def patch() -> bool:
        nonlocal done
        if done:
            return True
        te = _import_te("transformer_engine.pytorch", "_patch_te_modules")
        for name, out_shape in _TE_PATCHES.items():
            cls = getattr(te, name, None)
            # The class marker also guards against a second patcher (e.g. after a reload).
            if cls is None or getattr(cls.forward, "_am_te_patched", False):
                continue
            cls.forward = _wrap_te_forward(cls.forward, out_shape)
        done = True
        logger.debug("patched Transformer Engine modules for meta tensors and FP8 weight caching")
        return True

    return patch


_patch_te_modules = _make_lazy_te_patcher()
