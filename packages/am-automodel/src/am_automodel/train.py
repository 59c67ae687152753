"""`automodel train`: the training run, as a list of steps, each a call into a component.

check the recipe against the world and the model (no process group yet) -> process group and
mesh -> data -> model (meta, parallelize, materialize) -> optimizer and schedule -> resume ->
loop: microbatches -> forward/backward -> clip -> step -> log -> eval -> checkpoint/export.

The loss of a step is the token-mean next-token cross-entropy over the whole global batch
(every microbatch of every data rank): each rank backpropagates its summed loss divided by
the global target count (times the data size, since FSDP2 averages gradients over the data
ranks). So any data/expert-parallel layout computes the same loss and gradient as one process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from am_automodel.build import build_model
from am_automodel.checkpoint import Checkpointer
from am_automodel.data import RowLoader, build_datasets, check_data_files, eval_batches
from am_automodel.export import export_hf
from am_automodel.mesh import MESH_AXES, MeshPlan, ProcessGroup, build_mesh, plan_mesh
from am_automodel.metrics import ExpertLoadMonitor, MetricsLogger, peak_memory_mb
from am_automodel.models import build_model_config, model_spec
from am_automodel.optim import build_optimizer, build_scheduler, clip_grad_norm
from am_automodel.recipe import Recipe, RecipeError
from am_automodel.step import BatchRunner
from am_automodel.tokenizer import build_tokenizer

__all__ = ["TrainResult", "prepare", "run"]


@dataclass
class TrainResult:
    """What a run did (rank-local view; losses are global)."""

    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, float] = field(default_factory=dict)
    start_step: int = 0
    export_dir: Path | None = None
    tokens_per_s: float = 0.0
    model: object = field(default=None, repr=False)
    engine: object = field(default=None, repr=False)  # LocalEngine / PipelineEngine


@dataclass
class Prepared:
    recipe: Recipe
    tokenizer: object
    config: object
    spec: object
    backend: object
    plan: MeshPlan


def prepare(recipe: Recipe) -> Prepared:
    """Every check that needs no process group and no model: fails with one RecipeError line."""
    from am_dtype import BackendConfig

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = build_tokenizer(recipe.tokenizer)
    config = build_model_config(recipe.model, len(tokenizer))
    spec = model_spec(config)
    plan = plan_mesh(recipe.parallelism, world_size, spec, config, recipe.data.seq_len,
                     recipe.data.pack)  # fmt: skip
    if plan.pp > 1:
        _check_pipeline_batch(recipe)
    check_data_files(recipe.data)
    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never") and not (Path(resume) / ".metadata").is_file():
        raise RecipeError(f"checkpoint.resume = {resume!r}: not a complete checkpoint directory")
    return Prepared(recipe, tokenizer, config, spec, BackendConfig(**recipe.model.backend), plan)


def _check_pipeline_batch(recipe: Recipe) -> None:
    from am_pp.schedule import get_schedule_spec

    par, tr = recipe.parallelism, recipe.train
    try:
        get_schedule_spec(par.pp_schedule)
    except ValueError as err:
        raise RecipeError(f"parallelism.pp_schedule = {par.pp_schedule!r}: {err}") from None
    n_mb, rows = par.pp_microbatches or par.pp, tr.micro_batch_size * tr.grad_accum
    if rows % n_mb:
        raise RecipeError(
            f"parallelism.pp_microbatches = {n_mb} does not divide the {rows} rows of a step "
            "(train.micro_batch_size * train.grad_accum)"
        )


def _all_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every rank (the tensor itself on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def _train_step(runner: BatchRunner, batches, plan, optimizer, max_grad_norm):
    """One optimizer step over `batches` (this rank's microbatches); returns (loss, grad_norm).

    The per-microbatch losses, the target counts and the clipping stay tensors on the device:
    one host sync per step, for the two floats returned (none per microbatch)."""
    model, root, device = runner.model, runner.root, runner.device
    local_targets = torch.stack([runner.num_targets(b) for b in batches]).sum()
    # CP ranks read the same rows (each computes a share of their tokens): count them once.
    global_targets = (_all_sum(local_targets.to(device, torch.float64)) / plan.cp).clamp_min(1.0)
    scale = (plan.grad_mean_ranks / global_targets).float()
    accumulate = (
        plan.use_fsdp and len(batches) > 1 and hasattr(root, "prepare_for_grad_accumulation")
    )
    if accumulate:
        root.prepare_for_grad_accumulation()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if accumulate and i == len(batches) - 1:
            root.prepare_for_final_backward()
        loss_sum, _ = runner.loss_sum(batch)
        (loss_sum * scale).backward()
        total += loss_sum.detach()
    runner.sync_cp_grads()
    grad_norm = clip_grad_norm(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = _all_sum(total) / global_targets
    loss, grad_norm = torch.stack([loss, grad_norm.to(device, torch.float64)]).tolist()
    return loss, grad_norm


@torch.no_grad()
def _evaluate(runner: BatchRunner, batches) -> float:
    runner.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=runner.device)  # (loss, targets)
    for batch in batches:
        loss_sum, n = runner.loss_sum(batch)
        sums += torch.stack([loss_sum.double(), n.double()])
    runner.model.train()
    total, count = _all_sum(sums).tolist()
    return total / max(count, 1.0)


def run(recipe: Recipe) -> TrainResult:
    """Train as the recipe says; every rank calls this (torchrun) or one process does."""
    prep = prepare(recipe)
    with ProcessGroup(prep.plan):
        return _run(prep)


def _run(prep: Prepared) -> TrainResult:
    recipe, plan = prep.recipe, prep.plan
    rank = dist.get_rank()
    mesh = build_mesh(plan)
    data_rank = _data_rank(mesh)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if plan.device == "cuda"
        else torch.device("cpu")
    )
    run_dir = Path(recipe.checkpoint.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())

    tr = recipe.train
    train_rows, val_rows = build_datasets(recipe.data, prep.tokenizer, tr.seed)
    loader = RowLoader(train_rows, tr.micro_batch_size, data_rank, plan.data_size, tr.seed,
                       recipe.data.shuffle)  # fmt: skip
    # eval_batches global batches (micro_batch_size * grad_accum * data_size rows each): the
    # same rows for every layout of the same global batch.
    n_eval = tr.eval_batches * tr.grad_accum
    val = (
        eval_batches(val_rows, tr.micro_batch_size, data_rank, plan.data_size, n_eval)
        if val_rows
        else []
    )

    engine = (PipelineEngine if plan.pp > 1 else LocalEngine)(prep, mesh, rank, device)
    model = engine.module
    optimizer = build_optimizer(model, recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.optimizer, tr.steps)
    ckpt = Checkpointer(run_dir, recipe.checkpoint.keep_last, rank, optimizer_by_name=plan.pp > 1)
    ckpt.remove_partial()
    start = 0
    resume_from = ckpt.resolve_resume(recipe.checkpoint.resume)
    if resume_from is not None:
        start = ckpt.load(resume_from, model, optimizer, scheduler, loader)
    torch.manual_seed(tr.seed + 1 + start)  # nothing random in the loop today; fixed anyway

    result = TrainResult(run_dir, start_step=start)
    log = MetricsLogger(run_dir, tr.steps, start, rank, recipe.logging.progress and rank == 0,
                        recipe.logging.tensorboard)  # fmt: skip
    if rank == 0:
        print(f"automodel: {type(model).__name__} on {plan.world_size} rank(s) {dict(zip(MESH_AXES, plan.shape, strict=True))}; "
              f"{len(train_rows)} train rows x {recipe.data.seq_len} tokens; "
              f"{'resuming after step ' + str(start) if start else 'fresh start'}", flush=True)  # fmt: skip
    monitor = ExpertLoadMonitor(model, reduce=plan.pp == 1)
    cfg = recipe.checkpoint
    tokens_per_step = tr.micro_batch_size * tr.grad_accum * plan.data_size * recipe.data.seq_len
    run_start, steps_done = time.perf_counter(), 0
    try:
        for step in range(start + 1, tr.steps + 1):
            t0 = time.perf_counter()
            batches = [loader.next_batch() for _ in range(tr.grad_accum)]
            lr = optimizer.param_groups[0]["lr"]
            loss, grad_norm = engine.train_step(batches, optimizer, recipe.optimizer.max_grad_norm)
            scheduler.step()
            dt = time.perf_counter() - t0
            steps_done += 1
            result.losses[step] = loss
            elapsed = time.perf_counter() - run_start
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                      "tokens_per_s": tokens_per_step / dt, "peak_mem_mb": peak_memory_mb(plan.device),
                      "epoch": loader.epoch, "eta_s": elapsed / steps_done * (tr.steps - step),
                      **monitor.pop()}  # fmt: skip
            if step % recipe.logging.log_every == 0 or step == tr.steps:
                log.log(record)
            if val and ((tr.eval_every and step % tr.eval_every == 0) or step == tr.steps):
                result.eval_losses[step] = engine.evaluate(val)
                log.log({"step": step, "eval_loss": result.eval_losses[step]}, echo=True)
            if (cfg.every and step % cfg.every == 0) or step == tr.steps:
                ckpt.save(step, model, optimizer, scheduler, loader)
            if cfg.export_every and step % cfg.export_every == 0 and step != tr.steps:
                engine.export(
                    prep.tokenizer,
                    recipe.to_yaml(),
                    run_dir / "hf" / f"step_{step:08d}",
                    rank,
                )
        if cfg.export_final:
            result.export_dir = engine.export(
                prep.tokenizer, recipe.to_yaml(), run_dir / "hf" / "final", rank
            )
    finally:
        log.close()
    total_time = time.perf_counter() - run_start
    result.tokens_per_s = tokens_per_step * steps_done / total_time if steps_done else 0.0
    result.model, result.engine = model, engine
    return result


def _data_rank(mesh) -> int:
    """This rank's index among the ranks that read different rows (dp axes and ep)."""
    coords = {name: mesh.get_local_rank(name) for name in ("dp_replicate", "dp_shard", "ep")}
    sizes = {name: mesh.size(mesh.mesh_dim_names.index(name)) for name in coords}
    return (coords["dp_replicate"] * sizes["dp_shard"] + coords["dp_shard"]) * sizes["ep"] + coords[
        "ep"
    ]


class LocalEngine:
    """One model per rank (plain, or sharded by FSDP2 / EP): the model runs whole on each rank."""

    def __init__(self, prep: Prepared, mesh, rank: int, device) -> None:
        from am_dtype import resolve_dtype

        self.prep, self.rank, self.device = prep, rank, device
        self.module, cp_root = build_model(prep.recipe, prep.config, prep.spec, prep.backend,
                                           prep.plan, mesh, rank)  # fmt: skip
        dtype = resolve_dtype(prep.recipe.model.dtype)
        self.runner = BatchRunner(self.module, prep.spec, prep.config, device, dtype, cp_root,
                                  cp_grads_reduced=prep.plan.use_fsdp)  # fmt: skip

    def train_step(self, batches, optimizer, max_grad_norm):
        return _train_step(self.runner, batches, self.prep.plan, optimizer, max_grad_norm)

    def evaluate(self, batches) -> float:
        return _evaluate(self.runner, batches)

    def export(self, tokenizer, recipe_yaml, directory, rank):
        return export_hf(self.module, tokenizer, recipe_yaml, directory, rank)


class PipelineEngine:
    """This rank's pipeline stages (am-pp); see `pipeline.py`."""

    def __init__(self, prep: Prepared, mesh, rank: int, device) -> None:
        from torch import nn

        from am_automodel.pipeline import build_pipeline

        self.prep, self.group = prep, mesh["pp"].get_group()
        self.pp = build_pipeline(prep.recipe, prep.config, prep.spec, prep.backend, prep.plan,
                                 mesh, device)  # fmt: skip
        stages = self.pp.stages
        self.module = stages[0] if len(stages) == 1 else nn.ModuleList(stages)

    def train_step(self, batches, optimizer, max_grad_norm):
        from am_automodel.pipeline import pipeline_train_step

        return pipeline_train_step(self.pp, batches, optimizer, max_grad_norm, self.group,
                                   self.prep.plan.data_size)  # fmt: skip

    def evaluate(self, batches) -> float:
        from am_automodel.pipeline import pipeline_eval

        k = self.prep.recipe.train.grad_accum  # the schedule takes whole global batches
        merged = [
            {key: torch.cat([b[key] for b in batches[i : i + k]]) for key in batches[i]}
            for i in range(0, len(batches), k)
        ]
        return pipeline_eval(self.pp, merged)

    def export(self, tokenizer, recipe_yaml, directory, rank):
        from am_automodel.pipeline import gather_full_state_dict

        full = gather_full_state_dict(self.pp, self.group)
        with torch.device("cpu"):
            plain = self.prep.spec.build(self.prep.config, self.prep.backend)
        plain.load_state_dict(full)
        return export_hf(plain, tokenizer, recipe_yaml, directory, rank)
