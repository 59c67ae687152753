"""DTensor helpers: the local shard or the full value of a tensor that may be a DTensor.

Parameters become DTensors under FSDP2 and expert parallelism, and the same code
must run on plain tensors; these are the one copy of that check.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["full_tensor", "to_local"]


def to_local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (a view sharing its storage); other tensors and None pass.

    In-place writes to the result (initialization, `copy_`) change the DTensor.
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole value of a DTensor, gathered over its mesh; other tensors and None pass.

    Gathering is a collective: every rank of the DTensor's mesh must call it.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
