"""Pin the public surface of am_dtype."""

import subprocess
import sys

import pytest

import am_dtype
import am_dtype.fp8

EXPECTED = {
    "DTYPE_ALIASES",
    "config_dtype",
    "enforce_strict_fp32",
    "full_tensor",
    "to_local",
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
    "cpu_linear",
    "cpu_mm",
    "Float32RMSNorm",
    "rms_norm",
    "TEFp8Config",
    "cast_frozen_modules_to_compute_dtype",
    "cast_mixed_dtype_params_to_bf16",
    "cast_model_to_dtype",
    "fp8_autocast",
    "fp8_autocast_forward",
    "get_is_first_microbatch",
    "get_is_optim_step",
    "initialize_linear_module",
    "initialize_rms_norm_module",
    "is_tensor_unallocated",
    "resolve_dtype",
    "set_is_first_microbatch",
    "set_is_optim_step",
    "yield_fp32_model",
}

# Private helpers the seed page lists; they keep their names in their modules.
PRIVATE = {
    "am_dtype.norm": ["_float32_rms_norm_fwd"],
    "am_dtype.fp8": ["_make_lazy_te_patcher", "_patch_te_modules"],
    "am_dtype.cast": [
        "_get_fp32_module_keywords",
        "_get_strict_fp32_module_keywords",
        "_restore_fp32_modules",
        "_restore_fp32_buffers",
        "_snapshot_fp32_tensors",
        "_restore_fp32_tensor_snapshots",
        "_has_dtensor_params",
    ],
}


def test_all_is_pinned_and_resolvable():
    assert set(am_dtype.__all__) == EXPECTED
    assert len(am_dtype.__all__) == len(EXPECTED)
    for name in am_dtype.__all__:
        assert getattr(am_dtype, name) is not None or name == "IS_FIRST_MICROBATCH"


def test_private_helpers_live_in_their_modules():
    import importlib

    for module, names in PRIVATE.items():
        mod = importlib.import_module(module)
        for name in names:
            assert callable(getattr(mod, name)), f"{module}.{name}"


def test_flags_are_read_live_not_copied():
    assert am_dtype.IS_OPTIM_STEP is False
    am_dtype.set_is_optim_step(True)
    assert am_dtype.IS_OPTIM_STEP is True and am_dtype.fp8.IS_OPTIM_STEP is True
    am_dtype.set_is_first_microbatch(False)
    assert am_dtype.IS_FIRST_MICROBATCH is False
    try:
        am_dtype.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("unknown attribute did not raise")


_GPU_MACHINE_SCRIPT = """
import importlib.abc, importlib.machinery, sys
# The GPU packages look installed (find_spec succeeds) but importing one fails loudly.
class Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise AssertionError('imported ' + module.__name__)
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('transformer_engine', 'deep_ep', 'grouped_gemm'):
            return importlib.machinery.ModuleSpec(name, Loader())
sys.meta_path.insert(0, Finder())
import torch
torch.cuda.is_available = lambda: True  # a GPU machine with TE and DeepEP installed
import am_dtype
from am_dtype import BackendConfig, Float32RMSNorm, TEFp8Config
import am_dtype.fp8 as fp8
cfg = BackendConfig(te_fp8=TEFp8Config('block'))
assert (cfg.attn, cfg.linear, cfg.rope_fusion) == ('te', 'te', True), cfg
assert (cfg.experts, cfg.dispatcher) == ('torch_mm', 'deepep'), cfg
fp8._make_lazy_te_patcher()
Float32RMSNorm(8, dtype=torch.float32)(torch.ones(2, 8))
assert not any(m.startswith(('transformer_engine', 'deep_ep', 'grouped_gemm')) for m in sys.modules)
assert am_dtype.HAVE_TE and am_dtype.HAVE_DEEP_EP
print('ok')
"""


@pytest.mark.slow
def test_gpu_defaults_and_no_gpu_package_import():
    env_code = "import os; os.environ['AM_DTYPE_COMPILE_RMSNORM'] = '0'\n" + _GPU_MACHINE_SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
