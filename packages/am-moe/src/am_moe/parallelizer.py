"""Apply expert parallelism, activation checkpointing and FSDP2 to a plain model with MoE blocks.

The model is ordinary single-device code; `parallelize_model` rewrites it in place, in order:

1. Expert parallelism: every routed-expert parameter of each `am_moe.layers.MoE` block becomes a
   DTensor `Shard(0)` over the `ep` mesh axis (each EP rank keeps E / ep experts), and the
   block's `experts.dispatcher` becomes the all-to-all dispatcher named by the backend.
2. Activation checkpointing (optional): each transformer block is wrapped in a non-reentrant
   `checkpoint_wrapper` (`am_moe.activation_checkpointing`, the same one models use).
3. FSDP2: routed experts are `fully_shard`-ed over the data axes only (the axes orthogonal to
   EP: EP ranks hold different experts, so expert gradients must not be reduced across EP);
   blocks and the root over the data axes and `ep` flattened together (tokens on different EP
   ranks are different data for every other parameter). Expert gradients are divided by that
   full data size as well, so one loss normalization is right for both kinds of parameter.
   With `dp_replicate_axis_name` (HSDP) that axis replicates instead: a 2-D FSDP mesh.

Process groups: flattening mesh axes creates a process group, which every rank of the world
must do, in the same order. So every rank calling `parallelize_model` with the same mesh and
axis names creates the same groups, whatever part of the model it holds: the data mesh, and
with ep > 1 the experts' data mesh too, also on a rank whose model has no MoE block (a
pipeline stage without MoE layers), so groups made afterwards agree across ranks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from am_moe.activation_checkpointing import checkpoint_blocks
from am_moe.dispatch import build_dispatcher

__all__ = ["apply_ep", "parallelize_model"]

logger = logging.getLogger(__name__)


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    from am_moe.layers import MoE  # layers imports dispatch; importing here avoids a cycle

    return [m for m in model.modules() if isinstance(m, MoE)]


def _check_axes(world_mesh: DeviceMesh, names: Sequence[str]) -> None:
    have = world_mesh.mesh_dim_names or ()
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(
            f"device mesh has no axes {missing}; its axes are {list(have)} (name the data axes "
            "with dp_axis_names and the expert axis with ep_axis_name)"
        )


def _submesh(world_mesh: DeviceMesh, names: Sequence[str]) -> DeviceMesh:
    """The 1-D mesh over `names` (flattened when there are several)."""
    if len(names) == 1:
        return world_mesh[names[0]]
    return world_mesh[tuple(names)]._flatten("_".join(names))


def _fsdp_mesh(world_mesh: DeviceMesh, replicate: str | None, names: Sequence[str]) -> DeviceMesh:
    """FSDP's mesh over `names` (flattened): 1-D, or 2-D (replicate, shard) for HSDP."""
    shard_mesh = _submesh(world_mesh, names)
    if replicate is None:
        return shard_mesh
    return world_mesh[(replicate, shard_mesh.mesh_dim_names[0])]


def _shard_size(mesh: DeviceMesh) -> int:
    """Ranks a parameter is sharded over: the last dim of an HSDP mesh, else all of it."""
    return mesh.size(mesh.ndim - 1)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh, backend=None) -> list[nn.Module]:
    """Shard every MoE block's routed experts over `ep_mesh` and install an EP dispatcher.

    Returns the MoE blocks. Raises ValueError if a block's expert count does not divide by the
    EP size. Each rank keeps its contiguous slice of E / ep experts, scattered from EP rank 0
    (or, for a model on the meta device, just allocated for later initialization).
    """
    ep_size = ep_mesh.size()
    blocks = _moe_blocks(model)
    for block in blocks:
        experts = block.experts
        params = dict(experts.named_parameters(recurse=False))
        n_experts = {p.shape[0] for p in params.values()}
        if len(n_experts) != 1:
            raise ValueError(f"expert parameters disagree on the expert count: {sorted(n_experts)}")
        (num_experts,) = n_experts
        if num_experts % ep_size != 0:
            raise ValueError(
                f"n_routed_experts={num_experts} is not divisible by the expert-parallel size "
                f"ep={ep_size}"
            )
        for name, param in params.items():
            # Meta tensors (deferred init) have no data to scatter: split locally.
            src = None if param.is_meta else 0
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=src)
            experts.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
        experts.dispatcher = build_dispatcher(
            backend if backend is not None else block.backend, num_experts, ep_mesh
        )
    return blocks


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _find_block_containers(
    model: nn.Module, block_container: str | Sequence[str] | None
) -> list[nn.Module]:
    """The ModuleLists/ModuleDicts of transformer blocks: the named ones, or every `*.layers`.

    Found automatically: every ModuleList/ModuleDict named `layers` that is not inside
    another one, in module order: a VLM's vision-tower blocks and its language-model
    decoder blocks, a model's decoder blocks and its MTP blocks, each stack once.
    """
    if block_container is not None:
        names = [block_container] if isinstance(block_container, str) else list(block_container)
        return [_named_container(model, name) for name in names]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name.split(".")[-1] != "layers" or not isinstance(module, _CONTAINERS):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # a stack inside one block of an outer stack belongs to that block
        found.append((name, module))
    return [module for _, module in found]


def _named_container(model: nn.Module, name: str) -> nn.Module:
    container = model.get_submodule(name)
    if not isinstance(container, _CONTAINERS):
        raise ValueError(
            f"block_container={name!r} is a {type(container).__name__}; expected an "
            "nn.ModuleList or nn.ModuleDict of transformer blocks"
        )
    return container


def _blocks_of(containers: Sequence[nn.Module]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for container in containers:
        blocks += container.values() if isinstance(container, nn.ModuleDict) else container
    return blocks


def _shard_experts(blocks, expert_dp_mesh: DeviceMesh, ep_size: int, fsdp_kwargs: dict):
    for block in blocks:
        experts = block.experts
        local_experts = next(experts.parameters()).to_local().shape[0]
        # Fewer local experts than FSDP ranks would leave some ranks empty: shard dim 1 then.
        dim = 1 if local_experts < _shard_size(expert_dp_mesh) else 0
        fully_shard(
            experts,
            mesh=expert_dp_mesh,
            shard_placement_fn=lambda _p, d=dim: Shard(d),
            **fsdp_kwargs,
        )
        # FSDP averages expert grads over the expert data ranks (data size / ep); the rest of
        # the model is averaged over the full data size, so divide by ep once more. A hook on
        # the reduced gradient instead of set_gradient_divide_factor: torch 2.15 divides twice
        # on a single-rank mesh with fp16/fp64 reduction.
        experts.set_all_reduce_hook(functools.partial(_divide_, 1.0 / ep_size))


def _divide_(scale: float, reduced: torch.Tensor) -> None:
    reduced.mul_(scale)


def parallelize_model(
    model: nn.Module,
    world_mesh: DeviceMesh,
    *,
    dp_axis_names: Sequence[str] = ("dp",),
    ep_axis_name: str | None = "ep",
    backend=None,
    mp_policy: MixedPrecisionPolicy | None = None,
    activation_checkpointing: bool = False,
    block_container: str | Sequence[str] | None = None,
    reshard_after_forward: bool = True,
    dp_replicate_axis_name: str | None = None,
) -> nn.Module:
    """Apply EP, activation checkpointing and FSDP2 to `model` in place; return `model`.

    `world_mesh` needs named axes: the data axes in `dp_axis_names` (default `("dp",)`; size 1
    is fine) and the expert axis `ep_axis_name` (default "ep"; None or size 1 means no EP).
    A 2x2 mesh `init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))` gives FSDP over
    2 ranks for experts and over 4 for the rest. `backend` (a BackendConfig) picks the
    dispatcher; default: each MoE block's own `backend`. Transformer blocks (the FSDP and
    checkpointing units) are the children of `block_container` (a dotted path, or several, to
    a ModuleList or ModuleDict), by default of every outermost module named `layers` (a VLM's
    vision and language stacks, a model's decoder and MTP stacks).

    `dp_replicate_axis_name` (one of `dp_axis_names`): HSDP. Parameters are sharded over the
    other data axes (and `ep`) and replicated over this one: FSDP2 on the 2-D mesh
    (replicate, shard), so each replica holds a whole sharded copy, gradients are
    reduce-scattered within a replica and all-reduced across replicas.

    Every rank creates the same process groups (see the module docstring): with ep > 1 the
    experts' data mesh is made even where `model` has no MoE block, so pipeline stages with
    and without MoE layers can be parallelized over one world mesh, rank by rank.
    """
    dp_axis_names = tuple(dp_axis_names)
    if not dp_axis_names:
        raise ValueError("dp_axis_names must name at least one mesh axis (size 1 is fine)")
    _check_axes(world_mesh, dp_axis_names + ((ep_axis_name,) if ep_axis_name else ()))
    use_ep = ep_axis_name is not None and world_mesh[ep_axis_name].size() > 1
    moe_blocks = apply_ep(model, world_mesh[ep_axis_name], backend) if use_ep else []

    containers = _find_block_containers(model, block_container)
    if activation_checkpointing:
        if not containers:
            raise ValueError(
                "activation_checkpointing=True but no transformer blocks were found; pass "
                "block_container='path.to.layers'"
            )
        for container in containers:
            checkpoint_blocks(container)

    replicate = dp_replicate_axis_name
    if replicate is not None:
        if replicate not in dp_axis_names:
            raise ValueError(
                f"dp_replicate_axis_name={replicate!r} must be one of dp_axis_names "
                f"{list(dp_axis_names)}"
            )
        if len(dp_axis_names) < 2 or world_mesh[replicate].size() == 1:
            replicate = None  # nothing to replicate over, or no axis left to shard over
    shard_axes = tuple(a for a in dp_axis_names if a != replicate)
    data_axes = shard_axes + ((ep_axis_name,) if use_ep else ())
    data_mesh = _fsdp_mesh(world_mesh, replicate, data_axes)
    fsdp_kwargs = {
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "reshard_after_forward": reshard_after_forward,
    }
    # With ep > 1, on every rank: flattening is collective over the world (module docstring).
    expert_dp_mesh = _fsdp_mesh(world_mesh, replicate, shard_axes) if use_ep else None
    if moe_blocks:
        _shard_experts(moe_blocks, expert_dp_mesh, world_mesh[ep_axis_name].size(), fsdp_kwargs)
    for block in _blocks_of(containers):
        fully_shard(block, mesh=data_mesh, **fsdp_kwargs)
    fully_shard(model, mesh=data_mesh, **fsdp_kwargs)
    logger.info(
        "parallelized: %d MoE blocks with EP over %s, FSDP over %s, %d blocks%s",
        len(moe_blocks),
        ep_axis_name if use_ep else "-",
        ((replicate,) if replicate else ()) + data_axes,
        len(_blocks_of(containers)),
        " with activation checkpointing" if activation_checkpointing else "",
    )
    return model
