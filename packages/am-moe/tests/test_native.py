"""The fused C activation kernels and row gather (`am_moe.experts.native`): numerics against
float64 autograd and index_select, argument checks, their use by `GroupedExperts`
(`cpu_kernels`), and the build: cache reuse, a damaged cached library, a compiler that is
missing or fails, and a library whose numbers are wrong (the self-test must refuse it).

Tolerance: fp32 kernels against float64 autograd, 2e-6 of the largest entry (the exponential
polynomial and the fp32 products round at ~1e-7; the backward's row sums have <= 512 terms;
at least 2e-9: in the clamped tails the kernels give ~1e-36 where float64 gives 0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _am_moe_test_config import small_moe_config

from am_dtype.backend import BackendConfig
from am_moe.experts import GroupedExperts, native

# The compiler the kernels are built with (`native._compiler`): $CC, default "cc".
HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on PATH")


@pytest.fixture
def fresh_state():
    """Forget the process's loaded kernels before and after (tests change CC / the cache)."""
    native._reset()
    yield
    native._reset()


@pytest.fixture
def kernels():
    lib = native.library()
    if lib is None:
        if HAVE_CC:  # with a compiler they must build and pass their self-test
            pytest.fail(f"native kernels unavailable: {native.build_error()}")
        pytest.skip(f"native kernels unavailable here: {native.build_error()}")
    return lib


def _reference(name, h, w, grad_a):
    """act(h) * w and its gradients by autograd in float64."""
    h = h.double().requires_grad_(True)
    w = w.double().requires_grad_(True)
    f = grad_a.shape[1]
    if name == "geglu":
        a = F.gelu(h[:, :f], approximate="tanh") * h[:, f:]
    else:
        a = torch.square(F.relu(h))
    out = a * w[:, None]
    out.backward(grad_a.double())
    return out.detach(), h.grad, w.grad


def _close(got, want, what):
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * scale, msg=what)


@needs_cc
@pytest.mark.parametrize("name", ["geglu", "relu2"])
@pytest.mark.parametrize("rows,f", [(1, 1), (7, 37), (64, 512)])
def test_kernels_match_float64_autograd(kernels, name, rows, f):
    """Forward, grad_h and the routing weight's gradient, at widths that are and are not a
    multiple of the vector length, with values in the exponential's clamped tails."""
    g = torch.Generator().manual_seed(rows * 1000 + f)
    width = 2 * f if name == "geglu" else f
    h = torch.randn(rows, width, generator=g) * 3
    h[0, : min(width, 4)] = torch.tensor([-90.0, -15.0, 15.0, 90.0])[: min(width, 4)]
    w = torch.rand(rows, generator=g)
    grad_a = torch.randn(rows, f, generator=g)
    want_a, want_gh, want_gw = _reference(name, h, w, grad_a)
    a = kernels.forward(name, h, w, torch.empty(rows, f))
    grad_h, grad_w = torch.empty(rows, width), torch.empty(rows)
    kernels.backward(name, h, w, grad_a, grad_h, grad_w)
    _close(a, want_a, "forward")
    _close(grad_h, want_gh, "grad_h")
    _close(grad_w, want_gw, "grad_w")
    # The backward's optional weighted activation (the same pass over h): equal to the
    # forward's, and asking for it changes nothing else.
    scaled, grad_h3, grad_w3 = torch.empty(rows, f), torch.empty(rows, width), torch.empty(rows)
    kernels.backward(name, h, w, grad_a, grad_h3, grad_w3, scaled)
    _close(scaled, want_a, "backward's weighted activation")
    assert torch.equal(grad_h3, grad_h) and torch.equal(grad_w3, grad_w)
    # No weight: the weight is 1; no grad_w: the rest is unchanged.
    ones_a, ones_gh, _ = _reference(name, h, torch.ones(rows), grad_a)
    _close(kernels.forward(name, h, None, torch.empty(rows, f)), ones_a, "forward, w=None")
    grad_h2 = torch.empty(rows, width)
    kernels.backward(name, h, None, grad_a, grad_h2, None)
    _close(grad_h2, ones_gh, "grad_h, w=None")


@needs_cc
def test_kernels_read_strided_row_blocks(kernels):
    """Row blocks of larger buffers (the loop's workspace slices): leading strides honoured."""
    big = torch.randn(10, 40)
    h = big[2:6, :32]  # rows 40 floats apart, 2 x 16 columns
    out_big = torch.full((10, 24), 7.0)
    out = out_big[3:7, :16]
    kernels.forward("geglu", h, None, out)
    want, _, _ = _reference("geglu", h, torch.ones(4), torch.ones(4, 16))
    _close(out, want, "strided forward")
    assert torch.all(out_big[:3] == 7) and torch.all(out_big[3:7, 16:] == 7)


@needs_cc
@pytest.mark.parametrize("width", [1, 16, 37, 1024])
def test_gather_rows_equals_index_select(kernels, width):
    """Bit-identical to index_select: streamed (64-byte aligned rows, whole vectors) and
    copied (ragged widths, unaligned rows) parts, repeated and unsorted indices, a source
    that is a row block of a larger buffer and a destination with a leading stride."""
    g = torch.Generator().manual_seed(width)
    big = torch.randn(12, width + 5, generator=g)
    src = big[1:11, :width]  # rows width + 5 floats apart
    idx = torch.randint(0, 10, (33,), generator=g)
    idx[:3] = torch.tensor([9, 9, 0])
    out_big = torch.full((40, width + 3), 7.0)
    out = kernels.gather_rows(src, idx, out_big[2:35, :width])
    assert torch.equal(out, src.index_select(0, idx))
    assert torch.all(out_big[:2] == 7) and torch.all(out_big[35:] == 7)
    assert torch.all(out_big[:, width:] == 7)
    # No rows, and a contiguous destination of the aligned kind the loop hands it.
    assert kernels.gather_rows(src, idx[:0], torch.empty(0, width)).shape == (0, width)
    dense = kernels.gather_rows(src.contiguous(), idx, torch.empty(33, width))
    assert torch.equal(dense, src.index_select(0, idx))


@needs_cc
def test_gather_rows_refuses_bad_indices_and_tensors(kernels):
    src, out = torch.randn(5, 8), torch.empty(3, 8)
    with pytest.raises(IndexError, match=r"idx\[1\] = 5 is outside the 5 source rows"):
        kernels.gather_rows(src, torch.tensor([0, 5, 1]), out)
    with pytest.raises(IndexError, match=r"idx\[2\] = -1"):
        kernels.gather_rows(src, torch.tensor([0, 1, -1]), out)
    with pytest.raises(ValueError, match="idx must be a contiguous int64"):
        kernels.gather_rows(src, torch.tensor([0, 1, 2], dtype=torch.int32), out)
    with pytest.raises(ValueError, match=r"out must be fp32 CPU \[3, 8\]"):
        kernels.gather_rows(src, torch.tensor([0, 1, 2]), torch.empty(3, 7))
    with pytest.raises(ValueError, match="src must be fp32 CPU"):
        kernels.gather_rows(src.double(), torch.tensor([0, 1, 2]), out)


@needs_cc
def test_kernels_refuse_what_they_cannot_read(kernels):
    h = torch.randn(4, 16)
    with pytest.raises(ValueError, match="fp32 CPU"):
        kernels.forward("geglu", h.double(), None, torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unit column stride"):
        kernels.forward("relu2", torch.randn(8, 4).t(), None, torch.empty(4, 8))
    with pytest.raises(ValueError, match=r"h must be fp32 CPU \[4, 18\].*\(4, 16\)"):
        kernels.forward("geglu", h, None, torch.empty(4, 9))  # out's width says f = 9
    with pytest.raises(ValueError, match="w_B"):
        kernels.forward("geglu", h, torch.rand(3), torch.empty(4, 8))
    with pytest.raises(ValueError, match="no native kernel for activation='swiglu'"):
        kernels.forward("swiglu", h, None, torch.empty(4, 8))
    grad_a, grad_h = torch.randn(4, 8), torch.empty(4, 16)
    with pytest.raises(ValueError, match=r"scaled must be fp32 CPU \[4, 8\].*\(4, 7\)"):
        kernels.backward("geglu", h, None, grad_a, grad_h, None, torch.empty(4, 7))


def _experts(activation, cpu_kernels, cpu_gemm="torch"):
    config = small_moe_config(
        n_routed_experts=4, n_activated_experts=2, dim=32, inter_dim=32, moe_inter_dim=24,
        norm_topk_prob=False, expert_bias=True, expert_activation=activation,
    )  # fmt: skip
    torch.manual_seed(0)
    module = GroupedExperts(config, BackendConfig(experts="torch_mm", cpu_gemm=cpu_gemm))
    module.init_weights(torch.device("cpu"), init_std=0.3)
    with torch.no_grad():
        module.gate_up_proj_bias.normal_(0, 0.3)
        module.down_proj_bias.normal_(0, 0.3)
    module.cpu_layout = "per_expert"
    module.cpu_kernels = cpu_kernels
    return module


def _run(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 32, generator=g).requires_grad_(True)
    logits = torch.randn(40, 4, generator=g)
    top = logits.topk(2, dim=-1)
    weights = top.values.softmax(-1).requires_grad_(True)
    y = module(x, torch.ones(40, dtype=torch.bool), weights, top.indices)
    (y * torch.linspace(-1, 1, 32)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), x.grad, weights.grad, grads


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = []
        for method in ("forward", "backward", "gather_rows"):
            real = getattr(native.NativeKernels, method)

            def spy(obj, first, *args, _real=real, _method=method):
                # (method, activation name); the gather takes no name.
                self.calls.append((_method, first if isinstance(first, str) else None))
                return _real(obj, first, *args)

            monkeypatch.setattr(native.NativeKernels, method, spy)


@needs_cc
@pytest.mark.parametrize("activation", ["geglu", "relu2"])
@pytest.mark.parametrize("cpu_gemm", ["torch", "auto"])
def test_grouped_experts_on_native_kernels_equal_the_aten_path(
    kernels, monkeypatch, activation, cpu_gemm
):
    """cpu_kernels "auto" runs the kernels (both directions, seen by a spy) and gives the
    ATen path's output and every gradient (input, routing weights, weights, biases) to
    rounding; "torch" never calls them."""
    spy = _Spy(monkeypatch)
    y_t, gx_t, gw_t, gp_t = _run(_experts(activation, "torch", cpu_gemm))
    assert spy.calls == []
    y_n, gx_n, gw_n, gp_n = _run(_experts(activation, "auto", cpu_gemm))
    assert ("forward", activation) in spy.calls and ("backward", activation) in spy.calls
    # The routed rows of x (forward, backward) and of the upstream gradient.
    assert spy.calls.count(("gather_rows", None)) == 3
    pairs = [(y_n, y_t, "output"), (gx_n, gx_t, "grad x"), (gw_n, gw_t, "grad weights")]
    pairs += [(gp_n[name], grad, name) for name, grad in gp_t.items()]
    for got, want, what in pairs:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=what)


@needs_cc
def test_column_strided_tokens_take_the_aten_gather(kernels):
    """Tokens whose rows are not contiguous (x.t() of a [D, T] buffer) are gathered by
    index_select, with the same results as the all-ATen path."""
    g = torch.Generator().manual_seed(5)
    x_dt = torch.randn(32, 40, generator=g)
    logits = torch.randn(40, 4, generator=g)
    top = logits.topk(2, dim=-1)
    outs = []
    for choice in ("auto", "torch"):
        module = _experts("geglu", choice)
        x = x_dt.clone().t().requires_grad_(True)  # stride (1, 40)
        weights = top.values.softmax(-1).requires_grad_(True)
        y = module(x, torch.ones(40, dtype=torch.bool), weights, top.indices)
        y.sum().backward()
        outs.append((y.detach(), x.grad, weights.grad))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@needs_cc
def test_native_only_where_it_applies(kernels, monkeypatch):
    """swiglu (no kernel), float64 and other layouts stay on ATen ops even under "native"."""
    spy = _Spy(monkeypatch)
    _run(_experts("swiglu", "native"))
    module = _experts("geglu", "native")
    module.cpu_layout = "grouped"
    _run(module)
    assert spy.calls == []
    for dtype in (torch.float64, torch.bfloat16):
        assert not native.native_applies("native", "geglu", dtype, torch.device("cpu"))
    assert not native.native_applies("native", "geglu", torch.float32, torch.device("meta"))
    assert native.native_applies("native", "geglu", torch.float32, torch.device("cpu"))


def test_unknown_cpu_kernels_name_is_refused():
    module = _experts("geglu", "fast")
    with pytest.raises(ValueError, match=r"cpu_kernels='fast'.*\['auto', 'native', 'torch'\]"):
        _run(module)
    module = _experts("geglu", "fast")
    module.cpu_layout = "padded"  # refused whatever the layout
    with pytest.raises(ValueError, match="cpu_kernels='fast'"):
        _run(module)


def test_no_compiler_falls_back_under_auto_and_is_an_error_under_native(
    fresh_state, monkeypatch, tmp_path
):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("AM_KERNEL_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    assert "no C compiler" in native.build_error() and "no-such-cc" in native.build_error()
    y_auto, *_ = _run(_experts("geglu", "auto"))
    y_torch, *_ = _run(_experts("geglu", "torch"))
    torch.testing.assert_close(y_auto, y_torch, rtol=0, atol=0)  # the same ATen path
    with pytest.raises(RuntimeError, match="cpu_kernels='native'.*no C compiler"):
        _run(_experts("geglu", "native"))


@needs_cc
def test_built_once_then_loaded_from_the_cache_and_rebuilt_when_damaged(
    fresh_state, monkeypatch, tmp_path
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AM_KERNEL_CACHE", str(cache))
    builds = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            builds.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    first = native.library()
    assert first is not None and len(builds) == 1
    (built,) = cache.glob("*.so")
    assert first.path == built and not list(cache.glob(".*.tmp"))
    native._reset()
    assert native.library() is not None and len(builds) == 1  # loaded, not rebuilt
    # A damaged file under the name this build expects (never loaded by this process:
    # the loader would hand back the mapped library for a path it already opened).
    damaged = tmp_path / "other-cache"
    damaged.mkdir()
    (damaged / built.name).write_bytes(b"not a shared library")
    monkeypatch.setenv("AM_KERNEL_CACHE", str(damaged))
    native._reset()
    again = native.library()
    assert again is not None and len(builds) == 2, native.build_error()
    assert again.path == damaged / built.name
    assert again.path.stat().st_size == built.stat().st_size
    assert not list(damaged.glob(".*.tmp"))


@needs_cc
def test_a_compile_error_is_reported_with_the_compilers_message(fresh_state, monkeypatch, tmp_path):
    bad = tmp_path / "_native_kernels.c"
    bad.write_text("int am_native_kernels_abi(void) { return 1 }\n")
    monkeypatch.setattr(native, "_SOURCE", bad)
    monkeypatch.setenv("AM_KERNEL_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    assert "failed on _native_kernels.c" in native.build_error()
    assert "error" in native.build_error()  # the compiler's own diagnostic
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


@needs_cc
def test_a_library_with_wrong_numbers_is_refused_by_the_self_test(
    fresh_state, monkeypatch, tmp_path
):
    """A kernel 1% off (as a miscompile might be) must not be used: the load-time self-test
    against ATen refuses it and "auto" stays on the ATen ops."""
    source = native._SOURCE.read_text()
    marker = "o[j] = ((x * am_gelu_sigmoid(x)) * u[j]) * wr;"
    assert marker in source
    wrong = tmp_path / "_native_kernels.c"
    wrong.write_text(source.replace(marker, marker.replace("* wr;", "* wr * 1.01f;")))
    monkeypatch.setattr(native, "_SOURCE", wrong)
    monkeypatch.setenv("AM_KERNEL_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    assert "self-test of geglu forward failed" in native.build_error()
    y_auto, *_ = _run(_experts("geglu", "auto"))
    y_torch, *_ = _run(_experts("geglu", "torch"))
    torch.testing.assert_close(y_auto, y_torch, rtol=0, atol=0)


@needs_cc
def test_an_unwritable_default_cache_falls_back_to_a_temporary_directory(
    fresh_state, monkeypatch, tmp_path
):
    """A read-only home must not turn the kernels off: the build goes to a per-user temporary
    directory. An explicit $AM_KERNEL_CACHE that cannot be written is reported instead."""
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.delenv("AM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # mkdir under a file fails
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = native.library()
    assert lib is not None, native.build_error()
    assert lib.path.parent.parent == tmp_path / "tmp"
    native._reset()
    monkeypatch.setenv("AM_KERNEL_CACHE", str(blocked / "kernels"))
    assert native.library() is None
    assert "no writable kernel cache" in native.build_error()
    assert "AM_KERNEL_CACHE" in native.build_error()


@needs_cc
def test_processes_building_at_once_all_load_a_complete_library(tmp_path):
    """Ranks of one job starting together on an empty cache: each builds into its own
    temporary file and renames it into place, so every process loads a whole library (none
    reads another's half-written file) and no temporary file is left."""
    code = (
        "from am_moe.experts import native\n"
        "lib = native.library()\n"
        "assert lib is not None, native.build_error()\n"
        "print(lib.path)\n"
    )
    env = {**os.environ, "AM_KERNEL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert len({out.strip() for out, _ in outs}) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob(".*"))
