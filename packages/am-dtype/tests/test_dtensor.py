"""to_local / full_tensor on plain tensors, None, and DTensors of a one-process gloo mesh."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from am_dtype.dtensor import full_tensor, to_local


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "filestore"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_plain_tensors_and_none_pass_through():
    t = torch.arange(4.0)
    assert to_local(t) is t and full_tensor(t) is t
    assert to_local(None) is None and full_tensor(None) is None


def test_dtensor_local_shard_is_writable_and_full_value_is_gathered(mesh):
    value = torch.arange(6.0).reshape(3, 2)
    param = nn.Parameter(distribute_tensor(value.clone(), mesh, [Shard(0)]))
    local = to_local(param)
    assert not isinstance(local, DTensor) and local.shape == (3, 2)
    with torch.no_grad():  # as in init code
        local.zero_()  # in-place init through the local view changes the DTensor
    assert torch.equal(full_tensor(param), torch.zeros(3, 2))
    replicated = distribute_tensor(value, mesh, [Replicate()])
    full = full_tensor(replicated)
    assert not isinstance(full, DTensor) and torch.equal(full, value)
