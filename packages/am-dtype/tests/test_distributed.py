"""Real multi-process checks on gloo: the harness itself and casting FSDP2-sharded models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from am_dtype.testing import free_port, run_distributed

sys.path.insert(0, str(Path(__file__).parent))
import am_dtype_dist_workers as workers  # noqa: E402

# Ranks are forked from a forkserver with torch imported: ~1 s per run once it is up.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def fsdp_results() -> list[dict]:
    return run_distributed(workers.fsdp_cast_checks, 2, timeout_s=240)


def test_ranks_agree(fsdp_results):
    assert len(fsdp_results) == 2
    assert fsdp_results[0]["dtypes"] == fsdp_results[1]["dtypes"]
    assert fsdp_results[0]["has_dtensor"] and not fsdp_results[0]["dtensor_unallocated"]


@pytest.mark.parametrize("rank", [0, 1])
def test_strict_modules_restored_non_strict_only_buffers(fsdp_results, rank):
    res = fsdp_results[rank]
    assert res["router_type"] == "DTensor"
    assert res["dtypes"] == {
        "proj.weight": "bfloat16",
        "proj.bias": "bfloat16",
        "norm.weight": "bfloat16",  # non-strict hint: parameter shares the root unit
        "norm.shift": "float32",  # ... but its buffer is restored
        "router.weight": "float32",  # strict, its own FSDP unit
        "router.correction_bias": "float32",
    }
    assert res["exact"] == {
        "router.weight": True,
        "router.correction_bias": True,
        "norm.shift": True,
        "norm.weight_is_bf16_rounding": True,
    }


def test_sharded_forward_backward_after_cast(fsdp_results):
    for res in fsdp_results:
        # Same math as the unsharded reference; only summation order may differ.
        assert res["forward_max_err"] <= 1e-5
        assert res["grad_dtypes"] == {
            "router.weight": "torch.float32",
            "proj.weight": "torch.bfloat16",
        }
        assert res["grads_finite"]


def test_sharded_guards(fsdp_results):
    res = fsdp_results[0]
    assert (
        "DTensor" in res["restore_modules_error"] and "norm.weight" in res["restore_modules_error"]
    )
    assert "'router'" in res["not_isolated_error"] and "fully_shard" in res["not_isolated_error"]


def test_yield_fp32_model_on_a_sharded_model(fsdp_results):
    res = fsdp_results[0]
    assert res["inside_yield"] == ["float32"]
    assert res["after_yield"] == res["dtypes"]
    assert res["after_yield_router_exact"]


def test_skip_modules_and_frozen_cast_on_sharded_models(fsdp_results):
    res = fsdp_results[0]
    assert res["skip_dtypes"]["router.weight"] == "float32" and res["skip_router_exact"]
    assert res["skip_dtypes"]["proj.weight"] == "bfloat16"
    assert res["skip_forward_ok"]
    frozen = res["frozen_dtypes"]
    assert frozen["proj.weight"] == "float32"  # sharded: left to FSDP's all-gather
    assert frozen["proj.scale"] == "bfloat16"  # buffers are always cast
    assert frozen["norm.weight"] == "float32"  # trainable


def test_failure_on_one_rank_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError) as err:
        run_distributed(workers.fail_on_rank_one, 2, "rank one broke", timeout_s=60)
    msg = str(err.value)
    assert "rank 1:" in msg and "ValueError: rank one broke" in msg and "rank 0:" not in msg


def test_ranks_see_the_callers_current_environment_and_sys_path(tmp_path, monkeypatch):
    """The forkserver keeps the environment and sys.path of its start (an earlier test's):
    each rank gets the caller's as of the call, as a spawned interpreter would."""
    run_distributed(workers.report_rank, 1, "start the forkserver first")
    (tmp_path / "caller_only_module.py").write_text("VALUE = 'imported'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AM_DTYPE_TEST_CALLER_ENV", "set after the forkserver started")
    got = run_distributed(workers.caller_state, 2, "AM_DTYPE_TEST_CALLER_ENV")
    assert got == [("set after the forkserver started", str(r), "imported") for r in range(2)]


def test_harness_argument_checks():
    with pytest.raises(ValueError, match="world_size=0"):
        run_distributed(workers.fail_on_rank_one, 0, "x")
    assert 0 < free_port() < 65536
