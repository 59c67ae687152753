"""Pipeline parallelism (`parallelism.pp > 1`) through am-pp's `pipeline_model`.

Each rank builds the model on the meta device; am-pp splits it into `pp` stages and gives
this rank's stage storage and its weights from the full starting state dict (every rank
builds the same seeded one on CPU). With data ranks (`dp_shard`, `dp_replicate`, `ep`) each
stage module is then parallelized like a whole model (`am_moe.parallelize_model` over the
world mesh: EP for its MoE blocks, FSDP2 over the data axes of its own pipeline coordinate);
torch's pipeline schedule defers the FSDP gradient reduction to the last microbatch.
Activation checkpointing wraps each stage's blocks (am-moe's wrapper under FSDP2, the
model's own `gradient_checkpointing_enable` otherwise): the schedule's backward of a stage
recomputes its blocks' forward, microbatch by microbatch. Mixed precision (bf16) is FSDP2's
MixedPrecisionPolicy on each stage, as for a whole model (with one data rank over a size-1
mesh); the stage-boundary activations and their gradients are then bf16, the compute dtype.

A step feeds the rank's data rows (every microbatch of the accumulation window,
concatenated) to the schedule, which splits it into `pp_microbatches`. The loss is the token
mean over the *global* batch (every data rank's rows): each stage's loss is its summed CE
divided by global targets / data size (FSDP2 averages the gradients over the data ranks), so
the gradients equal one process's. Only the first stage receives keyword inputs, so rows
must not be packed (`data.pack: false`: one right-padded document per row needs no
boundary input).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from am_automodel.models import initial_state_dict
from am_automodel.optim import clip_grad_norm
from am_utils.loss import IGNORE_INDEX, next_token_targets

__all__ = [
    "PipelineLoss",
    "build_pipeline",
    "pipeline_eval",
    "pipeline_train_step",
    "gather_full_state_dict",
]


class PipelineLoss:
    """Summed CE divided by `divisor`, which the step sets (global targets / data size); the
    schedule's targets are the rows' `next_token_targets` (shifted on the full rows before the
    microbatch split). No `set_global_batch`: am-pp would set it from this rank's rows only."""

    def __init__(self) -> None:
        self.divisor = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        return loss / self.divisor


def build_pipeline(recipe, config, spec, backend, plan, mesh, device):
    """This rank's `am_pp.PipelinedModel` with the starting weights."""
    from am_dtype import resolve_dtype
    from am_pp import pipeline_model

    with torch.device("meta"):
        model = spec.build(config, backend)
    full = initial_state_dict(recipe.model, config, backend, recipe.train.seed)
    tr, par = recipe.train, recipe.parallelism
    rows = tr.micro_batch_size * tr.grad_accum
    n_mb = par.pp_microbatches or par.pp
    mixed = par.mixed_precision == "bf16"
    pp = pipeline_model(
        model,
        pp_group=mesh["pp"],
        schedule=par.pp_schedule,
        n_microbatches=n_mb,
        device=device,
        loss_fn=PipelineLoss(),
        state_dict=full,
        microbatch_size=rows // n_mb,
        seq_len=recipe.data.seq_len,
        # The activations crossing a stage boundary (and their gradients) are in the compute
        # dtype: bf16 under mixed precision, as the blocks' outputs are in one process.
        dtype=torch.bfloat16 if mixed else resolve_dtype(recipe.model.dtype),
    )
    ac = par.activation_checkpointing
    if plan.data_size == 1 and ac and not mixed:
        from am_automodel.build import enable_activation_checkpointing

        for stage in pp.stages:
            enable_activation_checkpointing(stage)
    if plan.data_size > 1 or mixed:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from am_moe.parallelizer import parallelize_model

        # Mixed precision is FSDP2's MixedPrecisionPolicy, as in one process: fp32 sharded
        # master weights, bf16 copies gathered for the forward, gradients reduced in fp32
        # (with one data rank the "shards" are whole: a size-1 mesh).
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mixed
            else None
        )

        # A stage without MoE layers still creates the experts' process groups when ep > 1
        # (parallelize_model does so on every rank), so the stages' groups agree.
        # After pipeline_model: the stages hold the same full weights on every data rank, so
        # FSDP2 keeps each rank's shard of them (and EP scatters experts from ep rank 0).
        # torch's PipelineStage checks isinstance(submod, FSDPModule) at run time.
        for stage, runner in zip(pp.stages, pp.pipeline_stages, strict=True):
            parallelize_model(stage, mesh, dp_axis_names=("dp_replicate", "dp_shard"),
                              dp_replicate_axis_name="dp_replicate", ep_axis_name="ep",
                              mp_policy=mp, activation_checkpointing=ac)  # fmt: skip
            if runner.submod is not stage:
                # am-pp wraps a model that keeps its own forward (MaskCarryingStage). Make the
                # wrapper an FSDP root (no parameters of its own) so the schedule sees an
                # FSDPModule and reduces the gradients once, after the last microbatch.
                from torch.distributed.fsdp import fully_shard

                fully_shard(
                    runner.submod, mesh=_data_mesh(stage), mp_policy=mp or MixedPrecisionPolicy()
                )
    return pp


def _data_mesh(stage) -> object:
    """The mesh FSDP2 shards the stage's non-expert parameters over."""
    return next(p for n, p in stage.named_parameters() if ".experts." not in n).device_mesh


def _targets(batch: dict) -> torch.Tensor:
    return next_token_targets(batch["labels"], batch["seq_idx"])


def _world_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _count(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def pipeline_train_step(pp, batches, optimizer, max_grad_norm: float, group, data_size: int = 1):
    """One optimizer step through the pipeline; returns (loss, grad_norm) on every rank.

    `group`: this rank's pipeline group (the stages' squared grad norms are summed over it);
    `data_size`: ranks reading different rows (their targets make the global count)."""
    input_ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([_targets(b) for b in batches])
    # Every rank of a pipeline reads the same rows: the first stage's rank counts them.
    (global_targets,) = _world_sum([_count(labels) if pp.has_first_stage else 0])
    pp.loss_fn.divisor = max(global_targets, 1.0) / data_size
    loss = pp.step(input_ids, labels=labels)
    grad_norm = clip_grad_norm(list(pp.parameters()), max_grad_norm, group=group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The last stage of each data rank holds sum / divisor: their sum over ranks / data size.
    (total,) = _world_sum([float(loss) if pp.has_last_stage and loss is not None else 0.0])
    return total / data_size, float(grad_norm)


@torch.no_grad()
def pipeline_eval(pp, batches) -> float:
    """Token-mean eval loss over `batches` of every data rank, forward only."""
    total = count = 0.0
    for stage in pp.stages:
        stage.eval()
    pp.loss_fn.divisor = 1.0  # summed losses; the mean is taken over every rank below
    for batch in batches:
        labels = _targets(batch)
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if pp.has_first_stage else ()
        pp.schedule.eval(*args, target=labels, losses=losses)
        if pp.has_last_stage:
            total += float(torch.stack(losses).sum())
            count += _count(labels)
    for stage in pp.stages:
        stage.train()
    total, count = _world_sum([total, count])
    return total / max(count, 1.0)


def gather_full_state_dict(pp, group) -> dict[str, torch.Tensor]:
    """Every stage's full weights (FSDP / EP shards gathered), merged, on every rank (for the
    HF export); a collective over every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)
    local = {
        k: v.detach().cpu()
        for stage in pp.stages
        for k, v in get_model_state_dict(stage, options=options).items()
    }
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        full.update(part)
    return full
