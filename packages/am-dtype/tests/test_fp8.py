"""TEFp8Config, the global microbatch flags, is_tensor_unallocated, the lazy TE patcher."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import am_dtype.fp8 as fp8
from am_dtype import (
    TEFp8Config,
    get_is_first_microbatch,
    get_is_optim_step,
    is_tensor_unallocated,
    set_is_first_microbatch,
    set_is_optim_step,
)


def test_flags_default_and_round_trip():
    assert get_is_first_microbatch() is None and get_is_optim_step() is False
    for value in (True, False, None):
        set_is_first_microbatch(value)
        assert get_is_first_microbatch() is value
    set_is_optim_step(True)
    assert get_is_optim_step() is True


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_flags_reject_non_bools(bad):
    with pytest.raises(TypeError, match=repr(bad)):
        set_is_first_microbatch(bad)
    with pytest.raises(TypeError, match=repr(bad)):
        set_is_optim_step(bad)


def test_recipe_validation():
    assert TEFp8Config().recipe == "current"
    with pytest.raises(ValueError, match=r"recipe='fp4'.*\['block', 'current', 'mxfp8'\]"):
        TEFp8Config("fp4")
    with pytest.raises(ValueError, match="recipe=None"):
        TEFp8Config(None)


def _te_like_recipe():
    """An object of a class defined in transformer_engine, as a prebuilt TE recipe is."""
    return type("DelayedScaling", (), {"__module__": "transformer_engine.common.recipe"})()


def test_prebuilt_recipe_object_is_used_as_is_without_te(monkeypatch):
    monkeypatch.setattr(fp8, "HAVE_TE", False)
    recipe = _te_like_recipe()
    assert TEFp8Config(recipe).build_recipe() is recipe


@pytest.mark.parametrize("bad", [123, 1.5, True, object(), b"current", ["current"]])
def test_recipe_of_the_wrong_type_is_rejected_naming_the_field(bad):
    with pytest.raises(TypeError, match=r"TEFp8Config\.recipe=.*transformer_engine recipe"):
        TEFp8Config(recipe=bad)


@pytest.mark.parametrize("recipe", ["current", "block", "mxfp8"])
def test_without_te_build_and_autocast_raise_naming_the_extra(monkeypatch, recipe):
    monkeypatch.setattr(fp8, "HAVE_TE", False)
    cfg = TEFp8Config(recipe)
    with pytest.raises(ImportError, match=r"am-dtype\[te\]") as err:
        cfg.build_recipe()
    assert repr(recipe) in str(err.value)
    with pytest.raises(ImportError, match=r"am-dtype\[te\]"):
        cfg.maybe_te_autocast()


def test_te_found_but_broken_import_is_reported(monkeypatch):
    monkeypatch.setattr(fp8, "HAVE_TE", True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"am-dtype\[te\]") as err:
        TEFp8Config("block").build_recipe()
    assert isinstance(err.value.__cause__, ImportError)


@pytest.mark.parametrize(
    ("recipe", "cls"),
    [
        ("current", "Float8CurrentScaling"),
        ("block", "Float8BlockScaling"),
        ("mxfp8", "MXFP8BlockScaling"),
    ],
)
def test_shorthands_build_the_matching_te_recipe(fake_te, recipe, cls):
    built = TEFp8Config(recipe).build_recipe()
    assert type(built) is getattr(fake_te.recipe, cls)


def test_autocast_uses_te_autocast_with_the_recipe(fake_te):
    with TEFp8Config("block").maybe_te_autocast():
        pass
    ((name, enabled, recipe),) = fake_te.calls
    assert name == "autocast" and enabled is True
    assert type(recipe) is fake_te.recipe.Float8BlockScaling


def test_autocast_falls_back_to_fp8_autocast_on_older_te(fake_te, monkeypatch):
    monkeypatch.delattr(fake_te.pytorch, "autocast")
    recipe = fake_te.recipe.Float8CurrentScaling()
    with TEFp8Config(recipe).maybe_te_autocast():
        assert (
            fake_te.pytorch.fp8_state["enabled"] and fake_te.pytorch.fp8_state["recipe"] is recipe
        )
    assert fake_te.calls == [("fp8_autocast", True, recipe)]
    assert fake_te.pytorch.fp8_state["enabled"] is False


@pytest.mark.parametrize("new_api", [True, False])
def test_fp8_autocast_enters_te_autocast_with_recipe_and_group(fake_te, monkeypatch, new_api):
    if not new_api:
        monkeypatch.delattr(fake_te.pytorch, "autocast")
    group = object()  # a process group stand-in: passed through untouched
    state = fake_te.pytorch.fp8_state
    with fp8.fp8_autocast(TEFp8Config("mxfp8"), fp8_group=group):
        assert state["enabled"] is True and state["group"] is group
        assert type(state["recipe"]) is fake_te.recipe.MXFP8BlockScaling
    assert state == {"enabled": False, "recipe": None, "group": None}


def test_fp8_autocast_of_none_is_a_no_op_that_needs_no_te(monkeypatch):
    monkeypatch.setattr(fp8, "HAVE_TE", False)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # any import would raise
    with fp8.fp8_autocast(None):
        pass


def test_fp8_autocast_forward_runs_the_forward_inside_autocast(fake_te):
    import inspect

    from torch import nn

    seen = []

    class Model(nn.Module):
        def __init__(self, backend):
            super().__init__()
            self.backend = backend

        @fp8.fp8_autocast_forward
        def forward(self, x, scale: float = 2.0):
            """Doc kept."""
            seen.append(dict(fake_te.pytorch.fp8_state))
            return x * scale

    cfg = types.SimpleNamespace(te_fp8=TEFp8Config("block"))
    assert Model(cfg)(torch.ones(2), scale=3.0).tolist() == [3.0, 3.0]
    assert seen[-1]["enabled"] is True
    assert type(seen[-1]["recipe"]) is fake_te.recipe.Float8BlockScaling
    # Off: no autocast entered; the signature and docstring are the wrapped forward's.
    Model(types.SimpleNamespace(te_fp8=None))(torch.ones(2))
    assert seen[-1]["enabled"] is False and len(fake_te.calls) == 1
    assert list(inspect.signature(Model.forward).parameters) == ["self", "x", "scale"]
    assert Model.forward.__doc__ == "Doc kept."


def test_is_tensor_unallocated():
    assert not is_tensor_unallocated(torch.ones(3))
    assert not is_tensor_unallocated(torch.empty(0))
    assert not is_tensor_unallocated(torch.ones(4)[2:])
    assert is_tensor_unallocated(torch.empty(3, device="meta"))
    with FakeTensorMode():
        fake = torch.empty(2, 3)
    assert is_tensor_unallocated(fake)


def test_is_tensor_unallocated_when_storage_is_unreadable(monkeypatch):
    t = torch.ones(2)

    class NoStorage(torch.Tensor):
        def untyped_storage(self):
            raise RuntimeError("no storage")

    assert is_tensor_unallocated(t.as_subclass(NoStorage))


def test_patcher_imports_te_lazily_and_needs_it(monkeypatch):
    monkeypatch.setattr(fp8, "HAVE_TE", False)
    patch = fp8._make_lazy_te_patcher()  # creating it imports nothing
    with pytest.raises(ImportError, match=r"am-dtype\[te\]"):
        patch()


def test_patcher_patches_exactly_once(fake_te):
    te = fake_te.pytorch
    originals = {name: getattr(te, name).forward for name in ("Linear", "GroupedLinear", "RMSNorm")}
    patch = fp8._patch_te_modules
    assert patch() is True
    patched = {name: getattr(te, name).forward for name in originals}
    for name, fn in patched.items():
        assert fn is not originals[name] and fn.__wrapped__ is originals[name]
    assert patch() is True
    # A second, independent patcher (e.g. after a reload) must not wrap again either.
    fp8._make_lazy_te_patcher()()
    assert {name: getattr(te, name).forward for name in originals} == patched


def test_patched_linear_injects_is_first_microbatch(fake_te):
    fp8._patch_te_modules()
    lin = fake_te.pytorch.Linear(4, 3, params_dtype=torch.float32)
    x = torch.randn(2, 4)
    lin(x)  # flag None: TE's own default
    set_is_first_microbatch(True)
    lin(x)
    set_is_first_microbatch(False)
    lin(x)
    lin(x, is_first_microbatch=True)  # an explicit argument wins ...
    lin(x, True)  # ... also when passed by position
    grouped = fake_te.pytorch.GroupedLinear(2, 4, 3, bias=False, params_dtype=torch.float32)
    out = grouped(x, [1, 1])
    grouped(x, [2, 0], True)
    fake_te.pytorch.RMSNorm(4)(x)  # norms take no such argument
    assert fake_te.calls == [
        ("Linear", None),
        ("Linear", True),
        ("Linear", False),
        ("Linear", True),
        ("Linear", True),
        ("GroupedLinear", False, [1, 1]),
        ("GroupedLinear", True, [2, 0]),
        ("RMSNorm",),
    ]
    torch.testing.assert_close(
        out, torch.cat((x[:1] @ grouped.weight0.t(), x[1:] @ grouped.weight1.t()))
    )


def test_patched_modules_short_circuit_unallocated_inputs(fake_te):
    fp8._patch_te_modules()
    te = fake_te.pytorch
    lin, norm = te.Linear(4, 3), te.RMSNorm(4)
    out = lin(torch.empty(2, 5, 4, device="meta"))
    assert out.is_meta and out.shape == (2, 5, 3)
    out = norm(torch.empty(7, 4, device="meta", dtype=torch.bfloat16))
    assert out.is_meta and out.shape == (7, 4) and out.dtype == torch.bfloat16
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_out = te.GroupedLinear(2, 4, 6)(torch.empty(5, 4), [2, 3])
    assert is_tensor_unallocated(fake_out) and fake_out.shape == (5, 6)
    assert fake_te.calls == []  # TE's kernels were never reached


def test_forward_without_a_signature_gets_no_injection():
    assert fp8._microbatch_arg_index(range) is None  # inspect.signature raises ValueError
    assert fp8._microbatch_arg_index(lambda self, inp, m_splits, is_first_microbatch=None: 0) == 1
