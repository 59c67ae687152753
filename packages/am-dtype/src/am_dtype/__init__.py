"""Precision helpers: backend selection, fp32 RMSNorm, dtype casting that keeps fp32 modules exact, TE FP8 config.

`IS_FIRST_MICROBATCH` / `IS_OPTIM_STEP` are read live from `am_dtype.fp8`
(`am_dtype.IS_OPTIM_STEP` always shows the current value); prefer the
`get_*` / `set_*` functions. The multi-process test harness is
`am_dtype.testing.run_distributed`.
"""

from typing import Any

from am_dtype import fp8 as _fp8
from am_dtype.backend import (
    ATTN_CHOICES,
    DISPATCHER_CHOICES,
    EXPERTS_CHOICES,
    HAVE_DEEP_EP,
    HAVE_GMM,
    HAVE_TE,
    HAVE_UCCL_EP,
    LINEAR_CHOICES,
    RMS_NORM_CHOICES,
    BackendConfig,
    initialize_linear_module,
    initialize_rms_norm_module,
)
from am_dtype.cast import (
    cast_frozen_modules_to_compute_dtype,
    cast_mixed_dtype_params_to_bf16,
    cast_model_to_dtype,
    enforce_strict_fp32,
    yield_fp32_model,
)
from am_dtype.cpu_gemm import CPU_GEMM_CHOICES, CpuGemmLinear, cpu_linear, cpu_mm
from am_dtype.dtensor import full_tensor, to_local
from am_dtype.dtypes import DTYPE_ALIASES, config_dtype, resolve_dtype
from am_dtype.fp8 import (
    TEFp8Config,
    fp8_autocast,
    fp8_autocast_forward,
    get_is_first_microbatch,
    get_is_optim_step,
    is_tensor_unallocated,
    set_is_first_microbatch,
    set_is_optim_step,
)
from am_dtype.norm import Float32RMSNorm, rms_norm

_LIVE_FLAGS = ("IS_FIRST_MICROBATCH", "IS_OPTIM_STEP")


def __getattr__(name: str) -> Any:
    # The flags are rebound by the setters, so re-exporting their values would go stale.
    if name in _LIVE_FLAGS:
        return getattr(_fp8, name)
    raise AttributeError(f"module 'am_dtype' has no attribute {name!r}")


__all__ = [
    "ATTN_CHOICES",
    "DISPATCHER_CHOICES",
    "EXPERTS_CHOICES",
    "HAVE_DEEP_EP",
    "HAVE_GMM",
    "HAVE_TE",
    "HAVE_UCCL_EP",
    "IS_FIRST_MICROBATCH",
    "IS_OPTIM_STEP",
    "LINEAR_CHOICES",
    "RMS_NORM_CHOICES",
    "BackendConfig",
    "CPU_GEMM_CHOICES",
    "CpuGemmLinear",
    "DTYPE_ALIASES",
    "Float32RMSNorm",
    "TEFp8Config",
    "cast_frozen_modules_to_compute_dtype",
    "cast_mixed_dtype_params_to_bf16",
    "cast_model_to_dtype",
    "config_dtype",
    "cpu_linear",
    "cpu_mm",
    "enforce_strict_fp32",
    "full_tensor",
    "fp8_autocast",
    "fp8_autocast_forward",
    "rms_norm",
    "get_is_first_microbatch",
    "get_is_optim_step",
    "initialize_linear_module",
    "initialize_rms_norm_module",
    "is_tensor_unallocated",
    "resolve_dtype",
    "set_is_first_microbatch",
    "set_is_optim_step",
    "to_local",
    "yield_fp32_model",
]
