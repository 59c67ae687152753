"""SIGKILL in the middle of training, and again in the middle of a checkpoint save; resume
(`checkpoint.resume: auto`): every step's loss after the resume equals the uninterrupted run's
bit for bit (CPU, fp32, one thread in every process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from automodel_helpers import tiny_raw

from am_automodel.checkpoint import FAULT_ENV
from am_automodel.recipe import build_recipe
from am_automodel.train import run

STEPS = 8


def _raw(run_dir):
    return tiny_raw(
        run_dir, train={"steps": STEPS, "eval_every": 4}, checkpoint={"every": 2, "keep_last": 2}
    )


def _start(run_dir, tmp_path, fault: str | None = None) -> subprocess.Popen:
    recipe = tmp_path / f"{run_dir.name}.yaml"
    recipe.write_text(yaml.safe_dump(_raw(run_dir)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "am_automodel", "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _logged(run_dir) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_in_training_and_in_a_save_then_resume_is_bit_identical(
    tmp_path, one_thread
) -> None:
    # Both interrupted runs start at once and the reference runs in this process meanwhile:
    # each process has one thread, so the three share the two cores instead of taking turns
    # on one (their numbers do not depend on the load).
    killed, in_save = tmp_path / "killed_in_training", tmp_path / "killed_in_save"
    proc = _start(killed, tmp_path)
    # 2. killed by itself in the middle of the step-6 save (shards written, not committed)
    proc_in_save = _start(in_save, tmp_path, fault="save:6")

    # 1. killed from outside while training (after the step-4 checkpoint, before the end)
    deadline = time.monotonic() + 600
    while max(_logged(killed), default=0) < 5:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = _logged(killed)
    assert max(before) < STEPS, "the run finished before it was killed"

    reference = run(build_recipe(_raw(tmp_path / "reference")))
    assert sorted(reference.losses) == list(range(1, STEPS + 1))
    assert all(before[s] == reference.losses[s] for s in before)  # same numbers in another process

    assert proc_in_save.wait(timeout=600) == -signal.SIGKILL, proc_in_save.stdout.read()
    names = sorted(p.name for p in (in_save / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004", "step_00000006.tmp"], names

    for run_dir, last_good in ((killed, None), (in_save, 4)):
        complete = sorted(
            p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp" not in p.name
        )
        resumed = run(build_recipe(_raw(run_dir)))
        start = int(complete[-1].split("_")[1])
        assert last_good is None or start == last_good
        assert resumed.start_step == start and sorted(resumed.losses) == list(
            range(start + 1, STEPS + 1)
        )
        for step, loss in resumed.losses.items():
            assert loss == reference.losses[step], (
                run_dir.name,
                step,
                loss,
                reference.losses[step],
            )
        for step, loss in resumed.eval_losses.items():
            assert loss == reference.eval_losses[step], (run_dir.name, "eval", step)
        # the metrics file now tells one history, equal to the uninterrupted run's
        assert _logged(run_dir) == reference.losses
        assert not list((run_dir / "checkpoints").glob("*.tmp"))
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
            "step_00000006",
            "step_00000008",
        ]
