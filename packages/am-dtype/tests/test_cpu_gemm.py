"""am_dtype.cpu_gemm: the oneDNN fp32 linear (forward and its hand-written backward) against
float64 F.linear, the fallbacks to F.linear, the "auto" rule and the error paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from am_dtype import BackendConfig, initialize_linear_module
from am_dtype import cpu_gemm as cg
from am_dtype.cpu_gemm import CpuGemmLinear, cpu_linear, cpu_mm, resolve_cpu_gemm

needs_onednn = pytest.mark.skipif(not cg.onednn_available(), reason="torch built without oneDNN")


def _grad_fn_names(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


def _reference(x, w, b):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return y


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 48), (3, 11, 48), "strided"])
def test_onednn_linear_forward_and_gradients_equal_float64(shape, bias):
    torch.manual_seed(0)
    if shape == "strided":
        x = torch.randn(48, 60)[:, 5:53].t()  # a transposed, offset view (non-contiguous)
    else:
        x = torch.randn(*shape)
    x = x.requires_grad_()
    w = torch.randn(24, 48, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    y = cpu_linear(x, w, b, "onednn")
    assert _grad_fn_names(y).startswith("_OneDNNLinear")
    ref = _reference(x, w, b)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6)
    g = torch.randn_like(y)
    y.backward(g)
    inputs = [x, w] + ([b] if bias else [])
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref64 = F.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2] if bias else None)
    ref_grads = torch.autograd.grad(ref64, ref_inputs, g.double())
    for got, want in zip([t.grad for t in inputs], ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-6, atol=5e-6)
        assert got.dtype == torch.float32


@needs_onednn
def test_onednn_linear_gradient_to_one_side_only():
    torch.manual_seed(1)
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(8, 16)
    cpu_linear(x, w, None, "onednn").sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(9, 16))
    x2 = torch.randn(9, 16)
    w2 = torch.randn(8, 16, requires_grad=True)
    cpu_linear(x2, w2, None, "onednn").sum().backward()
    torch.testing.assert_close(w2.grad, x2.sum(0).expand(8, 16), rtol=1e-5, atol=1e-5)


def test_torch_kernel_and_non_fp32_inputs_take_f_linear():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    assert not _grad_fn_names(cpu_linear(x, w, None, "torch")).startswith("_OneDNN")
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    y = cpu_linear(xb, wb, None, "onednn" if cg.onednn_available() else "torch")
    assert y.dtype == torch.bfloat16 and not _grad_fn_names(y).startswith("_OneDNN")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_linear(x, w, None, "auto")
    assert y.dtype == torch.bfloat16 and not _grad_fn_names(y).startswith("_OneDNN")


def test_auto_picks_onednn_only_off_intel_with_avx512(monkeypatch):
    cases = {
        ("AuthenticAMD", "AVX512"): "onednn",
        ("GenuineIntel", "AVX512"): "torch",
        ("AuthenticAMD", "AVX2"): "torch",
        ("", "AVX512"): "torch",  # vendor unknown: keep torch's
    }
    for (vendor, capability), want in cases.items():
        cg._auto_kernel.cache_clear()
        monkeypatch.setattr(cg, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(cg, "onednn_available", lambda: True)
        assert resolve_cpu_gemm("auto", torch.float32) == want, (vendor, capability)
        assert resolve_cpu_gemm("auto", torch.bfloat16) == "torch"
    cg._auto_kernel.cache_clear()


def test_bad_names_and_missing_onednn_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"cpu_gemm='mkl'.*\['auto', 'torch', 'onednn'\]"):
        resolve_cpu_gemm("mkl", torch.float32)
    with pytest.raises(ValueError, match=r"BackendConfig.cpu_gemm='mkl'.*'onednn'"):
        BackendConfig(cpu_gemm="mkl")
    with pytest.raises(ValueError, match=r"cpu_gemm='fast'"):
        CpuGemmLinear(4, 4, cpu_gemm="fast")
    monkeypatch.setattr(cg, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"cpu_gemm='onednn' needs a torch build with oneDNN"):
        BackendConfig(cpu_gemm="onednn")


@needs_onednn
def test_linear_module_keeps_nn_linear_parameters_and_follows_its_kernel():
    torch.manual_seed(2)
    old = nn.Linear(16, 8)
    new = CpuGemmLinear.from_linear(old, cpu_gemm="onednn")
    assert new.weight is old.weight and new.bias is old.bias
    assert isinstance(new, nn.Linear) and list(new.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 16)
    assert _grad_fn_names(new(x)).startswith("_OneDNN")
    torch.testing.assert_close(new(x), old(x), rtol=2e-6, atol=2e-6)
    built = initialize_linear_module("torch", 16, 8, dtype=torch.float32, cpu_gemm="torch")
    assert not _grad_fn_names(built(x)).startswith("_OneDNN") and "cpu_gemm='torch'" in repr(built)


@needs_onednn
def test_cpu_mm_with_and_without_out():
    torch.manual_seed(3)
    a, b = torch.randn(7, 12), torch.randn(12, 5)
    want = a.double() @ b.double()
    for kernel in ("torch", "onednn"):
        torch.testing.assert_close(cpu_mm(a, b, kernel).double(), want, rtol=2e-6, atol=2e-6)
        out = torch.empty(7, 5)
        assert cpu_mm(a, b, kernel, out=out) is out
        torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)


@needs_onednn
def test_empty_operands_take_torch():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(0, 4, requires_grad=True)
    y = cpu_linear(x, w, None, "onednn")
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros(6, 4))
    assert cpu_mm(torch.randn(0, 4), torch.randn(4, 3), "onednn").shape == (0, 3)
    torch.testing.assert_close(
        cpu_mm(torch.randn(2, 0), torch.randn(0, 3), "onednn"), torch.zeros(2, 3)
    )
