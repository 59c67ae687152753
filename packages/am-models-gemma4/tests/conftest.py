"""Test settings for am-models-gemma4."""

import os

import pytest
import torch

# The fp32 RMSNorm compiles itself on first use; compiling per test process costs far more
# than these tiny models' forward passes, and the eager path is the same math.
os.environ.setdefault("AM_DTYPE_COMPILE_RMSNORM", "0")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny-model ops are dominated by OpenMP thread wake-ups on a shared CPU (~100x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
