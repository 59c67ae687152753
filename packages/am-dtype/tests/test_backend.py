"""BackendConfig defaults and validation, module builders, resolve_dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import am_dtype.backend as backend
from am_dtype import (
    BackendConfig,
    Float32RMSNorm,
    TEFp8Config,
    initialize_linear_module,
    initialize_rms_norm_module,
    resolve_dtype,
)

ON_PLAIN_CPU = not (torch.cuda.is_available() or backend.HAVE_TE or backend.HAVE_DEEP_EP)


@pytest.mark.skipif(not ON_PLAIN_CPU, reason="defaults checked here are the CPU, no-TE ones")
def test_defaults_on_a_cpu_machine_without_gpu_packages():
    cfg = BackendConfig()
    assert (cfg.attn, cfg.linear, cfg.rms_norm) == ("sdpa", "torch", "torch_fp32")
    assert cfg.rope_fusion is False
    assert cfg.experts == ("torch_mm" if hasattr(torch, "_grouped_mm") else "torch")
    assert cfg.dispatcher == "torch"
    assert cfg.te_fp8 is None and cfg.gate_precision is None and cfg.enable_deepep is None
    assert (cfg.dispatcher_num_sms, cfg.dispatcher_share_token_dispatcher) == (20, True)
    assert cfg.compile_attn is False and cfg.enable_hf_state_dict_adapter is True


CHOICES = {
    "attn": backend.ATTN_CHOICES,
    "linear": backend.LINEAR_CHOICES,
    "rms_norm": backend.RMS_NORM_CHOICES,
    "experts": backend.EXPERTS_CHOICES,
    "dispatcher": backend.DISPATCHER_CHOICES,
}


@pytest.mark.parametrize("field_name", sorted(CHOICES))
def test_unknown_choice_names_value_and_accepted(field_name):
    with pytest.raises(ValueError) as err:
        BackendConfig(**{field_name: "nope"})
    msg = str(err.value)
    assert f"{field_name}='nope'" in msg
    for choice in CHOICES[field_name]:
        assert repr(choice) in msg


@pytest.mark.parametrize("key", sorted(backend._REQUIREMENTS))
def test_backend_whose_package_is_missing_raises_import_error(monkeypatch, key):
    field_name, value = key
    flag, package, extra = backend._REQUIREMENTS[key]
    monkeypatch.setattr(backend, flag, False)
    with pytest.raises(ImportError) as err:
        BackendConfig(**{field_name: value})
    msg = str(err.value)
    assert f"{field_name}={value!r}" in msg and package in msg and extra in msg


@pytest.mark.parametrize("key", sorted(backend._REQUIREMENTS))
def test_install_advice_never_names_an_extra_that_installs_nothing(key):
    # deep_ep and uccl have no wheel: the advice says how to build them, not "pip install".
    _, package, how = backend._REQUIREMENTS[key]
    if package in ("deep_ep", "uccl"):
        assert "from source" in how and "pip install" not in how and "extra" not in how
    else:
        assert "pip install 'am-" in how


@pytest.mark.parametrize(
    ("field_name", "value", "instead"),
    [
        ("attn", "tilelang", "attn='te'"),
        ("experts", "te", "experts='torch_mm'"),
        ("experts", "torch_mm_mxfp8", "experts='torch_mm'"),
    ],
)
def test_choices_no_component_runs_are_rejected_with_reason_and_alternative(
    monkeypatch, field_name, value, instead
):
    # Rejected even with every optional package present: nothing in am implements them.
    monkeypatch.setattr(backend, "_REQUIREMENTS", {})
    with pytest.raises(ValueError) as err:
        BackendConfig(**{field_name: value})
    msg = str(err.value)
    assert f"BackendConfig.{field_name}={value!r} is not available" in msg and instead in msg


@pytest.mark.parametrize("key", sorted(backend._REQUIREMENTS))
def test_backend_whose_package_is_present_is_accepted(monkeypatch, key):
    field_name, value = key
    monkeypatch.setattr(backend, backend._REQUIREMENTS[key][0], True)
    assert getattr(BackendConfig(**{field_name: value}), field_name) == value


def _deepep_available(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_DEEP_EP", True)


@pytest.mark.parametrize(
    ("enable", "dispatcher", "expected"),
    [
        (True, "torch", "deepep"),
        (True, "hybridep", "hybridep"),
        (True, "deepep", "deepep"),
        (False, "deepep", "torch"),
        (False, "hybridep", "torch"),
        (False, "torch", "torch"),
    ],
)
def test_enable_deepep_legacy_flag(monkeypatch, enable, dispatcher, expected):
    _deepep_available(monkeypatch)
    with pytest.warns(DeprecationWarning, match=f"dispatcher={expected!r}") as rec:
        cfg = BackendConfig(enable_deepep=enable, dispatcher=dispatcher)
    assert cfg.dispatcher == expected
    assert rec[0].filename == __file__  # points at the caller, not the dataclass internals


def test_enable_deepep_true_without_deep_ep_is_an_import_error(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_DEEP_EP", False)
    with pytest.warns(DeprecationWarning), pytest.raises(ImportError, match="deep_ep"):
        BackendConfig(enable_deepep=True)


def test_no_warning_without_the_legacy_flag(recwarn):
    BackendConfig()
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("torch.float32", torch.float32),
        (" BF16 ", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float64", torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (None, None),
    ],
)
def test_gate_precision_accepts_strings_and_dtypes(given, expected):
    assert BackendConfig(gate_precision=given).gate_precision is expected


@pytest.mark.parametrize("bad", ["int8", "float8", "", torch.int32, 32])
def test_gate_precision_rejects_non_float(bad):
    with pytest.raises(ValueError, match="gate_precision"):
        BackendConfig(gate_precision=bad)


def test_resolve_dtype_error_lists_accepted_names():
    with pytest.raises(ValueError) as err:
        resolve_dtype("quarter", name="x")
    assert "x='quarter'" in str(err.value) and "'bfloat16'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dispatcher_num_sms": 0}, "dispatcher_num_sms=0"),
        ({"dispatcher_num_sms": -4}, "dispatcher_num_sms=-4"),
        ({"fake_gate_noise": -0.1}, "fake_gate_noise=-0.1"),
        ({"fake_gate_noise": float("nan")}, "fake_gate_noise=nan must be a finite"),
        ({"fake_gate_noise": float("inf")}, "fake_gate_noise=inf must be a finite"),
    ],
)
def test_numeric_fields_out_of_range_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackendConfig(**kwargs)


BOOL_FIELDS = (
    "rope_fusion",
    "dispatcher_share_token_dispatcher",
    "dispatcher_async_dispatch",
    "enable_deepep",
    "fake_balanced_gate",
    "enable_hf_state_dict_adapter",
    "enable_fsdp_optimizations",
    "compile_attn",
)


@pytest.mark.parametrize(
    ("field_name", "bad"),
    [
        (name, bad)
        for name in BOOL_FIELDS
        for bad in ("yes", "False", 1, 0, None)
        if not (bad is None and name == "enable_deepep")  # None is its documented default
    ],
)
def test_bool_fields_take_only_bools(field_name, bad):
    with pytest.raises(TypeError, match=f"BackendConfig.{field_name}={bad!r} must be a bool"):
        BackendConfig(**{field_name: bad})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dispatcher_num_sms": 2.5}, "dispatcher_num_sms=2.5 must be an int"),
        ({"dispatcher_num_sms": "20"}, "dispatcher_num_sms='20' must be an int"),
        ({"dispatcher_num_sms": True}, "dispatcher_num_sms=True must be an int"),
        ({"fake_gate_noise": "0.1"}, "fake_gate_noise='0.1' must be a float"),
        ({"fake_gate_noise": True}, "fake_gate_noise=True must be a float"),
        ({"te_fp8": "current"}, "te_fp8='current' must be a TEFp8Config"),
        ({"te_fp8": {"recipe": "current"}}, "te_fp8=.* must be a TEFp8Config"),
    ],
)
def test_fields_of_the_wrong_type_are_type_errors_naming_the_field(kwargs, match):
    with pytest.raises(TypeError, match=match):
        BackendConfig(**kwargs)


@pytest.mark.parametrize("bad", [1, None, ["sdpa"]])
@pytest.mark.parametrize("field_name", sorted(CHOICES))
def test_choice_fields_of_the_wrong_type_name_the_field(field_name, bad):
    with pytest.raises(ValueError, match=f"BackendConfig.{field_name}=.* is not supported"):
        BackendConfig(**{field_name: bad})


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    cfg = BackendConfig(fake_gate_noise=1)
    assert cfg.fake_gate_noise == 1.0 and isinstance(cfg.fake_gate_noise, float)


@pytest.mark.parametrize(
    ("have_te", "cuda", "missing"),
    [
        (False, True, "Transformer Engine"),
        (True, False, "a CUDA device"),
        (False, False, "Transformer Engine"),
    ],
)
def test_rope_fusion_is_rejected_where_the_fused_kernel_cannot_run(
    monkeypatch, have_te, cuda, missing
):
    monkeypatch.setattr(backend, "HAVE_TE", have_te)
    monkeypatch.setattr(backend, "_CUDA", cuda)
    with pytest.raises(ValueError, match=f"rope_fusion=True .*but {missing} is not available"):
        BackendConfig(rope_fusion=True)
    assert BackendConfig(rope_fusion=False).rope_fusion is False


def test_rope_fusion_is_accepted_with_te_and_cuda(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TE", True)
    monkeypatch.setattr(backend, "_CUDA", True)
    assert BackendConfig(rope_fusion=True).rope_fusion is True


@pytest.mark.parametrize("dispatcher", ["deepep", "hybridep", "uccl_ep"])
def test_async_dispatch_is_rejected_for_the_kernel_library_dispatchers(monkeypatch, dispatcher):
    monkeypatch.setattr(backend, "_REQUIREMENTS", {})
    with pytest.raises(ValueError, match=f"dispatcher_async_dispatch=True .*{dispatcher!r}"):
        BackendConfig(dispatcher=dispatcher, dispatcher_async_dispatch=True)
    assert BackendConfig(
        dispatcher="torch", dispatcher_async_dispatch=True
    ).dispatcher_async_dispatch


def test_te_fp8_needs_transformer_engine(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TE", False)
    with pytest.raises(ImportError, match=r"am-dtype\[te\]"):
        BackendConfig(te_fp8=TEFp8Config("current"), linear="torch")
    _te_available(monkeypatch)
    assert BackendConfig(te_fp8=TEFp8Config("mxfp8"), linear="te").te_fp8.recipe == "mxfp8"


def test_te_fp8_without_te_linear_layers_is_rejected(monkeypatch):
    # FP8 autocast quantizes TE modules only: with torch linears nothing would run in FP8.
    _te_available(monkeypatch)
    with pytest.raises(ValueError, match="linear='torch' builds none"):
        BackendConfig(te_fp8=TEFp8Config("current"), linear="torch")


def _te_available(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TE", True)


def test_to_dict_round_trips_through_the_constructor():
    cfg = BackendConfig(gate_precision="float32", fake_gate_noise=0.5)
    d = cfg.to_dict()
    assert d["gate_precision"] == "float32"
    assert set(d) == {f.name for f in dataclasses.fields(BackendConfig)}
    assert BackendConfig(**d) == cfg


def test_torch_linear_module():
    lin = initialize_linear_module("torch", 4, 3, bias=True, dtype=torch.float32)
    # A CpuGemmLinear is an nn.Linear with nn.Linear's parameters and state dict.
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (3, 4) and lin.bias is not None
    assert list(lin.state_dict()) == list(nn.Linear(4, 3).state_dict()) and lin.cpu_gemm == "auto"
    assert lin.weight.dtype == torch.float32
    meta = initialize_linear_module("torch", 4, 3, device="meta")
    assert meta.weight.is_meta and meta.weight.dtype == torch.bfloat16 and meta.bias is None


@pytest.mark.parametrize(("impl", "cls"), [("torch", nn.RMSNorm), ("torch_fp32", Float32RMSNorm)])
def test_torch_rms_norm_modules(impl, cls):
    norm = initialize_rms_norm_module(impl, 6, eps=1e-6, dtype=torch.float32)
    assert type(norm) is cls and norm.weight.shape == (6,) and norm.weight.dtype == torch.float32
    assert norm.eps == 1e-6
    x = torch.randn(2, 6)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)


def test_te_builders_without_te_name_the_extra(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TE", False)
    with pytest.raises(ImportError, match=r"am-dtype\[te\]"):
        initialize_linear_module("te", 4, 4)
    with pytest.raises(ImportError, match=r"am-dtype\[te\]"):
        initialize_rms_norm_module("te", 4)


def test_unknown_builder_names_are_rejected():
    with pytest.raises(ValueError, match=r"linear_impl='fast'.*\['torch', 'te'\]"):
        initialize_linear_module("fast", 4, 4)
    with pytest.raises(ValueError, match=r"rms_norm_impl='fused'.*'torch_fp32'"):
        initialize_rms_norm_module("fused", 4)


def test_te_builders_create_te_modules_and_patch_them(fake_te):
    lin = initialize_linear_module("te", 4, 3, dtype=torch.float32)
    assert isinstance(lin, fake_te.pytorch.Linear) and lin.weight.dtype == torch.float32
    norm = initialize_rms_norm_module("te", 5, eps=1e-4, dtype=torch.float32)
    assert isinstance(norm, fake_te.pytorch.RMSNorm) and norm.eps == 1e-4
    # Building a TE module applied the runtime patches.
    assert getattr(fake_te.pytorch.Linear.forward, "_am_te_patched", False)
    assert getattr(fake_te.pytorch.RMSNorm.forward, "_am_te_patched", False)


def test_compile_attn_with_te_attention_is_rejected(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TE", True)
    with pytest.raises(ValueError, match="compile_attn=True cannot be combined with attn='te'"):
        BackendConfig(attn="te", compile_attn=True)
    assert BackendConfig(attn="sdpa", compile_attn=True).compile_attn is True
