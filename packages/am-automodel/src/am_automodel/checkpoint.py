"""Resumable training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint `RUN/checkpoints/step_00000040/` holds the DCP shards of the model and optimizer
(every rank writes its own shards) and one `trainer_rank{r}.pt` per rank with the scheduler,
the data position and that rank's RNG states. Every save goes to `step_N.tmp/` first; rank 0
renames it to `step_N/` only after every rank finished writing (the commit point), then
prunes old checkpoints to `keep_last`. A run killed during a save leaves a `.tmp` directory
that is never loaded (and is removed by the next run), so the last good checkpoint survives.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from am_automodel.recipe import RecipeError

__all__ = ["Checkpointer", "FAULT_ENV", "rng_state", "set_rng_state"]

# Under pipeline parallelism the optimizer state is keyed by parameter name ("state.<fqn>.
# exp_avg", "param_groups.<fqn>.lr") rather than by group index: the stages hold different
# parameters in groups of the same index, and DCP would keep one rank's `param_groups.0` for
# all of them (the others then load without their lr, betas, ...). Not by default: a save
# then costs about 2.5x the CPU time (one DCP item per parameter and state).
_BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Fault injection for tests: "save:N" SIGKILLs this process in the middle of the save at
# step N (after the shards are written, before the commit rename).
FAULT_ENV = "AM_AUTOMODEL_FAULT"


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA when present, Python's random)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _maybe_fault(step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Checkpointer:
    """Save, find and load complete checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int,
                 optimizer_by_name: bool = False) -> None:  # fmt: skip
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.optim_options = _BY_NAME if optimizer_by_name else None

    # ------------------------------------------------------------------ discovery
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a `.tmp` directory is never complete)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def resolve_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: newest complete (`auto`), none (`never`), or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            found = self.complete()
            return found[-1] if found else None
        path = Path(resume)
        if not (path / ".metadata").is_file():
            raise RecipeError(
                f"checkpoint.resume = {resume!r}: not a complete checkpoint directory "
                "(expected auto, never, or a RUN/checkpoints/step_N directory)"
            )
        return path

    def remove_partial(self) -> None:
        """Delete `.tmp` leftovers of saves that were killed (rank 0)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.glob("step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, model, optimizer, scheduler, loader) -> Path:
        """Write checkpoint `step` atomically; returns its final directory."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=self.optim_options),
        }
        dcp.save(state, checkpoint_id=str(tmp))
        trainer = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": rng_state(),
        }
        part = tmp / f"trainer_rank{self.rank}.pt.part"
        torch.save(trainer, part)
        os.replace(part, tmp / f"trainer_rank{self.rank}.pt")
        _maybe_fault(step)
        _barrier()
        if self.rank == 0:
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler, loader) -> int:
        """Restore everything `save` wrote; returns the step the checkpoint was taken after."""
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=self.optim_options),
        }
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"], options=self.optim_options)
        mine = path / f"trainer_rank{self.rank}.pt"
        if not mine.is_file():
            raise RecipeError(
                f"checkpoint {str(path)!r} has no {mine.name}: it was written by a run with a "
                "different world size"
            )
        trainer = torch.load(mine, weights_only=False)
        scheduler.load_state_dict(trainer["scheduler"])
        loader.load_state_dict(trainer["loader"])
        set_rng_state(trainer["rng"])
        return int(trainer["step"])
