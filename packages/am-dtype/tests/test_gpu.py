"""CUDA / Transformer Engine checks; skipped with a reason on CPU-only machines."""

from __future__ import annotations

import pytest
import torch

from am_dtype import HAVE_TE, Float32RMSNorm, TEFp8Config, initialize_linear_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_te = pytest.mark.skipif(not HAVE_TE, reason="needs transformer_engine (am-dtype[te])")


def test_compiled_rms_norm_on_cuda_matches_float64():
    import am_dtype.norm as norm_mod

    norm = Float32RMSNorm(1024, eps=1e-6, device="cuda")
    norm.compile_forward = None  # auto: compiled because the input is on CUDA
    with torch.no_grad():
        norm.weight.copy_(torch.rand(1024, device="cuda") + 0.5)
    x = (torch.randn(8, 1024, device="cuda") * 10).bfloat16()
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert (
        norm_mod._compiled_rms_norm.compiled is not None and not norm_mod._compiled_rms_norm.failed
    )
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-6)


@needs_te
@pytest.mark.parametrize(
    ("recipe", "cls"),
    [
        ("current", "Float8CurrentScaling"),
        ("block", "Float8BlockScaling"),
        ("mxfp8", "MXFP8BlockScaling"),
    ],
)
def test_real_te_recipes(recipe, cls):
    assert type(TEFp8Config(recipe).build_recipe()).__name__ == cls


@needs_te
def test_te_linear_is_patched_for_meta_inputs():
    lin = initialize_linear_module("te", 64, 32, device="cuda")
    out = lin(torch.empty(4, 64, device="meta", dtype=torch.bfloat16))
    assert out.is_meta and out.shape == (4, 32)
    y = lin(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16))
    assert y.shape == (4, 32)


@needs_te
@pytest.mark.parametrize("recipe", ["current", "mxfp8"])
def test_fp8_autocast_runs_te_linear_in_fp8(recipe):
    """`fp8_autocast` enters TE's real autocast: FP8 is on inside, off after, output close."""

    from am_dtype import fp8_autocast

    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    if recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
        pytest.skip("MXFP8 needs Blackwell (sm100+)")
    lin = initialize_linear_module("te", 128, 64, device="cuda")
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fp8_autocast(TEFp8Config(recipe)):
        assert FP8GlobalStateManager.is_fp8_enabled()
        y = lin(x)
    assert not FP8GlobalStateManager.is_fp8_enabled()
    y.float().sum().backward()
    ref = x.detach().float() @ lin.weight.detach().float().t()
    assert ((y.float() - ref).norm() / ref.norm()).item() <= 0.1
    assert torch.isfinite(x.grad).all()
