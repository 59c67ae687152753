"""Dtype casting with fp32 keep lists on unsharded models (the sharded case is in test_distributed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from am_dtype import (
    cast_frozen_modules_to_compute_dtype,
    cast_mixed_dtype_params_to_bf16,
    cast_model_to_dtype,
    enforce_strict_fp32,
    yield_fp32_model,
)
from am_dtype.cast import (
    _dominant_float_dtype,
    _get_fp32_module_keywords,
    _get_strict_fp32_module_keywords,
    _has_dtensor_params,
    _matches,
    _restore_fp32_buffers,
    _restore_fp32_modules,
    _restore_fp32_tensor_snapshots,
    _snapshot_fp32_tensors,
)


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.register_buffer("correction_bias", torch.randn(4))


class HyperConn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fn = nn.Parameter(torch.randn(8))
        self.scale = nn.Parameter(torch.randn(8))


class Toy(nn.Module):
    _keep_in_fp32_modules = ["norm"]
    _keep_in_fp32_modules_strict = ["router", "attn_hc.fn"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.layernorm = nn.LayerNorm(8)  # "norm" must not match "layernorm"
        self.router = Router()
        self.attn_hc = HyperConn()
        self.register_buffer("steps", torch.arange(3))
        self.register_buffer("inv_freq", torch.rand(4))
        with torch.no_grad():  # values that bf16 cannot represent exactly
            for p in (self.norm.weight, self.norm.bias, self.layernorm.weight):
                p.copy_(torch.randn(8))


KEPT = ["norm.weight", "norm.bias", "router.weight", "attn_hc.fn"]
KEPT_BUFFERS = ["router.correction_bias"]
CAST = ["embed.weight", "embed.bias", "layernorm.weight", "layernorm.bias", "attn_hc.scale"]


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_keyword_matching_is_by_whole_segments():
    assert _matches("model.norm.weight", ["norm"])
    assert _matches("norm", ["norm"])
    assert _matches("layers.0.attn_hc.fn", ["attn_hc.fn"])
    assert not _matches("layers.0.layernorm.weight", ["norm"])
    assert not _matches("layers.0.attn_hc.fn_bias", ["attn_hc.fn"])
    assert not _matches("anything", [])


def test_keywords_are_collected_deduplicated_and_validated():
    class Child(nn.Module):
        _keep_in_fp32_modules_strict = {"z_gate", "a_gate"}
        _keep_in_fp32_modules = "norm"

    class Parent(nn.Module):
        _keep_in_fp32_modules = ["norm", "lm_head"]
        _keep_in_fp32_modules_strict = None

        def __init__(self) -> None:
            super().__init__()
            self.child = Child()

    model = Parent()
    assert _get_fp32_module_keywords(model) == ["norm", "lm_head", "a_gate", "z_gate"]
    assert _get_strict_fp32_module_keywords(model) == ["a_gate", "z_gate"]
    assert _get_fp32_module_keywords(nn.Linear(2, 2)) == []
    model._keep_in_fp32_modules = ["norm", 3]
    with pytest.raises(TypeError, match="Parent._keep_in_fp32_modules.*got 3"):
        _get_fp32_module_keywords(model)


def test_naive_bf16_round_trip_is_lossy_and_snapshots_are_exact(toy):
    before = _state(toy)
    toy.to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(toy.norm.weight, before["norm.weight"])  # the problem

    torch.manual_seed(0)
    toy = Toy()
    params, buffers = _snapshot_fp32_tensors(toy, ["norm", "router"], ["router"])
    assert set(params) == {"norm.weight", "norm.bias", "router.weight"}
    assert set(buffers) == {"router.correction_bias"}
    toy.to(torch.bfloat16).to(torch.float32)
    _restore_fp32_tensor_snapshots(toy, params, buffers)
    for name in [*params, *buffers]:
        assert torch.equal(
            toy.get_parameter(name) if name in params else toy.get_buffer(name), before[name]
        )
    assert not torch.equal(toy.layernorm.weight, before["layernorm.weight"])  # not snapshotted


def test_snapshot_restore_also_restores_the_dtype(toy):
    params, buffers = _snapshot_fp32_tensors(toy, ["norm"], ["router"])
    weight = toy.norm.weight
    toy.to(torch.bfloat16)
    _restore_fp32_tensor_snapshots(toy, params, buffers)
    assert toy.norm.weight is weight and weight.dtype == torch.float32
    assert toy.router.correction_bias.dtype == torch.float32
    # Only fp32 tensors are snapshotted: a bf16 model has nothing to preserve.
    assert _snapshot_fp32_tensors(toy.to(torch.bfloat16), ["norm"], ["router"]) == ({}, {})


def test_cast_model_to_dtype_keeps_fp32_modules_exact(toy):
    before = _state(toy)
    embed_weight = toy.embed.weight
    cast_model_to_dtype(toy, torch.bfloat16)
    state = toy.state_dict()
    for name in KEPT + KEPT_BUFFERS:
        assert state[name].dtype == torch.float32 and torch.equal(state[name], before[name]), name
    for name in CAST + ["inv_freq"]:
        assert state[name].dtype == torch.bfloat16, name
    assert torch.equal(state["steps"], before["steps"])  # integer buffers untouched
    assert toy.embed.weight is embed_weight  # optimizer references stay valid


def test_cast_model_to_dtype_upcasts_kept_modules_of_a_low_precision_model(toy):
    toy.to(torch.float16)
    cast_model_to_dtype(toy, "bf16")
    assert (
        toy.norm.weight.dtype == torch.float32 and toy.router.correction_bias.dtype == torch.float32
    )
    assert toy.embed.weight.dtype == torch.bfloat16


def test_cast_back_to_fp32_after_bf16_keeps_kept_values(toy):
    before = _state(toy)
    cast_model_to_dtype(toy, torch.bfloat16)
    cast_model_to_dtype(toy, torch.float32)
    assert all(v.dtype != torch.bfloat16 for v in toy.state_dict().values())
    for name in KEPT + KEPT_BUFFERS:
        assert torch.equal(toy.state_dict()[name], before[name])


def test_skip_modules_are_left_untouched(toy):
    toy.layernorm.to(torch.float16)
    cast_model_to_dtype(toy, torch.bfloat16, skip_modules=("embed", "layernorm"))
    assert toy.embed.weight.dtype == torch.float32
    assert toy.layernorm.weight.dtype == torch.float16
    assert toy.attn_hc.scale.dtype == torch.bfloat16 and toy.norm.weight.dtype == torch.float32
    assert toy.embed is not None and "embed" in dict(toy.named_children())


def test_unknown_skip_module_is_rejected(toy):
    with pytest.raises(ValueError, match=r"\['nope'\].*accepted: \['attn_hc', 'embed'"):
        cast_model_to_dtype(toy, torch.bfloat16, skip_modules=("nope",))
    assert toy.embed.weight.dtype == torch.float32  # nothing happened


def test_bad_dtype_is_rejected(toy):
    with pytest.raises(ValueError, match="int8"):
        cast_model_to_dtype(toy, torch.int8)


def test_restore_helpers_on_plain_models(toy):
    toy.to(torch.bfloat16)
    _restore_fp32_buffers(toy, ["router", "norm"])
    assert toy.router.correction_bias.dtype == torch.float32
    assert toy.router.weight.dtype == torch.bfloat16 and toy.norm.weight.dtype == torch.bfloat16
    _restore_fp32_modules(toy, ["norm", "attn_hc.fn"])
    assert toy.norm.weight.dtype == torch.float32 and toy.attn_hc.fn.dtype == torch.float32
    assert (
        toy.attn_hc.scale.dtype == torch.bfloat16 and toy.layernorm.weight.dtype == torch.bfloat16
    )
    assert not _has_dtensor_params(toy)


class VLM(nn.Module):
    _keep_in_fp32_modules = ["vision.norm"]

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Module()
        self.vision.proj = nn.Linear(4, 4)
        self.vision.norm = nn.LayerNorm(4)
        self.vision.register_buffer("pixel_mean", torch.rand(4))
        self.rotary = nn.Module()
        self.rotary.register_buffer("inv_freq", torch.rand(2))
        self.mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.language = nn.Linear(4, 4)


def test_cast_frozen_modules_casts_only_fully_frozen_subtrees():
    model = VLM()
    model.vision.requires_grad_(False)
    model.mixed[0].requires_grad_(False)
    model.language.to(torch.bfloat16)
    cast_frozen_modules_to_compute_dtype(model, torch.bfloat16)
    assert model.vision.proj.weight.dtype == torch.bfloat16
    assert model.vision.pixel_mean.dtype == torch.bfloat16
    assert model.vision.norm.weight.dtype == torch.float32  # kept by _keep_in_fp32_modules
    assert model.rotary.inv_freq.dtype == torch.float32  # no parameters: not a frozen module
    assert model.mixed[0].weight.dtype == torch.bfloat16  # fully frozen child of a mixed parent
    assert model.mixed[1].weight.dtype == torch.float32
    # The frozen tower now feeds the bf16 trainable module without a dtype mismatch.
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    out = model.language(model.vision.proj(x) + model.vision.pixel_mean)
    assert out.dtype == torch.bfloat16


def test_cast_frozen_modules_whole_model_and_noop():
    model = VLM()
    cast_frozen_modules_to_compute_dtype(model, None)
    assert model.vision.proj.weight.dtype == torch.float32
    cast_frozen_modules_to_compute_dtype(model, torch.bfloat16)  # nothing frozen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.requires_grad_(False)
    cast_frozen_modules_to_compute_dtype(model, "bfloat16")
    assert (
        model.language.weight.dtype == torch.bfloat16
        and model.rotary.inv_freq.dtype == torch.bfloat16
    )
    assert model.vision.norm.weight.dtype == torch.float32


def test_yield_fp32_model_initializes_in_fp32_and_restores(toy):
    cast_model_to_dtype(toy, torch.bfloat16)
    with yield_fp32_model(toy) as model:
        assert model is toy
        assert all(p.dtype == torch.float32 for p in toy.parameters())
        torch.manual_seed(1)
        for p in toy.parameters():
            nn.init.normal_(p, std=0.02)
        inside = _state(toy)
    state = toy.state_dict()
    for name in KEPT + KEPT_BUFFERS:
        assert state[name].dtype == torch.float32 and torch.equal(state[name], inside[name]), name
    for name in CAST:
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], inside[name].bfloat16(), rtol=0, atol=0)


def test_yield_fp32_model_explicit_dtype_and_exceptions(toy):
    with pytest.raises(KeyError):
        with yield_fp32_model(toy, restore_dtype=torch.float16):
            raise KeyError("boom")
    assert toy.embed.weight.dtype == torch.float16 and toy.norm.weight.dtype == torch.float32
    with yield_fp32_model(toy, restore_dtype=torch.float32):
        pass
    assert toy.embed.weight.dtype == torch.float32


def test_yield_fp32_model_default_is_the_dominant_dtype():
    model = nn.Sequential(nn.Linear(16, 16).to(torch.bfloat16), nn.LayerNorm(4))
    assert _dominant_float_dtype(model) == torch.bfloat16
    with yield_fp32_model(model):
        assert model[0].weight.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(2, dtype=torch.float16))
    assert _dominant_float_dtype(buffers_only) == torch.float16
    assert _dominant_float_dtype(nn.Module()) == torch.float32


def test_cast_mixed_dtype_params_to_bf16(toy):
    toy.embed.to(torch.bfloat16)
    toy.attn_hc.to(torch.float16)
    assert cast_mixed_dtype_params_to_bf16(toy) is toy
    for name, t in toy.state_dict().items():
        if name.startswith("attn_hc"):
            assert t.dtype == torch.float16, name  # only fp32 tensors change
        elif t.is_floating_point():
            assert t.dtype == torch.bfloat16, name
    assert toy.steps.dtype == torch.int64


class _Block(nn.Module):
    """A block whose fp32 parameters live in a `_fp32_params` holder (its own FSDP unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self._fp32_params = nn.Module()
        self._fp32_params.scale = nn.Parameter(torch.randn(4))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 4)


def test_skip_modules_are_found_at_any_depth_and_reattached():
    torch.manual_seed(0)
    model = _Stack()
    holders = [block._fp32_params for block in model.layers]
    before = [h.scale.detach().clone() for h in holders]
    cast_model_to_dtype(model, torch.bfloat16, skip_modules=("_fp32_params",))
    for block, holder, value in zip(model.layers, holders, before, strict=True):
        assert block._fp32_params is holder  # the same object, re-attached
        assert holder.scale.dtype == torch.float32 and torch.equal(holder.scale, value)
        assert block.proj.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.bfloat16
    # A dotted name picks one holder; an unknown name is an error naming it.
    cast_model_to_dtype(model, torch.float16, skip_modules=("layers.1._fp32_params",))
    assert model.layers[0]._fp32_params.scale.dtype == torch.float16
    assert model.layers[1]._fp32_params.scale.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\['_fp16_params'\] match no submodule.*any depth"):
        cast_model_to_dtype(model, torch.bfloat16, skip_modules=("_fp16_params",))
    assert all(b._fp32_params is h for b, h in zip(model.layers, holders, strict=True))


def test_enforce_strict_fp32_upcasts_strict_tensors_of_a_low_precision_build():
    model = Toy().to(torch.bfloat16)
    assert enforce_strict_fp32(model) is model
    assert model.router.weight.dtype == torch.float32
    assert model.router.correction_bias.dtype == torch.float32
    assert model.attn_hc.fn.dtype == torch.float32  # a keyword naming one parameter
    assert model.attn_hc.scale.dtype == torch.bfloat16  # not strict
    assert model.norm.weight.dtype == torch.bfloat16  # a non-strict hint is not enforced
