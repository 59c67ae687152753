"""Functions run on spawned gloo ranks by test_distributed.py.

They live in their own module (uniquely named across the workspace) so a
spawned child can import them by name whatever pytest's import mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from am_dtype import (
    cast_frozen_modules_to_compute_dtype,
    cast_model_to_dtype,
    is_tensor_unallocated,
    yield_fp32_model,
)
from am_dtype.cast import _has_dtensor_params, _restore_fp32_modules


class StrictRouter(nn.Module):
    """Router math in fp32 whatever the activations (5 rows: uneven shards over 2 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 8))
        self.register_buffer("correction_bias", torch.randn(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.weight) + self.correction_bias


class BufferedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8))
        self.register_buffer("shift", torch.randn(8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight + self.shift.to(h.dtype)


class ShardToy(nn.Module):
    _keep_in_fp32_modules = ["norm"]
    _keep_in_fp32_modules_strict = ["router"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = BufferedNorm()
        self.router = StrictRouter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(self.norm(self.proj(x)))


def _sharded(ref: nn.Module, mesh, isolate_router: bool = True) -> nn.Module:
    model = copy.deepcopy(ref)
    if isolate_router:
        fully_shard(model.router, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _dtypes(model: nn.Module) -> dict[str, str]:
    return {k: str(v.dtype).removeprefix("torch.") for k, v in model.state_dict().items()}


def _reference_forward(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unsharded model with proj and norm.weight in bf16, the rest fp32."""
    low = copy.deepcopy(ref)
    low.proj.to(torch.bfloat16)
    low.norm.weight.data = low.norm.weight.data.bfloat16()
    return low(x)


def fsdp_cast_checks(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    ref = ShardToy()
    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {}

    model = _sharded(ref, mesh)
    out["has_dtensor"] = _has_dtensor_params(model)
    out["dtensor_unallocated"] = is_tensor_unallocated(model.proj.weight)
    cast_model_to_dtype(model, torch.bfloat16)
    out["dtypes"] = _dtypes(model)
    out["router_type"] = type(model.router.weight).__name__
    out["exact"] = {
        "router.weight": torch.equal(model.router.weight.full_tensor(), ref.router.weight),
        "router.correction_bias": torch.equal(
            model.router.correction_bias, ref.router.correction_bias
        ),
        "norm.shift": torch.equal(model.norm.shift, ref.norm.shift),
        "norm.weight_is_bf16_rounding": torch.equal(
            model.norm.weight.full_tensor(), ref.norm.weight.bfloat16()
        ),
    }
    torch.manual_seed(1)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = model(x)
    out["forward_max_err"] = (y - _reference_forward(ref, x)).abs().max().item()
    y.sum().backward()
    out["grad_dtypes"] = {
        "router.weight": str(model.router.weight.grad.dtype),
        "proj.weight": str(model.proj.weight.grad.dtype),
    }
    out["grads_finite"] = all(
        torch.isfinite(p.grad.full_tensor()).all().item() for p in model.parameters()
    )

    try:
        _restore_fp32_modules(model, ["norm"])
        out["restore_modules_error"] = None
    except TypeError as err:
        out["restore_modules_error"] = str(err)

    with yield_fp32_model(model):
        out["inside_yield"] = sorted(set(_dtypes(model).values()) - {"int64"})
        with torch.no_grad():
            model.proj.weight.mul_(0.5)
    out["after_yield"] = _dtypes(model)
    out["after_yield_router_exact"] = torch.equal(
        model.router.weight.full_tensor(), ref.router.weight
    )
    model(x).sum().backward()  # FSDP state still consistent after the casts

    not_isolated = _sharded(ref, mesh, isolate_router=False)
    try:
        cast_model_to_dtype(not_isolated, torch.bfloat16)
        out["not_isolated_error"] = None
    except ValueError as err:
        out["not_isolated_error"] = str(err)

    skipped = _sharded(ref, mesh)
    skipped._keep_in_fp32_modules_strict = []  # without skip_modules the router would be bf16
    cast_model_to_dtype(skipped, torch.bfloat16, skip_modules=("router",))
    out["skip_router_exact"] = torch.equal(skipped.router.weight.full_tensor(), ref.router.weight)
    out["skip_dtypes"] = _dtypes(skipped)
    out["skip_forward_ok"] = bool(torch.isfinite(skipped(x)).all())

    frozen = copy.deepcopy(ref)
    frozen.proj.register_buffer("scale", torch.ones(8))
    fully_shard(frozen, mesh=mesh)
    frozen.proj.requires_grad_(False)
    cast_frozen_modules_to_compute_dtype(frozen, torch.bfloat16)
    out["frozen_dtypes"] = _dtypes(frozen)
    return out


def fail_on_rank_one(rank: int, world_size: int, message: str) -> int:
    if rank == 1:
        raise ValueError(message)
    return rank * 10


def report_rank(rank: int, world_size: int, tag: str) -> tuple:
    return (rank, world_size, tag)


def unpicklable_result(rank: int, world_size: int) -> object:
    return lambda: rank


def caller_state(rank: int, world_size: int, key: str) -> tuple:
    """What a rank sees of its caller: an environment variable, the rank variables, and
    whether the module given by the caller's sys.path imports."""
    import os

    import caller_only_module  # on sys.path only in the caller, added after the forkserver

    return os.environ.get(key), os.environ["RANK"], caller_only_module.VALUE
