"""Pipeline stages and schedules by name, on torch.distributed.pipelining's own engine.

    pp = pipeline_model(model, pp_group, schedule="1F1B", n_microbatches=8, device="cuda")
    loss = pp.step(input_ids, labels)      # every rank calls it; loss on the last stage's rank
    optimizer.step()                       # over pp.parameters()
    val = pp.eval_step(input_ids, labels)  # forward only, no gradients

`pipeline_model` validates everything it can before touching the process group, splits
the model (`am_pp.split`), builds this rank's `PipelineStage`s and the torch schedule named
by `schedule`. The default loss, `PipelineCausalLMLoss`, is the token-mean next-token cross
entropy over the GLOBAL batch: each microbatch contributes its summed CE divided by the
global count of target tokens, and the schedule does not rescale (`scale_grads=False`), so
the microbatch losses add up to, and the gradients equal, one process's on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import pipelining

from am_pp._own_forward import MaskCarryingStage, carried_mask
from am_pp.hf_utils import model_keeps_self_forward, validate_hf_model_for_pipeline_support
from am_pp.split import generate_stage_module_names, materialize_stage, split_model_into_stages

__all__ = [
    "SCHEDULES",
    "PipelineCausalLMLoss",
    "PipelinedModel",
    "ScheduleSpec",
    "get_schedule_spec",
    "pipeline_model",
    "stage_indices_for_rank",
]


class ScheduleSpec(NamedTuple):
    """A torch schedule class and how it places stages on ranks."""

    cls_name: str
    multi: bool  # takes a list of stages per rank
    placement: str  # "single" (rank r: stage r), "loop" (r, r+p, ...), "v" (r, 2p-1-r)


_ALL_SCHEDULES = {
    "GPipe": ScheduleSpec("ScheduleGPipe", False, "single"),
    "1F1B": ScheduleSpec("Schedule1F1B", False, "single"),
    "Interleaved1F1B": ScheduleSpec("ScheduleInterleaved1F1B", True, "loop"),
    "LoopedBFS": ScheduleSpec("ScheduleLoopedBFS", True, "loop"),
    "InterleavedZeroBubble": ScheduleSpec("ScheduleInterleavedZeroBubble", True, "loop"),
    "ZBVZeroBubble": ScheduleSpec("ScheduleZBVZeroBubble", True, "v"),
    "DualPipeV": ScheduleSpec("ScheduleDualPipeV", True, "v"),
}
# The ones the installed torch provides.
SCHEDULES: dict[str, ScheduleSpec] = {
    name: spec for name, spec in _ALL_SCHEDULES.items() if hasattr(pipelining, spec.cls_name)
}


def get_schedule_spec(name: str) -> ScheduleSpec:
    """The spec of schedule `name` (case-insensitive); ValueError listing the accepted names."""
    by_lower = {k.lower(): v for k, v in SCHEDULES.items()}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ValueError(f"unknown pipeline schedule {name!r}; accepted: {sorted(SCHEDULES)}")
    return by_lower[name.lower()]


def stage_indices_for_rank(
    rank: int, pp_size: int, stages_per_rank: int, placement: str
) -> list[int]:
    """The stages rank `rank` holds: one per rank, looped (`r + k*p`), or V (`r`, `2p-1-r`)."""
    if placement == "v":
        if stages_per_rank != 2:
            raise ValueError(
                f"V-shaped schedules hold exactly 2 stages per rank, not {stages_per_rank}"
            )
        return [rank, 2 * pp_size - 1 - rank]
    return [rank + k * pp_size for k in range(stages_per_rank)]


class PipelineCausalLMLoss:
    """Token-mean next-token cross entropy over the global batch, one microbatch at a time.

    `set_global_batch(labels)` (called by `PipelinedModel.step` with the whole batch's
    labels) counts the target tokens; each call then returns the microbatch's summed CE
    over that count, so the per-microbatch losses sum to the global token mean. Position t
    predicts labels[t + 1] (the HF CausalLM convention: labels are the input ids);
    `ignore_index` targets count for nothing."""

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index
        self.num_target_tokens: int | None = None

    def _shift(self, labels: torch.Tensor) -> torch.Tensor:
        return F.pad(labels[..., 1:], (0, 1), value=self.ignore_index)

    def set_global_batch(self, labels: torch.Tensor) -> None:
        count = int((self._shift(labels) != self.ignore_index).sum())
        self.num_target_tokens = max(count, 1)  # an all-ignored batch has zero loss, not NaN

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_target_tokens is None:
            raise RuntimeError("PipelineCausalLMLoss: call set_global_batch(labels) first")
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            self._shift(labels).reshape(-1).to(logits.device),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        return total / self.num_target_tokens


def _split_rows(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, torch.Tensor):
        if value.shape[0] % n:
            raise ValueError(
                f"{name}: batch size {value.shape[0]} is not divisible by n_microbatches={n}"
            )
        return list(value.chunk(n))
    return [value] * n  # non-tensors (flags, ints) go to every microbatch


# Per-token inputs every stage needs, but PipelineStage hands only to the first one. The
# patched forwards carry position_ids and attention_mask with the hidden states; for a model
# that keeps its own forward (`model_keeps_self_forward`) am-pp carries the attention_mask
# (`_own_forward.MaskCarryingStage`) and nothing else reaches a later stage.
_FIRST_STAGE_ONLY = ("attention_mask", "position_ids", "cache_position")
_CARRIED = ("attention_mask", "position_ids")


def _reject_first_stage_only_inputs(
    kwargs: Mapping[str, Any], num_stages: int, carries_inputs: bool
) -> None:
    if num_stages == 1:
        return
    given = [k for k, v in kwargs.items() if v is not None]
    if carries_inputs:
        given = [k for k in given if k in _FIRST_STAGE_ONLY and k not in _CARRIED]
        hint = "pass unpadded, unpacked batches (or one stage)"
    else:
        # The model's own forward reads every keyword on every stage (packing, padding).
        given = [k for k in given if k != "attention_mask"]
        hint = (
            "a model that keeps its own forward gets only attention_mask (a 2-D padding mask) "
            "on every stage; pass unpacked batches with padding as attention_mask"
        )
    if given:
        raise ValueError(
            f"{sorted(given)} would reach only the first of {num_stages} stages (later stages "
            "get the previous stage's outputs alone) and the others would silently run "
            f"without them; {hint}"
        )


@dataclass
class PipelinedModel:
    """This rank's share of a pipelined model: its stage modules, torch `PipelineStage`s and
    schedule. `step` runs one training step of the whole pipeline (all ranks call it)."""

    stages: list[nn.Module]
    pipeline_stages: list[Any]
    schedule: Any
    n_microbatches: int
    loss_fn: Callable | None
    has_first_stage: bool
    has_last_stage: bool
    stage_indices: list[int] = field(default_factory=list)
    num_stages: int = 1
    carries_inputs: bool = True  # position_ids / attention_mask: the patched forwards do
    placement: str = "single"  # the schedule's stage placement (ScheduleSpec.placement)

    def parameters(self):
        for stage in self.stages:
            yield from stage.parameters()

    def named_parameters(self):
        for stage in self.stages:
            yield from stage.named_parameters()

    def _microbatches(self, input_ids, labels, microbatch_kwargs, kwargs) -> dict:
        n = self.n_microbatches
        _reject_first_stage_only_inputs(kwargs, self.num_stages, self.carries_inputs)
        target_mbs = None
        if labels is not None:
            target_mbs = _split_rows(labels, n, "labels")
            if hasattr(self.loss_fn, "set_global_batch"):
                self.loss_fn.set_global_batch(labels)
        arg_mbs = kwarg_mbs = None
        if self.has_first_stage:
            if input_ids is None:
                raise ValueError("this rank holds the first stage: step() needs input_ids")
            if not self.carries_inputs and self.num_stages > 1:
                carried_mask(kwargs.get("attention_mask"), input_ids)  # checked before any p2p
            arg_mbs = [(x,) for x in _split_rows(input_ids, n, "input_ids")]
            split = {k: _split_rows(v, n, k) for k, v in kwargs.items() if v is not None}
            kwarg_mbs = [{k: v[m] for k, v in split.items()} for m in range(n)]
            if microbatch_kwargs is not None:
                if len(microbatch_kwargs) != n:
                    raise ValueError(
                        f"microbatch_kwargs has {len(microbatch_kwargs)} entries, "
                        f"n_microbatches={n}"
                    )
                for mb, extra in zip(kwarg_mbs, microbatch_kwargs, strict=True):
                    mb.update(extra)
        return {"arg_mbs": arg_mbs, "kwarg_mbs": kwarg_mbs, "target_mbs": target_mbs}

    def _batch_loss(self, losses: list[torch.Tensor]) -> torch.Tensor | None:
        if self.has_last_stage and losses:
            return torch.stack([loss.detach() for loss in losses]).sum()
        return None

    def step(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        microbatch_kwargs: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """One forward+backward over the global batch; gradients accumulate in the stages.

        input_ids (and whole-batch `kwargs`, split by rows) feed the first stage (the
        patched forwards pass `attention_mask` / `position_ids` on to every stage; for a
        model that keeps its own forward am-pp carries `attention_mask`, nothing else);
        `microbatch_kwargs` adds per-microbatch first-stage inputs that do not split by rows
        (e.g. each microbatch's images). `labels` (whole batch) are the loss target; pass
        them on every rank. Returns the global-batch loss on the rank holding the last
        stage, else None. Bad input raises before any communication."""
        losses: list[torch.Tensor] = []
        mbs = self._microbatches(input_ids, labels, microbatch_kwargs, kwargs)
        self.schedule.step(**mbs, losses=losses, return_outputs=False)
        return self._batch_loss(losses)

    def eval_step(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        microbatch_kwargs: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """`step` without backward (validation): the global-batch loss on the last stage's
        rank, no gradients touched. Not for the V-shaped schedules (ZBVZeroBubble,
        DualPipeV) nor a multi-stage schedule on one rank: where two consecutive stages
        share a rank, the installed torch's `eval` still runs their local backward
        hand-offs (and fails). Every rank reaches the same decision (from the placement)."""
        if self.placement == "v":
            raise NotImplementedError(
                "eval_step with a V-shaped schedule: torch.distributed.pipelining's eval runs "
                "its backward actions too (and fails); evaluate with a 1F1B or interleaved "
                "pipeline"
            )
        if any(i + 1 in self.stage_indices for i in self.stage_indices):
            raise NotImplementedError(
                f"eval_step with consecutive stages {self.stage_indices} on one rank: "
                "torch.distributed.pipelining's eval runs their local backward hand-off too "
                "(and fails); evaluate with one stage per rank, or more ranks than 1"
            )
        losses: list[torch.Tensor] = []
        mbs = self._microbatches(input_ids, labels, microbatch_kwargs, kwargs)
        with torch.no_grad():
            self.schedule.eval(**mbs, losses=losses)
        return self._batch_loss(losses)


def _group_size_rank(pp_group) -> tuple[Any, int, int]:
    """(ProcessGroup, size, rank) from a ProcessGroup, a 1-D DeviceMesh, or None (world)."""
    if pp_group is not None and hasattr(pp_group, "get_group"):  # DeviceMesh
        pp_group = pp_group.get_group()
    if not dist.is_initialized():
        raise RuntimeError("pipeline_model needs an initialized torch.distributed process group")
    return pp_group, dist.get_world_size(pp_group), dist.get_rank(pp_group)


def _static_metas(stage: nn.Module, is_first: bool, microbatch_size, seq_len, dtype):
    if microbatch_size is None or seq_len is None:
        raise ValueError(
            f"{type(getattr(stage, 'stage', stage)).__name__} gives static stage shapes (get_pipeline_stage_metas): "
            "pipeline_model needs microbatch_size and seq_len"
        )
    if isinstance(stage, MaskCarryingStage):
        return stage.static_metas(microbatch_size, seq_len, dtype)
    return stage.get_pipeline_stage_metas(is_first, microbatch_size, seq_len, dtype)


def pipeline_model(
    model: nn.Module,
    pp_group=None,
    schedule: str = "1F1B",
    n_microbatches: int = 1,
    *,
    device: torch.device | str = "cpu",
    stages_per_rank: int | None = None,
    layers_per_stage: Sequence[int] | None = None,
    loss_fn: Callable | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    microbatch_size: int | None = None,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PipelinedModel:
    """Split `model` into stages and build this rank's stages and the named schedule.

    `model` may live on the meta device: only this rank's stages get storage (on `device`,
    weights from `state_dict` when given, non-persistent buffers recomputed). A real model's
    weights are copied as they are. `stages_per_rank` defaults to 1 for single-stage
    schedules and 2 for interleaved / V ones. `microbatch_size`/`seq_len` are needed only
    for models with a `get_pipeline_stage_metas` hook (static stage shapes); other stages
    infer shapes from the first microbatch. Bad input raises before any communication."""
    spec = get_schedule_spec(schedule)
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches={n_microbatches!r} must be a positive int")
    validate_hf_model_for_pipeline_support(model)
    stages_per_rank = stages_per_rank or (2 if spec.multi else 1)
    if not spec.multi and stages_per_rank != 1:
        raise ValueError(f"schedule {schedule!r} runs one stage per rank, not {stages_per_rank}")
    group, pp_size, rank = _group_size_rank(pp_group)
    num_stages = pp_size * stages_per_rank
    names = generate_stage_module_names(model, num_stages, layers_per_stage)
    indices = stage_indices_for_rank(rank, pp_size, stages_per_rank, spec.placement)
    loss_fn = loss_fn if loss_fn is not None else PipelineCausalLMLoss()
    modules = split_model_into_stages(model, names, indices)
    pipeline_stages = []
    for index, module in zip(indices, modules, strict=True):
        materialize_stage(module, device, state_dict)
        metas, submod = {}, module
        if model_keeps_self_forward(module) and num_stages > 1:
            submod = MaskCarryingStage(module, index == 0, index == num_stages - 1)
        if model_keeps_self_forward(module) and hasattr(module, "get_pipeline_stage_metas"):
            inputs, outputs = _static_metas(submod, index == 0, microbatch_size, seq_len, dtype)
            metas = {"input_args": inputs, "output_args": outputs}
        pipeline_stages.append(
            pipelining.PipelineStage(
                submod, index, num_stages, torch.device(device), group=group, **metas
            )
        )
    cls = getattr(pipelining, spec.cls_name)
    stage_arg = pipeline_stages if spec.multi else pipeline_stages[0]
    sched = cls(stage_arg, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return PipelinedModel(
        stages=modules,
        pipeline_stages=pipeline_stages,
        schedule=sched,
        n_microbatches=n_microbatches,
        loss_fn=loss_fn,
        has_first_stage=0 in indices,
        has_last_stage=num_stages - 1 in indices,
        stage_indices=indices,
        num_stages=num_stages,
        carries_inputs=not model_keeps_self_forward(model),
        placement=spec.placement,
    )
