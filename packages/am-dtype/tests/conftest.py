"""Shared fixtures: eager RMSNorm by default, clean global flags, a fake Transformer Engine."""

from __future__ import annotations

import pytest

import am_dtype.fp8
from am_dtype.fake_te import FakeTransformerEngine, install_fake_transformer_engine
from am_dtype.norm import Float32RMSNorm


@pytest.fixture(autouse=True)
def _eager_rms_norm_and_clean_flags(monkeypatch):
    # Compiling takes ~20 s on CPU; only the test that asks for it pays that.
    monkeypatch.setattr(Float32RMSNorm, "compile_forward", False)
    monkeypatch.setattr(am_dtype.fp8, "IS_FIRST_MICROBATCH", None)
    monkeypatch.setattr(am_dtype.fp8, "IS_OPTIM_STEP", False)


@pytest.fixture
def fake_te(monkeypatch) -> FakeTransformerEngine:
    """The shared fake `transformer_engine` (am_dtype.fake_te), installed for one test."""
    return install_fake_transformer_engine(monkeypatch)
