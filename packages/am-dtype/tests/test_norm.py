"""Float32RMSNorm against a float64 reference; the lazy compile and its eager fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import am_dtype.norm as norm_mod
from am_dtype import Float32RMSNorm
from am_dtype.norm import _LazyCompiled, _rms_norm_fp32, _RMSNormFP32, rms_norm


def _reference64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _norm(dim: int, dtype: torch.dtype, seed: int = 0) -> Float32RMSNorm:
    torch.manual_seed(seed)
    norm = Float32RMSNorm(dim, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim) * 0.5 + 1.0)
    return norm


def test_weight_keeps_model_dtype_and_output_keeps_input_dtype():
    norm = Float32RMSNorm(16)
    assert norm.weight.dtype == torch.bfloat16 and torch.equal(
        norm.weight, torch.ones(16, dtype=torch.bfloat16)
    )
    assert norm(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert norm(torch.randn(3, 16)).dtype == torch.float32
    assert norm.weight.dtype == torch.bfloat16


def test_bf16_output_is_the_float64_result_rounded_once():
    norm = _norm(256, torch.bfloat16)
    x = (torch.randn(4, 7, 256) * 30).to(torch.bfloat16)
    out = norm(x)
    ref = _reference64(x, norm.weight, norm.eps)
    # fp32 math then one rounding to bf16: within one bf16 ulp (2**-7 relative) of float64.
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-6)
    # Doing the arithmetic in bf16 is measurably worse than that.
    naive = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).double()
    assert (naive - ref).abs().max() > (out.double() - ref).abs().max()


def test_fp32_forward_and_gradients_match_float64():
    norm = _norm(64, torch.float32, seed=1)
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad_out = torch.randn(3, 5, 64)
    (norm(x) * grad_out).sum().backward()

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = _reference64(x64, w64, norm.eps)
    (ref * grad_out.double()).sum().backward()

    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_fused_backward_equals_autograd_of_the_plain_ops():
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    g = torch.randn(2, 3, 16)
    fused = torch.autograd.grad(_RMSNormFP32.apply(x, w, 1e-5), (x, w), g)
    plain = torch.autograd.grad(_rms_norm_fp32(x, w, 1e-5), (x, w), g)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 4, 24)])
def test_rms_norm_gradients_equal_autograd_in_float64(scaled, shape):
    """The hand-written backward against autograd through the plain ops in float64, with
    and without a scale, for 2-D and 4-D (per-head) inputs. The norm computes in fp32 (as
    transformers' norms do), so the tolerance is fp32's."""
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True) if scaled else None
    g = torch.randn(*shape)
    inputs = (x, w) if scaled else (x,)
    y = rms_norm(x, w, 1e-6)
    assert type(y.grad_fn).__name__ == "_RMSNormFP32Backward"
    fused = torch.autograd.grad(y, inputs, g)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if scaled else None
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    y64 = y64 * w64 if scaled else y64
    ref = torch.autograd.grad(y64, (x64, w64) if scaled else (x64,), g.double())
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_rms_norm_gradient_to_one_side_only():
    x = torch.randn(6, 8)
    w = torch.randn(8, requires_grad=True)
    (gw,) = torch.autograd.grad(rms_norm(x, w, 1e-6).sum(), (w,))
    torch.testing.assert_close(gw, (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0))
    x.requires_grad_(True)
    w.requires_grad_(False)
    (gx,) = torch.autograd.grad(rms_norm(x, w, 1e-6).pow(2).sum(), (x,))
    xr = x.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(_rms_norm_fp32(xr, w, 1e-6).pow(2).sum(), (xr,))
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-6)


def test_training_uses_the_fused_backward_and_inference_the_plain_ops():
    norm = _norm(16, torch.float32)
    x = torch.randn(4, 16, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "_RMSNormFP32Backward"
    with torch.no_grad():
        torch.testing.assert_close(norm(x), _rms_norm_fp32(x, norm.weight, norm.eps))
    frozen = _norm(16, torch.float32).requires_grad_(False)
    assert frozen(torch.randn(4, 16)).grad_fn is None


def test_bf16_weight_gets_a_bf16_gradient():
    norm = _norm(32, torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    norm(x).float().pow(2).sum().backward()
    assert norm.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(norm.weight.grad.float()).all()


def test_meta_construction_then_reset_parameters():
    norm = Float32RMSNorm(8, device="meta")
    assert norm.weight.is_meta
    assert norm(torch.empty(2, 8, device="meta", dtype=torch.bfloat16)).is_meta
    norm.to_empty(device="cpu")
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8, dtype=torch.bfloat16))
    assert "8, eps=1e-05, dtype=torch.bfloat16" in repr(norm)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"dim": 0}, "dim=0"), ({"dim": 4, "eps": 0.0}, "eps=0.0")]
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Float32RMSNorm(**kwargs)


def test_wrong_hidden_size_is_named():
    with pytest.raises(ValueError, match=r"last dim to be 8, got input shape \(2, 4\)"):
        Float32RMSNorm(8)(torch.ones(2, 4))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", False), ("off", False), ("false", False), ("1", True), ("ON", True), ("auto", None)],
)
def test_compile_switch_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("AM_DTYPE_COMPILE_RMSNORM", value)
    assert norm_mod._compile_default() is expected


def test_compile_switch_default_and_bad_value(monkeypatch):
    monkeypatch.delenv("AM_DTYPE_COMPILE_RMSNORM", raising=False)
    assert norm_mod._compile_default() is None
    monkeypatch.setenv("AM_DTYPE_COMPILE_RMSNORM", "sometimes")
    with pytest.raises(ValueError, match="AM_DTYPE_COMPILE_RMSNORM='sometimes'.*'auto'"):
        norm_mod._compile_default()


def test_auto_mode_compiles_only_for_accelerator_inputs():
    norm = Float32RMSNorm(4)
    norm.compile_forward = None
    assert not norm._use_compiled(torch.ones(1, 4))
    assert not norm._use_compiled(torch.ones(1, 4, device="meta"))
    norm.compile_forward = True
    assert norm._use_compiled(torch.ones(1, 4))
    assert not norm._use_compiled(torch.ones(1, 4, device="meta"))


def test_module_routes_to_the_compiled_function_when_enabled(monkeypatch):
    seen = []

    def spy(*args):
        seen.append(args)
        return _rms_norm_fp32(*args)

    monkeypatch.setattr(norm_mod, "_compiled_rms_norm", spy)
    norm = Float32RMSNorm(4, dtype=torch.float32)
    norm(torch.ones(1, 4))
    assert seen == []  # eager by default in these tests
    norm.compile_forward = True
    out = norm(torch.ones(1, 4))
    assert len(seen) == 1 and torch.equal(out, torch.ones(1, 4) / (1 + 1e-5) ** 0.5)


def _failing_compile(calls):
    def fake_compile(fn, **kwargs):
        calls.append(kwargs)

        def broken(*args):
            raise RuntimeError("no C++ compiler\nmore detail")

        return broken

    return fake_compile


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(torch, "compile", _failing_compile(calls))
    lazy = _LazyCompiled(_rms_norm_fp32)
    assert lazy.compiled is None  # nothing compiled before the first call
    x, w = torch.randn(3, 8), torch.rand(8)
    with caplog.at_level(logging.WARNING, logger="am_dtype.norm"):
        for _ in range(3):
            torch.testing.assert_close(lazy(x, w, 1e-5), _rms_norm_fp32(x, w, 1e-5))
    assert len(calls) == 1 and lazy.failed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler" in warnings[0].getMessage()


def test_input_errors_propagate_and_keep_the_compiled_path(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile([]))
    lazy = _LazyCompiled(_rms_norm_fp32)
    with pytest.raises(RuntimeError, match="size"):
        lazy(torch.randn(3, 8), torch.rand(5), 1e-5)
    assert not lazy.failed


def test_inside_an_outer_compile_the_eager_body_is_used(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile([]))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    lazy = _LazyCompiled(_rms_norm_fp32)
    lazy(torch.randn(2, 4), torch.ones(4), 1e-5)
    assert lazy.compiled is None and not lazy.failed


@pytest.mark.slow
def test_compiled_forward_runs_on_cpu_and_matches_eager():
    # One real torch.compile (about 10-20 s on a busy 2-core CPU).
    norm = _norm(32, torch.float32, seed=2)
    norm.compile_forward = True
    x = torch.randn(2, 3, 32, requires_grad=True)
    out = norm(x)
    assert norm_mod._compiled_rms_norm.compiled is not None
    assert not norm_mod._compiled_rms_norm.failed, "compilation fell back to eager"
    out.sum().backward()
    x_ref = x.detach().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    ref = _rms_norm_fp32(x_ref, w_ref, norm.eps)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
