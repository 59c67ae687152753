"""`BackendConfig.te_fp8`: Nemotron-H's forward runs under Transformer Engine's FP8 autocast.

There is no transformer_engine (and no CUDA) here, so the shared fake (`am_dtype.fake_te`) is
installed: its `te.Linear` is a plain linear layer that records, at every call, the FP8 state
TE's documented `autocast(enabled, recipe, amax_reduction_group)` / `fp8_autocast(enabled,
fp8_recipe, fp8_group)` contexts would have set (nested contexts restore the outer state).
The real TE path is `test_gpu.py::test_forward_under_real_te_fp8_autocast`.
"""

from __future__ import annotations

import pytest
import torch
from _nemotron_helpers import cpu_backend, tiny_config

from am_dtype import TEFp8Config
from am_dtype.fake_te import install_fake_transformer_engine
from am_models_nemotron import NemotronHForCausalLM


@pytest.fixture
def fake_te(monkeypatch):
    """The shared fake TE; returns (fp8 state, (enabled, recipe) per te.Linear call, recipes)."""
    fake = install_fake_transformer_engine(monkeypatch)
    return fake.fp8_state, fake.linear_fp8, fake.recipe


def _models(te_fp8):
    torch.manual_seed(0)
    plain = NemotronHForCausalLM(tiny_config(), backend=cpu_backend())
    plain.initialize_weights(dtype=torch.float32)
    fp8 = NemotronHForCausalLM(tiny_config(), backend=cpu_backend(linear="te", te_fp8=te_fp8))
    fp8.load_state_dict(plain.state_dict())
    return plain, fp8


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("recipe", "cls"), [("current", "Float8CurrentScaling"), ("block", "Float8BlockScaling")]
)
def test_forward_runs_every_te_linear_inside_fp8_autocast_with_the_recipe(fake_te, recipe, cls):
    state, linear_calls, recipe_mod = fake_te
    plain, fp8 = _models(TEFp8Config(recipe))
    out = fp8(IDS, labels=IDS)
    assert len(linear_calls) > 10  # projections of every block and the head
    assert all(enabled for enabled, _ in linear_calls)
    assert all(type(r) is getattr(recipe_mod, cls) for _, r in linear_calls)
    assert state["enabled"] is False and state["recipe"] is None  # the context was left
    # The fake te.Linear is a plain linear: the same numbers as the torch model.
    ref = plain(IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
    out.loss.backward()


def test_a_prebuilt_recipe_object_is_passed_through(fake_te):
    _, linear_calls, recipe_mod = fake_te
    given = recipe_mod.MXFP8BlockScaling()
    _, fp8 = _models(TEFp8Config(given))
    fp8(IDS)
    assert linear_calls and all(r is given for _, r in linear_calls)


def test_without_te_fp8_no_autocast_is_entered(fake_te):
    _, linear_calls, _ = fake_te
    _, model = _models(None)
    model(IDS)
    assert linear_calls and not any(enabled for enabled, _ in linear_calls)
