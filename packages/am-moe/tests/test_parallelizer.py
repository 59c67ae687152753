"""parallelize_model: a 2x2 (dp x ep) mesh with FSDP2 and activation checkpointing equals one
process; bad meshes and expert counts raise clear errors. Multi-rank results come from the
shared spawns in `_am_moe_ep_workers` (see test_ep.py)."""

from __future__ import annotations

import os
import sys

import pytest
from torch import nn

from am_moe.parallelizer import _find_block_container

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by name
import _am_moe_ep_workers as workers  # noqa: E402


# Each spawn costs 10-60 s of process start-up on a busy 2-core machine; the checks are cheap.
def spawned(test):
    return pytest.mark.distributed(pytest.mark.slow(test))


@spawned
def test_dp2_ep2_fsdp_with_activation_checkpointing_matches_single_process():
    res = workers.check_ok(4, "model_dp2_ep2_ac")
    assert all(r["local_experts"] == 4 and r["n_params"] == 20 for r in res)


@spawned
def test_mixed_precision_policy_runs_experts_in_fp32():
    # A float64 model under MixedPrecisionPolicy(float32, float32) over EP=2: float32 output,
    # equal to the float64 single-process result at float32 tolerance.
    res = workers.check_ok(2, "model_ep2_fp32_compute")
    assert all(r["dispatcher"] == "AllToAllDispatcher" for r in res)


@spawned
def test_parallelize_errors_name_the_bad_values():
    for r in workers.check_ok(2, "errors"):
        assert (
            "n_routed_experts=5 is not divisible by the expert-parallel size ep=2"
            in (r["indivisible"])
        )
        assert "no axes ['expert']" in r["missing_axis"] and "['dp', 'ep']" in r["missing_axis"]


@spawned
def test_meta_device_model_parallelizes_and_materializes():
    for r in workers.check_ok(2, "meta_init"):
        assert r["global_shape"] == (8, 8, 12) and r["finite_grads"]


def test_block_container_discovery():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.head = nn.Linear(2, 2)

    outer = Outer()
    assert _find_block_container(outer, None) is outer.model.layers
    assert _find_block_container(outer, "model.layers") is outer.model.layers
    assert _find_block_container(nn.Linear(2, 2), None) is None
    with pytest.raises(ValueError, match="block_container='head' is a Linear"):
        _find_block_container(outer, "head")
