"""Sharded-model guards of am_dtype.cast, on a 1-rank gloo group in this process.

The real 2-rank FSDP2 checks are in test_distributed.py; these cover the
error paths cheaply (no spawning).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from am_dtype import cast_model_to_dtype, is_tensor_unallocated
from am_dtype.cast import _restore_fp32_tensor_snapshots, _snapshot_fp32_tensors
from am_dtype.testing import free_port


@pytest.fixture(scope="module")
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class Block(nn.Module):
    _keep_in_fp32_modules_strict = ["hc.fn"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.hc = nn.Module()
        self.hc.fn = nn.Parameter(torch.randn(4))


def test_strict_parameter_inside_a_low_precision_unit_is_refused(mesh):
    model = fully_shard(Block(), mesh=mesh)
    assert not is_tensor_unallocated(model.hc.fn)
    with pytest.raises(ValueError, match=r"strict fp32 parameter 'hc\.fn' is sharded"):
        cast_model_to_dtype(model, torch.bfloat16)


def test_strict_parameter_left_out_of_sharding_is_restored_exactly(mesh):
    block = Block()
    original = block.hc.fn.detach().clone()
    model = fully_shard(block, mesh=mesh, ignored_params={block.hc.fn})
    cast_model_to_dtype(model, torch.bfloat16)
    assert model.proj.weight.dtype == torch.bfloat16
    assert model.hc.fn.dtype == torch.float32 and torch.equal(model.hc.fn, original)


def test_snapshot_cannot_retype_a_sharded_parameter(mesh):
    model = fully_shard(Block(), mesh=mesh)
    params, buffers = _snapshot_fp32_tensors(model, ["proj"], [])
    model.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"sharded parameter 'proj\.weight'.*torch\.bfloat16"):
        _restore_fp32_tensor_snapshots(model, params, buffers)
