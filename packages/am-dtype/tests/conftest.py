"""Shared fixtures: eager RMSNorm by default, clean global flags, a fake Transformer Engine."""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import am_dtype.backend
import am_dtype.fp8
from am_dtype.norm import Float32RMSNorm


@pytest.fixture(autouse=True)
def _eager_rms_norm_and_clean_flags(monkeypatch):
    # Compiling takes ~20 s on CPU; only the test that asks for it pays that.
    monkeypatch.setattr(Float32RMSNorm, "compile_forward", False)
    monkeypatch.setattr(am_dtype.fp8, "IS_FIRST_MICROBATCH", None)
    monkeypatch.setattr(am_dtype.fp8, "IS_OPTIM_STEP", False)


@dataclass
class FakeTE:
    """Handles on the fake `transformer_engine` modules and what they recorded."""

    pytorch: types.ModuleType
    recipe: types.ModuleType
    calls: list = field(default_factory=list)


def _fake_te_classes(calls: list) -> dict:
    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, device=None, params_dtype=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(
                torch.randn(out_features, in_features, device=device, dtype=params_dtype)
            )

        def forward(self, inp, is_first_microbatch=None):
            calls.append(("Linear", is_first_microbatch))
            return inp @ self.weight.t()

    class GroupedLinear(Linear):
        def forward(self, inp, m_splits, is_first_microbatch=None):
            calls.append(("GroupedLinear", is_first_microbatch, list(m_splits)))
            return inp @ self.weight.t()

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-5, device=None, params_dtype=None):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=params_dtype))

        def forward(self, inp):
            calls.append(("RMSNorm",))
            return inp * self.weight

    return {"Linear": Linear, "GroupedLinear": GroupedLinear, "RMSNorm": RMSNorm}


@pytest.fixture
def fake_te(monkeypatch) -> FakeTE:
    """Install a minimal fake `transformer_engine` and mark TE as available."""
    calls: list = []
    root = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    for name, cls in _fake_te_classes(calls).items():
        setattr(pytorch, name, cls)
    # Recipe classes as TE defines them: subclasses of recipe.Recipe in that module.
    base = type("Recipe", (), {"__module__": recipe.__name__})
    recipe.Recipe = base
    for name in ("Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"):
        setattr(recipe, name, type(name, (base,), {"__module__": recipe.__name__}))

    # TE's documented autocast contract: inside the context FP8 is enabled with that recipe
    # (and amax group), nested contexts restore the outer state on exit.
    state = {"enabled": False, "recipe": None, "group": None}

    @contextlib.contextmanager
    def _enter(enabled, recipe_obj, group):
        outer = dict(state)
        state.update(enabled=enabled, recipe=recipe_obj, group=group)
        try:
            yield
        finally:
            state.update(outer)

    @contextlib.contextmanager
    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
        calls.append(("autocast", enabled, recipe))
        with _enter(enabled, recipe, amax_reduction_group):
            yield

    @contextlib.contextmanager
    def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None):
        calls.append(("fp8_autocast", enabled, fp8_recipe))
        with _enter(enabled, fp8_recipe, fp8_group):
            yield

    pytorch.fp8_state = state

    pytorch.autocast, pytorch.fp8_autocast = autocast, fp8_autocast
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    for mod in (root, pytorch, common, recipe):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(am_dtype.backend, "HAVE_TE", True)
    monkeypatch.setattr(am_dtype.fp8, "HAVE_TE", True)
    # A fresh patcher so the package-level one's "already patched" state never leaks.
    monkeypatch.setattr(am_dtype.fp8, "_patch_te_modules", am_dtype.fp8._make_lazy_te_patcher())
    return FakeTE(pytorch=pytorch, recipe=recipe, calls=calls)
