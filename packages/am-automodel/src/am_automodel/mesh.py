"""The device mesh: sizes from the recipe, checked against the world size and the model.

`plan_mesh` runs before any process group exists (it reads `WORLD_SIZE` as torchrun sets it)
and raises a one-line `RecipeError` naming the key when the sizes cannot work: their product
must be the world size, `ep` must divide the routed experts, `pp` cannot exceed the layers,
`2*cp` must divide the sequence length and the model must own CP hooks; pp with cp is not
wired yet and is refused naming what is accepted. cp combines with dp_shard / dp_replicate and
ep: FSDP2 then shards over the data axes and `cp` together (`MeshPlan.fsdp_axes`), and the
experts' all-to-all runs between the ep ranks of one CP coordinate (the same share of different
rows). `build_mesh` then makes one DeviceMesh with the axes ("pp", "dp_replicate", "dp_shard",
"cp", "ep"); size-1 axes are kept so code can name them. `ep` is last because am-moe flattens
the non-expert FSDP mesh as the data axes followed by `ep`, which must be in mesh order.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from am_automodel.recipe import ParallelismSection, RecipeError

__all__ = ["MESH_AXES", "MeshPlan", "build_mesh", "plan_mesh"]

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "ep")


@dataclass(frozen=True)
class MeshPlan:
    """Resolved parallel sizes and the device type."""

    world_size: int
    device: str
    pp: int
    dp_replicate: int
    dp_shard: int
    ep: int
    cp: int
    use_fsdp: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.ep)

    @property
    def data_size(self) -> int:
        """Ranks that see different rows: the data axes and `ep` (experts split, tokens not)."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def fsdp_axes(self) -> tuple[str, ...]:
        """The mesh axes FSDP2 spreads the non-expert parameters over (besides `ep`): the data
        axes, and `cp` with context parallelism (CP ranks hold shards too)."""
        return ("dp_replicate", "dp_shard") + (("cp",) if self.cp > 1 else ())

    @property
    def grad_mean_ranks(self) -> int:
        """Ranks whose gradients FSDP2 averages (the loss scale undoes the mean): the data
        ranks, times the CP ranks when CP runs under FSDP2 (CP gradients must be summed)."""
        return self.data_size * (self.cp if self.use_fsdp else 1)


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            "parallelism.device = 'cuda': no CUDA device is available; use auto or cpu"
        )
    return choice


def _check_pipeline(section: ParallelismSection, dp_shard: int, pack: bool) -> None:
    if importlib.util.find_spec("am_pp") is None:
        raise RecipeError(
            f"parallelism.pp = {section.pp}: pipeline parallelism needs the am-pp package, "
            "which is not installed"
        )
    if section.cp > 1:
        raise RecipeError(
            f"parallelism.pp = {section.pp} with cp={section.cp}: not wired for pipeline "
            "stages yet; pp combines with dp_shard, dp_replicate, ep, mixed precision and "
            "activation checkpointing only"
        )
    if pack:
        raise RecipeError(
            f"parallelism.pp = {section.pp} needs data.pack = false: stages after the first "
            "receive hidden states only, so they cannot see packed-document boundaries"
        )


def _check_cp(section: ParallelismSection, spec, config, seq_len: int, pack: bool) -> None:
    from am_automodel.models import CP_HOOKS

    cp = section.cp
    if not spec.has_cp_hooks(config):
        cls = spec.model_class(config) if spec.model_class is not None else None
        name = cls.__name__ if cls is not None else type(config).__name__
        raise RecipeError(
            f"parallelism.cp = {cp}: {name} has no context-parallel hooks "
            f"({', '.join(CP_HOOKS)}); use cp=1"
        )
    if seq_len % (2 * cp):
        raise RecipeError(
            f"parallelism.cp = {cp} needs data.seq_len = {seq_len} to be a multiple of "
            f"2*cp = {2 * cp} (each CP rank keeps two load-balanced chunks of every row)"
        )
    if pack:
        raise RecipeError(
            f"parallelism.cp = {cp} needs data.pack = false: the context-parallel attention "
            "sees one document per row"
        )


def plan_mesh(
    section: ParallelismSection, world_size: int, spec, config, seq_len: int, pack: bool = True
) -> MeshPlan:
    """Check the recipe's parallel sizes against the world and the model; resolve dp_shard=-1."""
    others = section.dp_replicate * section.ep * section.pp * section.cp
    dp_shard = section.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise RecipeError(
                f"parallelism: dp_replicate*ep*pp*cp = {others} does not divide the world size "
                f"{world_size}, so dp_shard=-1 cannot fill it"
            )
        dp_shard = world_size // others
    if dp_shard * others != world_size:
        raise RecipeError(
            f"parallelism: dp_replicate*dp_shard*ep*pp*cp = {dp_shard * others} does not match "
            f"the world size {world_size} (WORLD_SIZE; launch with torchrun --nproc-per-node "
            f"{dp_shard * others} or change the sizes)"
        )
    experts = spec.num_experts(config)
    if section.ep > 1 and experts is None:
        raise RecipeError(f"parallelism.ep = {section.ep}: the model has no MoE experts to split")
    if section.ep > 1 and experts % section.ep:
        raise RecipeError(
            f"parallelism.ep = {section.ep} does not divide the model's {experts} routed experts"
        )
    layers = spec.num_layers(config)
    if section.pp > layers:
        raise RecipeError(
            f"parallelism.pp = {section.pp} is larger than the model's {layers} layers"
        )
    if section.pp > 1:
        _check_pipeline(section, dp_shard, pack)
    if section.cp > 1:
        _check_cp(section, spec, config, seq_len, pack)
    device = _device(section.device)
    data = section.dp_replicate * dp_shard * section.ep
    use_fsdp = (data > 1 or section.mixed_precision != "none") and section.pp == 1
    return MeshPlan(world_size, device, section.pp, section.dp_replicate, dp_shard, section.ep,
                    section.cp, use_fsdp)  # fmt: skip


def build_mesh(plan: MeshPlan):
    """One DeviceMesh over every rank with the five named axes (needs the process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(plan.device, plan.shape, mesh_dim_names=MESH_AXES)


class ProcessGroup:
    """Context manager: the default process group for this run (created if absent).

    Under torchrun (or a test harness that already initialized one) the existing group is
    used. A direct single-process run gets a world-size-1 gloo group over an in-memory
    store, so FSDP2, DCP and the collectives run the same code as on many ranks.
    """

    def __init__(self, plan: MeshPlan) -> None:
        self.plan = plan
        self.created = False

    def __enter__(self) -> ProcessGroup:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.plan.device == "cuda" else "gloo"
            timeout = datetime.timedelta(minutes=10)
            if self.plan.world_size == 1 and "MASTER_ADDR" not in os.environ:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)  # fmt: skip
            else:
                dist.init_process_group(backend, timeout=timeout)
            self.created = True
        if self.plan.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()
