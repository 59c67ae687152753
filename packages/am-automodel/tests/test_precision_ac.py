"""Short training runs with `parallelism.mixed_precision: bf16` and with
`parallelism.activation_checkpointing: true` (one process, the tiny Nemotron-H).

- bf16: FSDP2's MixedPrecisionPolicy computes with bf16 parameters (seen inside the forward)
  while the optimizer's master weights stay fp32; the loss is finite and falls.
- activation checkpointing: every block runs its forward a second time in backward (counted),
  and the losses equal the run without it within 1e-6 (fp32 recompute of the same ops;
  measured bit-identical).
"""

from __future__ import annotations

import math

import pytest
import torch
from automodel_helpers import tiny_raw

from am_automodel.recipe import build_recipe
from am_automodel.train import run
from am_models_nemotron.layers import NemotronBlock

STEPS = 6


def _raw(run_dir, **parallelism) -> dict:
    raw = tiny_raw(run_dir, train={"steps": STEPS, "eval_every": 0},
                   checkpoint={"every": 0, "export_final": False})  # fmt: skip
    raw["parallelism"] = parallelism
    return raw


@pytest.fixture
def block_calls(monkeypatch):
    """Records the dtype of a block's first parameter at every NemotronBlock.forward call."""
    calls: list[torch.dtype] = []
    forward = NemotronBlock.forward

    def counting(self, *args, **kwargs):
        calls.append(next(self.parameters()).dtype)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(NemotronBlock, "forward", counting)
    return calls


def test_bf16_mixed_precision_trains_with_fp32_master_weights(tmp_path, block_calls) -> None:
    result = run(build_recipe(_raw(tmp_path / "bf16", mixed_precision="bf16")))
    losses = [result.losses[s] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # master weights
    assert block_calls and set(block_calls) == {torch.bfloat16}  # compute


def test_activation_checkpointing_recomputes_and_keeps_the_losses(tmp_path, block_calls) -> None:
    plain = run(build_recipe(_raw(tmp_path / "plain")))
    plain_calls = len(block_calls)
    block_calls.clear()
    ac = run(build_recipe(_raw(tmp_path / "ac", activation_checkpointing=True)))
    # 4 blocks per forward, STEPS training forwards and one eval batch at the end; with AC
    # each training forward runs again in backward (eval has no backward)
    assert plain_calls == 4 * (STEPS + 1), plain_calls
    assert len(block_calls) == 4 * (2 * STEPS + 1), len(block_calls)
    for step, loss in plain.losses.items():
        assert abs(ac.losses[step] - loss) <= 1e-6, (step, ac.losses[step], loss)
    assert plain.losses[STEPS] < plain.losses[1] - 0.3
