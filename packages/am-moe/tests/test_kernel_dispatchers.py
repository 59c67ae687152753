"""DeepEP, HybridEP and UCCL-EP dispatchers on two gloo ranks, against emulated libraries.

The real kernels need CUDA; here each library's public Python API is replaced by an
emulation on torch.distributed (see `_am_moe_kernel_ep_workers`), so what is checked is our
glue: the layout and top-k handed to the library, local expert ids, the handle passed back
to combine, weights applied once, and the backward wiring (dispatch <-> combine). Every
dispatcher must match the single-process result (outputs, gradients of tokens, routing
weights and expert weights) with uniform and uneven routing and masked tokens, and an EP=2
MoE model must match one process in output, loss and every parameter gradient. All checks
run in one spawn of two ranks; each test asserts on one check's result.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by name
import _am_moe_kernel_ep_workers as workers  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LIBRARY = {"deepep": "deep_ep", "hybridep": "hybrid_ep", "uccl_ep": "uccl"}


def _comm_calls(payload: dict) -> dict:
    """{library.op.dtype: count} of dispatch/combine calls (buffer construction left out)."""
    return {k: n for k, n in payload["calls"].items() if ".__init__." not in k}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_dispatcher_matches_reference_in_float64(name):
    res = workers.check_ok(f"{name}_uniform")
    assert all(r["rows_received"] > 0 for r in res)
    lib = LIBRARY[name]
    for r in res:
        # Forward dispatch + combine, backward cached dispatch + combine, all in float64
        # (comm_dtype=None) and all through this backend's own library.
        assert _comm_calls(r) == {f"{lib}.dispatch.float64": 2, f"{lib}.combine.float64": 2}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_dispatcher_uneven_routing_rank_receives_nothing(name):
    res = workers.check_ok(f"{name}_uneven")
    assert res[1]["rows_received"] == 0 < res[0]["rows_received"]


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_dispatcher_sends_bf16_by_default(name):
    res = workers.check_ok(f"{name}_bf16")
    lib = LIBRARY[name]
    for r in res:
        assert _comm_calls(r) == {f"{lib}.dispatch.bfloat16": 2, f"{lib}.combine.bfloat16": 2}


@pytest.mark.parametrize("uneven", [False, True], ids=["uniform", "uneven"])
@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_ep2_model_matches_single_process(name, uneven):
    res = workers.check_ok(f"{name}_model_uneven" if uneven else f"{name}_model")
    assert all(r["n_params"] == 20 for r in res)
    if uneven:
        assert res[0]["zero_grad_experts"] == 6  # experts 2..7 get no tokens


def test_dispatcher_errors_name_the_bad_value():
    for r in workers.check_ok("errors"):
        for name in LIBRARY:
            assert (
                "num_experts=9 is not divisible by the expert-parallel size 2"
                in (r[f"{name}_indivisible"])
            )
        assert "dispatcher_num_sms=7 must be even" in r["odd_sms"]
