"""Model construction without allocation (``init_empty_weights``) or random init
(``skip_random_init``), for models whose weights are loaded right after."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["init_empty_weights", "skip_random_init"]

# In-place initializers of torch.nn.init (and of transformers.initialization, which wraps
# them). Both the random ones and the constant ones are disabled: a skipped module must
# not be half-initialised.
_INIT_FUNCTION_NAMES = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)
# Modules that hold such initializers as attributes; some torch modules bind them at import
# time (`from torch.nn.init import xavier_uniform_`), so patching torch.nn.init alone misses
# those call sites.
_INIT_MODULES = (
    "torch.nn.init",
    "torch.nn.modules.activation",
    "torch.nn.modules.linear",
    "torch.nn.modules.conv",
    "torch.nn.modules.normalization",
    "torch.nn.modules.sparse",
    "torch.nn.modules.batchnorm",
    "torch.nn.modules.rnn",
    "torch.nn.modules.transformer",
    "transformers.initialization",
)
# Per-module init hooks: torch's reset_parameters and transformers' per-module _init_weights.
# PreTrainedModel.init_weights is left alone because it also ties weights.
_INIT_METHOD_NAMES = ("reset_parameters", "_reset_parameters", "_init_weights")


def _move_parameter(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """Return ``param`` on ``device``, keeping its class, ``requires_grad`` and attributes.

    A parameter already there is returned as is, so re-registering a shared parameter (weight
    tying) keeps one object.
    """
    if param.device == device:
        return param
    moved = param.data.to(device)
    cls = type(param)
    if cls is nn.Parameter:
        return nn.Parameter(moved, requires_grad=param.requires_grad)
    attrs = dict(param.__dict__)
    try:
        new_param = cls(moved, requires_grad=param.requires_grad)
    except TypeError:  # subclasses whose constructor takes no requires_grad
        new_param = cls(moved)
        new_param.requires_grad_(param.requires_grad)
    for key, value in attrs.items():
        setattr(new_param, key, value)
    return new_param


@contextmanager
def init_empty_weights(
    device: torch.device | str = torch.device("meta"), include_buffers: bool = False
) -> Iterator[None]:
    """Create every parameter registered inside the context on ``device`` (default meta).

    Construction on the meta device allocates nothing and runs no real init, so a large
    model is built in milliseconds and filled later by loading a checkpoint. Buffers stay
    where they were created (they are usually computed, e.g. RoPE frequencies) unless
    ``include_buffers`` is set.

    Example::

        with init_empty_weights():
            layer = nn.Linear(100, 100)  # layer.weight.device == meta
    """
    device = torch.device(device)
    original_param = nn.Module.register_parameter
    original_buffer = nn.Module.register_buffer

    def register_parameter(module, name, param):
        original_param(module, name, param)
        if param is not None:
            module._parameters[name] = _move_parameter(module._parameters[name], device)

    def register_buffer(module, name, tensor, persistent=True):
        if tensor is not None:
            tensor = tensor.to(device)
        original_buffer(module, name, tensor, persistent=persistent)

    nn.Module.register_parameter = register_parameter
    if include_buffers:
        nn.Module.register_buffer = register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter = original_param
        nn.Module.register_buffer = original_buffer


def _all_module_classes() -> list[type]:
    seen: set[type] = set()
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
    return list(seen)


def _skip_init_function(tensor, *args, **kwargs):
    return tensor


def _skip_init_method(self, *args, **kwargs):
    return None


@contextmanager
def skip_random_init() -> Iterator[None]:
    """Construct modules without running any weight initialization.

    Inside the context every ``torch.nn.init`` initializer (also the copies bound in torch
    modules and in ``transformers.initialization``) returns its tensor untouched, and the
    ``reset_parameters`` / ``_init_weights`` methods of every ``nn.Module`` class are no-ops.
    Parameters therefore hold uninitialised memory and must be loaded right after; the RNG
    is not advanced. Everything is restored on exit, also when an exception is raised.
    """
    saved: list[tuple[object, str, object]] = []
    try:
        for module_name in _INIT_MODULES:
            module = sys.modules.get(module_name)
            for fn_name in _INIT_FUNCTION_NAMES:
                if module is not None and hasattr(module, fn_name):
                    saved.append((module, fn_name, getattr(module, fn_name)))
                    setattr(module, fn_name, _skip_init_function)
        for cls in _all_module_classes():
            for method in _INIT_METHOD_NAMES:
                if method in cls.__dict__:
                    saved.append((cls, method, cls.__dict__[method]))
                    setattr(cls, method, _skip_init_method)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
