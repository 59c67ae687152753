"""am-pp on our Nemotron-H with MTP: gloo pipelines equal one process (loss and every gradient).

am-pp does not depend on am-models-nemotron, so this cross-package test lives here. The
model keeps its own PP-aware forward (`_pp_keep_self_forward`); `am_pp.pipeline_model`
calls its `customize_pipeline_stage_modules` hook (MTP pinned to the last stage) and
`get_pipeline_stage_metas` hook (static stage shapes, 1 + D tensors between stages).
2 ranks run 2-stage 1F1B and 2 x 2 virtual stages Interleaved1F1B; 4 ranks 4-stage 1F1B;
each unpadded and with a left-padded batch (an attention_mask), all in one spawn.
"""

from __future__ import annotations

import pytest
import torch
from _pp_nemotron_workers import run_plan as run_pp_plan

from am_dtype.testing import run_distributed


def _batch():
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, 4] = -100
    return ids, labels


def _check(results: list[dict], schedule: str, num_stages: int) -> None:
    assert sorted(s for r in results for s in r["stage_indices"]) == list(range(num_stages))
    # The hook put MTP on the last stage only.
    owners = [
        s for r in results for s, m in zip(r["stage_indices"], r["has_mtp"], strict=True) if m
    ]
    assert owners == [num_stages - 1], (schedule, owners)
    (loss,) = [r["loss"] for r in results if r["loss"] is not None]
    ref = results[0]["ref_loss"]
    assert abs(loss - ref) <= 2e-6 * abs(ref), (schedule, loss, ref)
    names = [n for r in results for n in r["grad_errors"]]
    assert len(names) == len(set(names)) == results[0]["n_params"]
    assert any(n.startswith("mtp.layers.") for n in names)
    worst = max((e, n) for r in results for n, e in r["grad_errors"].items())
    assert worst[0] <= 1e-5, (schedule, worst)


@pytest.mark.distributed
@pytest.mark.slow
def test_nemotron_mtp_pipelines_equal_one_process_unpadded_and_padded():
    """One spawn of 4 ranks: ranks {0, 1} run 2-stage 1F1B and 2 x 2 virtual stages
    Interleaved1F1B unpadded while ranks {2, 3} run them on a left-padded batch (a different
    padding per microbatch), then all 4 ranks 4-stage 1F1B, unpadded and padded. Padded,
    every stage's attention, Mamba and MoE blocks and the MTP heads see the padding (am-pp
    carries the attention_mask with the stage outputs, also through the middle stages), so
    loss and gradients equal one process's."""
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    for row, pads in enumerate([0, 3, 1, 5]):
        mask[row, :pads] = 0
    labels = labels.masked_fill(mask == 0, -100)
    two = [("1F1B", 4), ("Interleaved1F1B", 4)]
    plan = [
        ([0, 1], two, False),
        ([2, 3], two, True),
        ([0, 1, 2, 3], [("1F1B", 4)], False),
        ([0, 1, 2, 3], [("1F1B", 4)], True),
    ]
    per_rank = run_distributed(run_pp_plan, 4, ids, labels, mask, plan, timeout_s=400)
    for entry, (ranks, cases, padded) in enumerate(plan):
        for i, (schedule, _) in enumerate(cases):
            results = [per_rank[r]["results"][entry][i] for r in ranks]
            stages = len(ranks) * (2 if schedule == "Interleaved1F1B" else 1)
            _check(results, f"{schedule} on {len(ranks)} ranks, padded={padded}", stages)
    # The mask changes the loss: a stage that dropped it would not match the reference.
    ref = per_rank[2]["results"][1][0]["ref_loss"]
    assert abs(per_rank[0]["padded_labels_unmasked_loss"] - ref) > 1e-3 * abs(ref)
