"""Expert parallelism on real gloo ranks: output, loss and every gradient equal one process.

The ranks run all checks in two spawns (2 and 4 ranks, shared with test_parallelizer.py and
test_fsdp_mixin.py through `workers.results`); each test asserts on one check's result.
Each check compares against a single-process run on the global batch: float64 at 1e-12 with
the "torch" experts loop, and float32 at 1e-4/1e-5 for Nemotron-style routing (sigmoid, expert
groups, correction bias, relu2) on the default CPU "torch_mm" grouped-mm backend.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by name
import _am_moe_ep_workers as workers  # noqa: E402

# Each spawn costs 10-60 s of process start-up on a busy 2-core machine; the checks are cheap.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_all_to_all_dispatcher_matches_reference():
    res = workers.check_ok(2, "dispatcher")
    # Under "to_first_half" routing rank 1 (experts 4..7) receives no rows at all,
    # and (having no tokens of its own) sends nothing.
    assert res[1]["uneven"]["rows_received"] == 0 < res[0]["uneven"]["rows_received"]
    assert res[1]["uneven"]["dispatch_bytes"] == 0
    assert all(r["uniform"]["rows_received"] > 0 for r in res)
    for r in res:
        assert (
            "num_experts=9 is not divisible by the expert-parallel size 2"
            in (r["indivisible_error"])
        )


@pytest.mark.parametrize("check", ["model_ep2", "model_ep2_uneven", "model_ep2_nemotron_torch_mm"])
def test_ep2_model_matches_single_process(check):
    res = workers.check_ok(2, check)
    assert all(r["dispatcher"] == "AllToAllDispatcher" for r in res)
    assert all(r["local_experts"] == 4 for r in res)
    # relu2 shared experts have no gate_proj: 2 params fewer than SwiGLU.
    assert all(r["n_params"] == (18 if "nemotron" in check else 20) for r in res)
    if check.endswith("uneven"):
        assert res[0]["zero_grad_experts"] == 6  # experts 2..7 got no tokens


@pytest.mark.parametrize("check", ["model_ep4", "model_ep4_uneven"])
def test_ep4_model_matches_single_process(check):
    res = workers.check_ok(4, check)
    assert all(r["local_experts"] == 2 for r in res)
    if check.endswith("uneven"):
        assert res[0]["zero_grad_experts"] == 6  # EP ranks 1..3 receive no rows


def test_async_dispatch_gives_the_sync_numbers_and_overlaps():
    # dispatcher_async_dispatch=True: the token all-to-all is issued with async_op and the
    # shared experts run before it is waited for; outputs and every gradient are the
    # synchronous path's, bit for bit (and both equal one process, checked in the worker).
    sync, asynchronous = (
        workers.check_ok(2, "model_ep2_sync"),
        workers.check_ok(2, "model_ep2_async"),
    )
    for s, a in zip(sync, asynchronous, strict=True):
        assert s["async_calls"] == 0 and a["async_calls"] == 1  # one forward of this block
        assert a["outputs"] == s["outputs"]
        assert a["grads"] == s["grads"]
