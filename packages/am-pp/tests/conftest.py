"""Test settings for am-pp: tiny models, one intra-op thread (the CPU is shared)."""

import datetime

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny-model ops are dominated by OpenMP thread wake-ups on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_rank_world():
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    yield
    dist.destroy_process_group()
