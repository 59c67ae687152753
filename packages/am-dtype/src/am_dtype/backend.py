"""Backend selection for model components.

`BackendConfig` names, per component, which implementation a model builds:
attention kernel, linear layers, RMSNorm, MoE experts and the expert-parallel
token dispatcher. Defaults follow what is installed (Transformer Engine,
DeepEP, grouped_gemm, UCCL-EP) and whether CUDA is present, so the same
config object works on a laptop CPU and on a GPU cluster. Optional packages
are detected with `importlib.util.find_spec` and never imported here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from am_dtype import fp8 as _fp8

# Re-exported here; `_REQUIREMENTS` reads them by name when a config is built.
from am_dtype.availability import HAVE_DEEP_EP, HAVE_GMM, HAVE_TE, HAVE_UCCL_EP  # noqa: F401
from am_dtype.cpu_gemm import CPU_GEMM_CHOICES, CpuGemmLinear, check_cpu_gemm
from am_dtype.dtypes import resolve_dtype
from am_dtype.fp8 import TEFp8Config
from am_dtype.validation import check_bool, check_float, check_int

logger = logging.getLogger(__name__)

_CUDA = torch.cuda.is_available()

ATTN_CHOICES = ("te", "sdpa", "flex", "eager", "tilelang")
LINEAR_CHOICES = ("torch", "te")
RMS_NORM_CHOICES = ("torch", "torch_fp32", "te")
EXPERTS_CHOICES = ("torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8")
DISPATCHER_CHOICES = ("torch", "deepep", "hybridep", "uccl_ep")

# How to get the GPU libraries that have no PyPI wheel (they are built against the local
# CUDA toolkit), for the errors that name them.
_DEEP_EP_SOURCE = (
    "build DeepEP from source (https://github.com/deepseek-ai/DeepEP; needs CUDA and NVSHMEM)"
)
_TE_INSTALL = "install it with `pip install 'am-dtype[te]'`"
_UCCL_SOURCE = "build UCCL-EP from source (https://github.com/uccl-project/uccl, ep/ directory)"

# Which optional package each backend choice needs: the module-level flag that says whether it
# is installed (read when a config is built, so tests can stand in for a package), the
# package, and how to get it (for the error).
_REQUIREMENTS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("attn", "te"): ("HAVE_TE", "transformer_engine", _TE_INSTALL),
    ("linear", "te"): ("HAVE_TE", "transformer_engine", _TE_INSTALL),
    ("rms_norm", "te"): ("HAVE_TE", "transformer_engine", _TE_INSTALL),
    ("experts", "gmm"): ("HAVE_GMM", "grouped_gemm", "install it with `pip install 'am-moe[gmm]'`"),
    ("dispatcher", "deepep"): ("HAVE_DEEP_EP", "deep_ep", _DEEP_EP_SOURCE),
    ("dispatcher", "hybridep"): ("HAVE_DEEP_EP", "deep_ep", _DEEP_EP_SOURCE),
    ("dispatcher", "uccl_ep"): ("HAVE_UCCL_EP", "uccl", _UCCL_SOURCE),
}

# Choices the seed pages name that no am component can run, with why and what to use instead;
# rejected at construction rather than failing (or silently running something else) later.
_NOT_IMPLEMENTED: dict[tuple[str, str], str] = {
    ("attn", "tilelang"): (
        "no am model has a TileLang attention kernel; use attn='te' (Transformer Engine, GPU), "
        "'flex', 'sdpa' or 'eager'"
    ),
    ("experts", "te"): (
        "Transformer Engine's GroupedLinear keeps one weight per expert, while am-moe keeps "
        "them stacked ([E, D, F], sharded over experts under EP); use experts='torch_mm' "
        "(torch._grouped_mm: cuBLAS grouped GEMM on GPU) or 'gmm' (grouped_gemm)"
    ),
    ("experts", "torch_mm_mxfp8"): (
        "am-moe has no MXFP8 grouped GEMM; use experts='torch_mm' (bf16 grouped GEMM), and "
        "te_fp8=TEFp8Config('mxfp8') with linear='te' for FP8 dense layers"
    ),
}


_OWNER = "BackendConfig"
_BOOL_FIELDS = (
    "rope_fusion",
    "dispatcher_share_token_dispatcher",
    "dispatcher_async_dispatch",
    "fake_balanced_gate",
    "enable_hf_state_dict_adapter",
    "enable_fsdp_optimizations",
    "compile_attn",
)
_CHOICE_FIELDS = {
    "attn": ATTN_CHOICES,
    "linear": LINEAR_CHOICES,
    "rms_norm": RMS_NORM_CHOICES,
    "experts": EXPERTS_CHOICES,
    "dispatcher": DISPATCHER_CHOICES,
    "cpu_gemm": CPU_GEMM_CHOICES,
}


def _default_experts() -> str:
    if _CUDA:
        return "torch_mm"
    # torch._grouped_mm runs on CPU in recent torch and is faster than a per-expert
    # loop for forward+backward; older torch only has the loop.
    return "torch_mm" if hasattr(torch, "_grouped_mm") else "torch"


@dataclass
class BackendConfig:
    """Backend configuration for model components.

    Every field is checked at construction (types, ranges, names, installed packages); a
    choice no am component can run is rejected there with the reason and what to use
    instead, never accepted to fail (or silently run something else) later.

    - `attn`, `linear`, `rms_norm`: kernels the model builds ("tilelang" is rejected).
    - `rope_fusion`: rotary embeddings through Transformer Engine's fused kernel in
      `am_utils.rope.apply_rotary_pos_emb` (models with RoPE pass it as `fused=`); True
      needs TE and CUDA. Models without RoPE (Nemotron-H) have nothing to fuse.
    - `experts`: routed-expert kernel ("torch", "torch_mm", "gmm"; "te" and
      "torch_mm_mxfp8" are rejected).
    - `dispatcher`, `dispatcher_num_sms`, `dispatcher_share_token_dispatcher`: the
      expert-parallel token dispatcher, the SMs of its kernels, one buffer per EP group.
    - `dispatcher_async_dispatch`: start the token all-to-all, run the shared experts while
      it is in flight, then wait ("torch" dispatcher only).
    - `enable_deepep`: legacy switch for `dispatcher` (True -> "deepep", False -> "torch").
    - `fake_balanced_gate`, `fake_gate_noise`: a balanced stand-in router (benchmarks).
    - `enable_hf_state_dict_adapter`, `enable_fsdp_optimizations`: checkpoint conversion
      and deferred FSDP gradient sync (`MoEFSDPSyncMixin`).
    - `te_fp8`: run the model's forward under TE's FP8 autocast with this recipe
      (`am_dtype.fp8.fp8_autocast`); needs TE and `linear="te"`.
    - `gate_precision`: router math dtype (a dtype or a string such as "float32").
    - `compile_attn`: `torch.compile` the attention kernel.
    - `cpu_gemm`: the fp32 CPU GEMM of `linear="torch"` layers and of the routed experts'
      CPU path: "torch" (MKL), "onednn", or "auto" (oneDNN where MKL lacks this CPU's
      AVX-512 kernels; see `am_dtype.cpu_gemm`). No effect on CUDA or in bf16.
    """

    attn: Literal["te", "sdpa", "flex", "eager", "tilelang"] = "te" if HAVE_TE and _CUDA else "sdpa"
    linear: Literal["torch", "te"] = "te" if HAVE_TE and _CUDA else "torch"
    rms_norm: Literal["torch", "torch_fp32", "te"] = "torch_fp32"
    rope_fusion: bool = HAVE_TE and _CUDA
    experts: Literal["torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8"] = _default_experts()
    dispatcher: Literal["torch", "deepep", "hybridep", "uccl_ep"] = (
        "deepep" if HAVE_DEEP_EP and _CUDA else "torch"
    )
    dispatcher_num_sms: int = 20
    dispatcher_share_token_dispatcher: bool = True
    dispatcher_async_dispatch: bool = False
    enable_deepep: bool | None = None
    fake_balanced_gate: bool = False
    fake_gate_noise: float = 0.0
    enable_hf_state_dict_adapter: bool = True
    enable_fsdp_optimizations: bool = False
    te_fp8: TEFp8Config | None = None
    gate_precision: str | torch.dtype | None = None
    compile_attn: bool = False
    cpu_gemm: Literal["auto", "torch", "onednn"] = "auto"

    def __post_init__(self) -> None:
        if self.enable_deepep is not None:
            check_bool(_OWNER, "enable_deepep", self.enable_deepep)
            self._apply_legacy_enable_deepep()
        for field_name, choices in _CHOICE_FIELDS.items():
            self._check_choice(field_name, choices)
        for name in _BOOL_FIELDS:
            check_bool(_OWNER, name, getattr(self, name))
        check_int(_OWNER, "dispatcher_num_sms", self.dispatcher_num_sms, low=1)
        self.fake_gate_noise = check_float(_OWNER, "fake_gate_noise", self.fake_gate_noise, low=0)
        self.gate_precision = resolve_dtype(self.gate_precision, name=f"{_OWNER}.gate_precision")
        self._check_rope_fusion()
        self._check_async_dispatch()
        self._check_te_fp8()
        if self.cpu_gemm == "onednn":
            check_cpu_gemm(self.cpu_gemm)
        if self.compile_attn and self.attn == "te":
            raise ValueError(
                "BackendConfig.compile_attn=True cannot be combined with attn='te': Transformer "
                "Engine's attention is already a fused CUDA kernel that torch.compile does not "
                "trace; set compile_attn=False or choose attn='sdpa', 'flex' or 'eager'"
            )

    def _check_choice(self, field_name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, field_name)
        if not isinstance(value, str) or value not in choices:
            raise ValueError(
                f"{_OWNER}.{field_name}={value!r} is not supported; accepted: {list(choices)}"
            )
        reason = _NOT_IMPLEMENTED.get((field_name, value))
        if reason is not None:
            raise ValueError(f"{_OWNER}.{field_name}={value!r} is not available: {reason}")
        requirement = _REQUIREMENTS.get((field_name, value))
        if requirement is not None and not globals()[requirement[0]]:
            _, package, how = requirement
            raise ImportError(
                f"{_OWNER}.{field_name}={value!r} needs the '{package}' package, which is not "
                f"installed; {how}, or choose another {field_name}"
            )

    def _check_rope_fusion(self) -> None:
        # Read at call time (not the import-time default) so tests can stand in for TE/CUDA.
        if self.rope_fusion and not (HAVE_TE and _CUDA):
            missing = "Transformer Engine" if not HAVE_TE else "a CUDA device"
            raise ValueError(
                f"{_OWNER}.rope_fusion=True runs Transformer Engine's fused RoPE CUDA kernel, "
                f"but {missing} is not available here; set rope_fusion=False (the PyTorch "
                "rotary math, the same numbers)"
            )

    def _check_async_dispatch(self) -> None:
        if self.dispatcher_async_dispatch and self.dispatcher != "torch":
            raise ValueError(
                f"{_OWNER}.dispatcher_async_dispatch=True overlaps the torch all-to-all with "
                f"the shared experts; it is not implemented for dispatcher={self.dispatcher!r} "
                "(use dispatcher='torch' or dispatcher_async_dispatch=False)"
            )

    def _check_te_fp8(self) -> None:
        if self.te_fp8 is None:
            return
        if not isinstance(self.te_fp8, TEFp8Config):
            raise TypeError(
                f"{_OWNER}.te_fp8={self.te_fp8!r} must be a TEFp8Config (e.g. "
                "TEFp8Config('current')) or None"
            )
        if not HAVE_TE:
            raise ImportError(
                f"{_OWNER}.te_fp8 enables Transformer Engine FP8, but 'transformer_engine' is "
                f"not installed; {_TE_INSTALL}, or set te_fp8=None"
            )
        if self.linear != "te":
            raise ValueError(
                f"{_OWNER}.te_fp8 quantizes the matmuls of Transformer Engine modules, but "
                f"linear={self.linear!r} builds none, so nothing would run in FP8; set "
                "linear='te' or te_fp8=None"
            )

    def _apply_legacy_enable_deepep(self) -> None:
        # True selects DeepEP unless a DeepEP-based dispatcher (deepep, hybridep) is already
        # chosen; False turns a DeepEP-based dispatcher back into the torch one.
        deepep_based = self.dispatcher in ("deepep", "hybridep")
        if self.enable_deepep and not deepep_based:
            self.dispatcher = "deepep"
        elif not self.enable_deepep and deepep_based:
            self.dispatcher = "torch"
        warnings.warn(
            f"BackendConfig.enable_deepep is deprecated; use dispatcher={self.dispatcher!r}",
            DeprecationWarning,
            stacklevel=4,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (dtype as its string name), for logging and recipes."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(out["gate_precision"], torch.dtype):
            out["gate_precision"] = str(out["gate_precision"]).removeprefix("torch.")
        return out


def initialize_linear_module(
    linear_impl: str,
    in_features: int,
    out_features: int,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    cpu_gemm: str = "auto",
) -> torch.nn.Module:
    """Build a linear layer with the named backend ("torch" or "te").

    "torch" builds an `nn.Linear` (a `CpuGemmLinear`: same parameters and state dict) whose
    fp32 CPU GEMMs run on the kernel `cpu_gemm` names (`BackendConfig.cpu_gemm`); a TE module
    created on the meta device is materialized by its `reset_parameters()`.
    """
    if linear_impl == "torch":
        return CpuGemmLinear(
            in_features, out_features, bias=bias, device=device, dtype=dtype, cpu_gemm=cpu_gemm
        )
    if linear_impl == "te":
        if not HAVE_TE:
            raise ImportError(f"linear_impl='te' needs transformer_engine; {_TE_INSTALL}")
        import transformer_engine.pytorch as te

        _fp8._patch_te_modules()
        return te.Linear(in_features, out_features, bias=bias, device=device, params_dtype=dtype)
    raise ValueError(
        f"linear_impl={linear_impl!r} is not supported; accepted: {list(LINEAR_CHOICES)}"
    )


def initialize_rms_norm_module(
    rms_norm_impl: str,
    dim: int,
    eps: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """Build an RMSNorm with the named backend.

    "torch" is `nn.RMSNorm` (math in the input dtype), "torch_fp32" is
    `Float32RMSNorm` (math in fp32, output in the input dtype), "te" is
    Transformer Engine's fused kernel.
    """
    if rms_norm_impl == "torch":
        return torch.nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if rms_norm_impl == "torch_fp32":
        from am_dtype.norm import Float32RMSNorm

        return Float32RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if rms_norm_impl == "te":
        if not HAVE_TE:
            raise ImportError(f"rms_norm_impl='te' needs transformer_engine; {_TE_INSTALL}")
        import transformer_engine.pytorch as te

        _fp8._patch_te_modules()
        return te.RMSNorm(dim, eps=eps, device=device, params_dtype=dtype)
    raise ValueError(
        f"rms_norm_impl={rms_norm_impl!r} is not supported; accepted: {list(RMS_NORM_CHOICES)}"
    )
