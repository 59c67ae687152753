"""The fp32 CPU matmul the expert-by-expert loop (`blocks`) runs: torch.mm or oneDNN's.

`torch.mm` in fp32 on CPU is the BLAS torch was built with (MKL in the official wheels).
MKL runs its AVX-512 kernels on Intel CPUs only; on other x86 CPUs with AVX-512 (AMD Zen 4/5)
it runs AVX2 kernels, while oneDNN (also in the wheels) picks its kernels by instruction set
and runs AVX-512 ones. Measured on this project's 2-core AMD EPYC (family 26, AVX-512), one
thread, fp32, CPU seconds: 2048^3 `torch.mm` 80-88 GFLOP/s, oneDNN 170-178; the experts'
per-expert shapes (512 x 1024 x 1024 and 128 x 512 x 256, all three of x @ w, g @ w^T and
x^T @ g) 70-90 against 110-175. Both are IEEE fp32 (no reduced-precision mode): against a
float64 product of 256 x 2048 x 512, max error relative to the largest entry 3e-7 (MKL) and
1e-6 (oneDNN); a bf16 product would be 2e-3.

oneDNN is reached through `torch.ops.mkldnn._linear_pointwise` (x @ W^T, the op inductor's
CPU linear fusion calls), which reads strided operands in place but has no out= form: a
product that must land in a given tensor is copied there.

`CPU_MATMULS` names the choices: "torch" (torch.mm), "onednn", and "auto" (`resolve`):
oneDNN in fp32 on a non-Intel CPU with AVX-512, else torch.mm. The rule is fixed by the CPU,
not timed at run time, so one machine always takes the same kernel (results reproducible
run to run).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__: list[str] = []  # private building blocks of the expert kernels

CPU_MATMULS = ("auto", "torch", "onednn")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the linear op used here."""
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
def _auto() -> str:
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    # MKL's AVX-512 kernels run on Intel CPUs; elsewhere it falls back to AVX2.
    mkl_slow = torch.backends.mkl.is_available() and _cpu_vendor() not in ("", "GenuineIntel")
    return "onednn" if avx512 and mkl_slow and onednn_available() else "torch"


def resolve(name: str, dtype: torch.dtype) -> str:
    """The kernel `name` stands for in `dtype`: "torch" or "onednn" (fp32 only)."""
    if name not in CPU_MATMULS:
        raise ValueError(f"cpu_matmul={name!r} is not supported; accepted: {list(CPU_MATMULS)}")
    if dtype != torch.float32:
        return "torch"
    if name == "auto":
        return _auto()
    if name == "onednn" and not onednn_available():
        raise RuntimeError(
            "cpu_matmul='onednn' needs a torch build with oneDNN (torch.backends.mkldnn); "
            "use 'torch' or 'auto'"
        )
    return name


def mm(a: Tensor, b: Tensor, kind: str, out: Tensor | None = None) -> Tensor:
    """a @ b by the kernel `kind` ("torch" or "onednn"), into `out` when given."""
    if kind == "onednn":
        product = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
        return product if out is None else out.copy_(product)
    return torch.mm(a, b, out=out)
