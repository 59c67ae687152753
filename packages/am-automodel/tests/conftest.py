"""Fixtures of the am-automodel tests."""

from __future__ import annotations

import pytest
from automodel_helpers import tiny_raw


@pytest.fixture
def tiny(tmp_path):
    """tiny(**sections) -> a validated Recipe writing under tmp_path/run."""
    from am_automodel.recipe import build_recipe

    def make(**sections):
        return build_recipe(tiny_raw(tmp_path / "run", **sections))

    return make
