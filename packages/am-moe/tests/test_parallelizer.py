"""parallelize_model: a 2x2 (dp x ep) mesh with FSDP2 and activation checkpointing equals one
process; bad meshes and expert counts raise clear errors. Multi-rank results come from the
shared spawns in `_am_moe_ep_workers` (see test_ep.py)."""

from __future__ import annotations

import os
import sys

import pytest
from torch import nn

from am_moe.parallelizer import _find_block_containers

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
        assert (
            r["bad_replicate"] == "dp_replicate_axis_name='rep' must be one of dp_axis_names ['dp']"
        )


@spawned
def test_a_rank_without_moe_blocks_creates_the_same_process_groups():
    # ep=2, rank 1's model has no MoE (a pipeline stage): a group made after parallelize_model
    # by both ranks works (it hung when only MoE ranks flattened the experts' data mesh).
    res = workers.check_ok(2, "no_moe_rank")
    assert [r["sum"] for r in res] == [2.0, 2.0]


@spawned
def test_meta_device_model_parallelizes_and_materializes():
    for r in workers.check_ok(2, "meta_init"):
        assert r["global_shape"] == (8, 8, 12) and r["finite_grads"]


@spawned
def test_custom_mesh_axis_names_dp2_ep2_match_single_process():
    # ("data", "expert") instead of ("dp", "ep"): every helper reads the names it is given.
    res = workers.check_ok(4, "model_dp2_ep2_custom_axes")
    assert all(r["local_experts"] == 4 and r["n_params"] == 20 for r in res)


@spawned
def test_hsdp_replicate_axis_with_ep2_matches_single_process():
    # (rep=2, dp=1, ep=2): whole replicas on the 2-D (replicate, shard) FSDP mesh, experts split
    # over ep inside each replica; outputs, loss and every gradient equal one process.
    res = workers.check_ok(4, "model_hsdp2_ep2")
    assert all(r["local_experts"] == 4 and r["n_params"] == 20 for r in res)


@spawned
def test_vlm_language_blocks_are_found_behind_a_vision_tower():
    for r in workers.check_ok(2, "vlm_custom_axes"):
        # (FSDP unit, checkpoint-wrapped) for every block of both stacks.
        assert r["language"] == [(True, True)] * 2
        assert r["vision"] == [(True, True)] * 2
        # Experts: Shard(0) over "expert" (EP), then FSDP over "data".
        assert r["expert_mesh"] == ("data", "expert")


def _stack(n=2):
    return nn.ModuleList(nn.Linear(2, 2) for _ in range(n))


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _stack()


class _FakeVLM(nn.Module):
    """Vision tower (with `.layers`) registered before the language model; MTP after."""

    def __init__(self):
        super().__init__()
        self.vision_tower = _Tower()
        self.language_model = _Tower()
        self.mtp = nn.Module()
        self.mtp.layers = nn.ModuleDict({"0": _Tower()})  # an MTP block holding its own stack
        self.head = nn.Linear(2, 2)


def test_every_outermost_layers_stack_is_found_in_module_order():
    m = _FakeVLM()
    found = _find_block_containers(m, None)
    assert found == [m.vision_tower.layers, m.language_model.layers, m.mtp.layers]
    # The stack inside an MTP block belongs to that block: not a separate stack.
    assert all(c is not m.mtp.layers["0"].layers for c in found)


def test_named_block_containers():
    m = _FakeVLM()
    assert _find_block_containers(m, "language_model.layers") == [m.language_model.layers]
    assert _find_block_containers(m, ["language_model.layers", "mtp.layers"]) == [
        m.language_model.layers,
        m.mtp.layers,
    ]
    assert _find_block_containers(nn.Linear(2, 2), None) == []
    with pytest.raises(ValueError, match="block_container='head' is a Linear"):
        _find_block_containers(m, "head")
