"""Test settings for am-pp: tiny models, one intra-op thread (the CPU is shared)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny-model ops are dominated by OpenMP thread wake-ups on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
