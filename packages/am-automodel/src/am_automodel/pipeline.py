"""Pipeline parallelism (`parallelism.pp > 1`) through am-pp's `pipeline_model`.

Each rank builds the model on the meta device; am-pp splits it into `pp` stages and gives
this rank's stage storage and its weights from the full starting state dict (every rank
builds the same seeded one on CPU). A step feeds the rank's whole global batch (every
microbatch of the accumulation window, concatenated) to the schedule, which splits it into
`pp_microbatches`; the loss is the token mean over that batch, so the gradients equal one
process's. Only the first stage receives keyword inputs, so rows must not be packed
(`data.pack: false`: one right-padded document per row needs no boundary input).
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
    """Summed CE over the global batch's target count; the schedule's targets are the rows'
    `next_token_targets` (shifted on the full rows before the microbatch split)."""

    def __init__(self) -> None:
        self.num_targets = 1

    def set_global_batch(self, labels: torch.Tensor) -> None:
        self.num_targets = max(int((labels != IGNORE_INDEX).sum()), 1)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        return loss / self.num_targets


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
    return pipeline_model(
        model,
        pp_group=mesh["pp"],
        schedule=par.pp_schedule,
        n_microbatches=n_mb,
        device=device,
        loss_fn=PipelineLoss(),
        state_dict=full,
        microbatch_size=rows // n_mb,
        seq_len=recipe.data.seq_len,
        dtype=resolve_dtype(recipe.model.dtype),
    )


def _targets(batch: dict) -> torch.Tensor:
    return next_token_targets(batch["labels"], batch["seq_idx"])


def _from_last_stage(pp, value: torch.Tensor | None, group) -> float:
    """The last stage's scalar on every rank of the pipeline."""
    t = torch.zeros((), dtype=torch.float64)
    if pp.has_last_stage and value is not None:
        t += float(value)
    dist.all_reduce(t, group=group)
    return float(t)


def pipeline_train_step(pp, batches, optimizer, max_grad_norm: float, group):
    """One optimizer step through the pipeline; returns (loss, grad_norm) on every rank."""
    input_ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([_targets(b) for b in batches])
    loss = pp.step(input_ids, labels=labels)
    grad_norm = clip_grad_norm(list(pp.parameters()), max_grad_norm, group=group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _from_last_stage(pp, loss, group), float(grad_norm)


@torch.no_grad()
def pipeline_eval(pp, batches, group) -> float:
    """Token-mean eval loss over `batches`, forward only through the schedule."""
    total = count = 0.0
    for stage in pp.stages:
        stage.eval()
    for batch in batches:
        labels = _targets(batch)
        pp.loss_fn.set_global_batch(labels)
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if pp.has_first_stage else ()
        pp.schedule.eval(*args, target=labels, losses=losses)
        n = int((labels != IGNORE_INDEX).sum())
        mean = torch.stack(losses).sum() if losses else None
        total += _from_last_stage(pp, mean, group) * n
        count += n
    for stage in pp.stages:
        stage.train()
    return total / max(count, 1.0)


def gather_full_state_dict(pp, group) -> dict[str, torch.Tensor]:
    """Every stage's weights, merged, on every rank (for the HF export)."""
    local = {k: v.detach().cpu() for stage in pp.stages for k, v in stage.state_dict().items()}
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        full.update(part)
    return full
