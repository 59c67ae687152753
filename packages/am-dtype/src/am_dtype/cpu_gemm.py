"""The fp32 CPU GEMM behind am's linear layers and routed experts: MKL's or oneDNN's.

torch's fp32 `mm` / `F.linear` on CPU call the BLAS torch was built with (MKL in the
official wheels). MKL runs its AVX-512 kernels on Intel CPUs only; on other x86 CPUs with
AVX-512 (AMD Zen 4/5) it takes its AVX2 kernels. oneDNN, also in the wheels, picks its
kernels by instruction set. Measured on this project's AMD EPYC (AVX-512), one thread, fp32:
2048^3 `torch.mm` 80-88 GFLOP/s, oneDNN 170-178; at the linear and expert shapes of the
Nemotron-H and Gemma 4 steps (forward, dX and dW GEMMs) 70-90 against 110-210. Both are
IEEE fp32 with fp32 accumulation (no reduced-precision mode); they differ by summation
order only (max error against float64, relative to the largest entry: ~3e-7 MKL, ~1e-6
oneDNN at K = 2048).

`CPU_GEMM_CHOICES` names the choices (`BackendConfig.cpu_gemm`):
- "torch": torch's own `mm` / `F.linear`;
- "onednn": oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, strided operands
  read in place), with the three-GEMM backward written here;
- "auto" (the default): oneDNN for fp32 on a non-Intel CPU with AVX-512, torch otherwise.
  The rule is fixed by the CPU, not timed at run time, so a machine always takes the same
  kernel and results are reproducible run to run.

oneDNN runs only where it applies: a CPU, fp32 input and weight, plain tensors (not
DTensor, fake or functional tensors), no CPU autocast, not under `torch.compile` tracing.
Everything else (CUDA, bf16, tensor-parallel layers) takes `F.linear` unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CPU_GEMM_CHOICES",
    "CpuGemmLinear",
    "cpu_linear",
    "cpu_mm",
    "onednn_available",
    "onednn_gemm",
    "resolve_cpu_gemm",
]

CPU_GEMM_CHOICES = ("auto", "torch", "onednn")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the fp32 linear op used here."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _auto_kernel() -> str:
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    # MKL's AVX-512 kernels run on Intel CPUs only; elsewhere it falls back to AVX2.
    mkl_slow = torch.backends.mkl.is_available() and _cpu_vendor() not in ("", "GenuineIntel")
    return "onednn" if avx512 and mkl_slow and onednn_available() else "torch"


def check_cpu_gemm(name: str) -> str:
    """`name` if it is one of `CPU_GEMM_CHOICES` and can run here, else a clear error."""
    if name not in CPU_GEMM_CHOICES:
        raise ValueError(f"cpu_gemm={name!r} is not supported; accepted: {list(CPU_GEMM_CHOICES)}")
    if name == "onednn" and not onednn_available():
        raise RuntimeError(
            "cpu_gemm='onednn' needs a torch build with oneDNN (torch.backends.mkldnn); "
            "use 'torch' or 'auto'"
        )
    return name


def resolve_cpu_gemm(name: str, dtype: torch.dtype) -> str:
    """The kernel `name` stands for in `dtype`: "torch" or "onednn" (fp32 only)."""
    check_cpu_gemm(name)
    if dtype != torch.float32:
        return "torch"
    return _auto_kernel() if name == "auto" else name


def onednn_gemm(x_TK: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """x @ w.T (+ b) on oneDNN's fp32 GEMM (2-D, non-empty, any strides), no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x_TK, w_NK, b_N, "none", [], "")


def cpu_mm(a: Tensor, b: Tensor, kernel: str, out: Tensor | None = None) -> Tensor:
    """`a @ b` (2-D, CPU) by the resolved `kernel` ("torch" or "onednn"), into `out` if given.

    oneDNN has no out= form: a product that must land in `out` is copied there. Empty
    operands (which oneDNN rejects) take `torch.mm`."""
    if kernel == "onednn" and a.numel() > 0 and b.numel() > 0:
        product = onednn_gemm(a, b.t())
        return product if out is None else out.copy_(product)
    return torch.mm(a, b, out=out)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_gemm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        g_TN = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_gemm(g_TN, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_gemm(g_TN.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_TN.sum(0)
        return grad_x, grad_w, grad_b


# Plain tensors only: DTensor, fake and functional tensors take `F.linear`.
_PLAIN = (Tensor, nn.Parameter)


def _onednn_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
        and x.dim() >= 2
        # oneDNN builds no primitive for an empty operand (an EP rank with no tokens).
        and x.numel() > 0
        and weight.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def cpu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, cpu_gemm: str = "auto"):
    """`F.linear(x, weight, bias)`, forward and backward on the CPU GEMM `cpu_gemm` names
    where oneDNN applies (see the module docstring), `F.linear` everywhere else."""
    if _onednn_applies(x, weight, bias) and resolve_cpu_gemm(cpu_gemm, x.dtype) == "onednn":
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class CpuGemmLinear(nn.Linear):
    """`nn.Linear` (same parameters, init and state dict) whose fp32 CPU GEMMs run on the
    kernel `cpu_gemm` names (`cpu_linear`); `F.linear` on other devices and dtypes."""

    def __init__(self, *args, cpu_gemm: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_gemm = check_cpu_gemm(cpu_gemm)

    def forward(self, input: Tensor) -> Tensor:
        return cpu_linear(input, self.weight, self.bias, self.cpu_gemm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cpu_gemm={self.cpu_gemm!r}"

    @classmethod
    def from_linear(cls, old: nn.Linear, cpu_gemm: str = "auto") -> CpuGemmLinear:
        """A `CpuGemmLinear` holding `old`'s parameters (the same tensors, so ties hold)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = old.in_features, old.out_features
        new.weight = old.weight
        new.bias = old.bias
        new.cpu_gemm = check_cpu_gemm(cpu_gemm)
        return new
