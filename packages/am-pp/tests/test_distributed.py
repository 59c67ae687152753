"""Gloo pipelines equal one process: loss and every parameter gradient.

Tiny transformers Llama, Qwen3 (sliding + full layers), Mistral3 (Pixtral tower, two images
in the global batch), Gemma 4 MoE text and Gemma 4 VLM (images) run as 2-stage 1F1B and
2 ranks x 2 virtual stages Interleaved1F1B (2 ranks), and as 4-stage 1F1B (4 ranks), each
built on the meta device and given the reference's weights; Llama also under the
zero-bubble, V-shaped and looped schedules, Qwen3 under GPipe from a real (CPU) model.
Packed rows, left padding differing per microbatch (an explicit attention_mask), and the
E2B-like Gemma 4 (per-layer inputs, K/V shared across stage boundaries) run with 2 and 4
stages. The first rank of each pipeline computes the reference (the unsplit transformers
model on the whole global batch, token-mean cross entropy with ignored targets) and
broadcasts it; every rank compares its own stages' gradients with it; the eval loss and the
mask builds per stage are checked too.

One spawn of 4 ranks runs it all (starting a rank, importing torch and transformers, costs
more than its cases): ranks {0, 1} and {2, 3} each run half of the 2-rank cases as two
independent 2-rank pipelines (their own process groups) at once, then all 4 ranks the
4-stage cases."""

from __future__ import annotations

import pytest
from _pp_models import CASES
from _pp_workers import run_in_groups

from am_dtype.testing import run_distributed
from am_pp import get_schedule_spec

# gemma4_e2b (per-layer inputs, K/V sharing across stages) runs in the cases below only.
MODELS = sorted(set(CASES) - {"gemma4_e2b"})
LOSS_RTOL = 2e-6
GRAD_RTOL = 1e-5  # relative L2 error of each parameter's gradient


def _num_stages(schedule: str, pp_size: int) -> int:
    return pp_size * (2 if get_schedule_spec(schedule).multi else 1)


def _check(results: list[dict], case: tuple, num_stages: int) -> None:
    """One case's results from every rank of its pipeline."""
    label = f"{case[0]} {case[1]} on {len(results)} ranks"
    stages = sorted(s for r in results for s in r["stage_indices"])
    assert stages == list(range(num_stages)), (label, stages)
    ref = results[0]["ref_loss"]
    v_shaped = results[0]["mask_builds"] is None  # no eval (PipelinedModel.eval_step)
    for key in ("loss",) if v_shaped else ("loss", "eval_loss"):
        losses = [r[key] for r in results if r[key] is not None]
        assert len(losses) == 1, label  # exactly the last stage's rank reports it
        assert abs(losses[0] - ref) <= LOSS_RTOL * abs(ref), (label, key, losses[0], ref)
    names = [n for r in results for n in r["grad_errors"]]
    assert len(names) == len(set(names)) == results[0]["n_ref_params"], label
    worst = max((err, n) for r in results for n, err in r["grad_errors"].items())
    assert worst[0] <= GRAD_RTOL, (label, worst)
    # Mask builds per stage in one forward pass over the batch: none without padding or
    # packing (the cached mask), one per microbatch with them.
    if not v_shaped:
        builds = [b for r in results for b in r["mask_builds"]]
        assert builds == [case[2] if any(case[5:7]) else 0] * num_stages, (label, builds)


# (name, schedule, microbatches, batch, from_meta, packed, padded). Padded: left padding that
# differs per microbatch (the mask travels to, and is rebuilt on, every stage). gemma4_e2b:
# per-layer inputs + K/V sharing across the stage boundaries (with 2 x 2 virtual stages the
# full-attention K/V pass through layer 2's stage unchanged).
_PADDED_2 = [("llama", "1F1B", 4, 4, True, False, True), ("gemma4_e2b", "1F1B", 4, 4, True)]
_PADDED_4 = [
    ("qwen3", "Interleaved1F1B", 4, 4, True, False, True),
    ("gemma4_e2b", "Interleaved1F1B", 4, 4, True, False, True),
]


def _two_rank_cases() -> list[tuple]:
    cases = [(m, "1F1B", 4, 4, True) for m in MODELS]
    cases += [(m, "Interleaved1F1B", 4, 4, True) for m in MODELS]
    # The other schedules torch provides (zero-bubble: split input/weight backward; V: rank
    # r holds stages r and 2p-1-r), and a real (not meta) source model once.
    extra = ("ZBVZeroBubble", "DualPipeV", "InterleavedZeroBubble", "LoopedBFS")
    cases += [("llama", s, 4, 4, True) for s in extra] + [("qwen3", "GPipe", 4, 4, False)]
    # Packed rows: position_ids travel with the hidden states to every stage.
    packed = [("llama", "1F1B", 4, 4, True, True), ("qwen3", "Interleaved1F1B", 4, 4, True, True)]
    return cases + packed + _PADDED_2 + _PADDED_4


def _four_rank_cases() -> list[tuple]:
    cases = [(m, "1F1B", 4, 4, True) for m in MODELS]
    return cases + [("llama", "1F1B", 4, 4, True, False, True), ("gemma4_e2b", "1F1B", 4, 4, True)]


@pytest.mark.distributed
@pytest.mark.slow
def test_pipelines_on_two_and_four_ranks_equal_one_process():
    two = _two_rank_cases()
    plan = [([0, 1], two[0::2]), ([2, 3], two[1::2]), ([0, 1, 2, 3], _four_rank_cases())]
    per_rank = run_distributed(run_in_groups, 4, plan, timeout_s=400)
    checked = 0
    for entry, (ranks, cases) in enumerate(plan):
        assert all(per_rank[r][entry] is None for r in range(4) if r not in ranks)
        for i, case in enumerate(cases):
            results = [per_rank[r][entry][i] for r in ranks]
            _check(results, case, _num_stages(case[1], len(ranks)))
            checked += 1
    assert checked == len(two) + len(_four_rank_cases()) == 28
