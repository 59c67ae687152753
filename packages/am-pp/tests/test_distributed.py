"""N gloo processes equal one process: loss and every parameter gradient.

Tiny transformers Llama, Qwen3 (sliding + full layers), Mistral3 (Pixtral tower, two images
in the global batch), Gemma 4 MoE text and Gemma 4 VLM (images) run as 2-stage 1F1B and
2 ranks x 2 virtual stages Interleaved1F1B (2 ranks), and as 4-stage 1F1B (4 ranks), each
built on the meta device and given the reference's weights; Llama also under the
zero-bubble, V-shaped and looped schedules, Qwen3 under GPipe from a real (CPU) model. Every rank also computes the
reference (the unsplit transformers model on the whole global batch, token-mean cross
entropy with ignored targets) and compares its own stages' gradients with it.
"""

from __future__ import annotations

import pytest
from _pp_models import CASES
from _pp_workers import run_cases

from am_dtype.testing import run_distributed

MODELS = sorted(CASES)
LOSS_RTOL = 2e-6
GRAD_RTOL = 1e-5  # relative L2 error of each parameter's gradient


def _check(per_rank: list[list[dict]], cases: list[tuple], num_stages: int) -> None:
    for i, case in enumerate(cases):
        results = [rank_results[i] for rank_results in per_rank]
        label = f"{case[0]} {case[1]}"
        stages = sorted(s for r in results for s in r["stage_indices"])
        assert stages == list(range(num_stages)), (label, stages)
        losses = [r["loss"] for r in results if r["loss"] is not None]
        assert len(losses) == 1, label  # exactly the last stage's rank reports it
        ref = results[0]["ref_loss"]
        assert abs(losses[0] - ref) <= LOSS_RTOL * abs(ref), (label, losses[0], ref)
        names = [n for r in results for n in r["grad_errors"]]
        assert len(names) == len(set(names)) == results[0]["n_ref_params"], label
        worst = max((err, n) for r in results for n, err in r["grad_errors"].items())
        assert worst[0] <= GRAD_RTOL, (label, worst)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_1f1b_and_interleaved_equal_one_process():
    cases = [(m, "1F1B", 4, 4, True) for m in MODELS]
    cases += [(m, "Interleaved1F1B", 4, 4, True) for m in MODELS]
    # The other schedules torch provides (zero-bubble: split input/weight backward; V: rank
    # r holds stages r and 2p-1-r), and a real (not meta) source model once.
    extra = [(s, 4) for s in ("ZBVZeroBubble", "DualPipeV", "InterleavedZeroBubble", "LoopedBFS")]
    cases += [("llama", s, 4, 4, True) for s, _ in extra] + [("qwen3", "GPipe", 4, 4, False)]
    # Packed rows: position_ids travel with the hidden states to every stage.
    cases += [("llama", "1F1B", 4, 4, True, True), ("qwen3", "Interleaved1F1B", 4, 4, True, True)]
    per_rank = run_distributed(run_cases, 2, cases, timeout_s=300)
    n = len(MODELS)
    _check([r[:n] for r in per_rank], cases[:n], 2)
    _check([r[n : 2 * n + len(extra)] for r in per_rank], cases[n : 2 * n + len(extra)], 4)
    _check([r[-3:-2] for r in per_rank], cases[-3:-2], 2)
    _check([r[-2:-1] for r in per_rank], cases[-2:-1], 2)
    _check([r[-1:] for r in per_rank], cases[-1:], 4)


@pytest.mark.distributed
@pytest.mark.slow
def test_four_stage_1f1b_equals_one_process():
    cases = [(m, "1F1B", 4, 4, True) for m in MODELS]
    per_rank = run_distributed(run_cases, 4, cases, timeout_s=300)
    _check(per_rank, cases, 4)
