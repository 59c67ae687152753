"""Two gloo ranks (spawned) match one process: dp_shard=2 (FSDP2), ep=2 (experts split,
with gradient accumulation through MoEFSDPSyncMixin), pp=2 (am-pp 1F1B, 2 microbatches,
one document per row; and with activation checkpointing) and dp_replicate=2 (HSDP: whole
replicas), over the first 10 steps; pp=2 with bf16 mixed precision against one process with
bf16 mixed precision over 4 steps (tolerances in `_check_pp_mixed_precision`).

Tolerance: fp32, losses within 2e-5 absolute (about 1e-5 relative); the only difference is
the order of floating-point sums in the reduce-scatter / all-to-all.
"""

from __future__ import annotations

import pytest
import torch
from automodel_helpers import tiny_raw

from am_automodel.recipe import build_recipe
from am_automodel.train import run
from am_dtype.testing import run_distributed

STEPS = 10
TOL = 2e-5


def _raw(run_dir, **train):
    return tiny_raw(
        run_dir,
        train={"steps": STEPS, "eval_every": 5, **train},
        checkpoint={"every": 0},
    )


def _ranks(rank: int, world: int, recipes: list[dict]) -> list[dict]:
    from am_models_nemotron.layers import NemotronBlock

    out = []
    forward = NemotronBlock.forward
    for raw in recipes:
        compute: set[str] = set()  # the dtypes of the block weights each forward computes with

        def recording(self, *args, _seen=compute, **kwargs):
            _seen.add(str(next(self.parameters()).dtype))
            return forward(self, *args, **kwargs)

        NemotronBlock.forward = recording
        try:
            result = run(build_recipe(raw))
        finally:
            NemotronBlock.forward = forward
        layout = None
        if raw["parallelism"].get("pp", 1) == 1:
            weight = result.model.get_parameter("model.layers.0.norm.weight")  # [64]
            layout = {"placements": [type(p).__name__ for p in weight.placements],
                      "local": tuple(weight.to_local().shape), "full": tuple(weight.shape)}  # fmt: skip
        from am_moe.activation_checkpointing import is_checkpointed

        wrapped = sum(is_checkpointed(m) for m in result.engine.module.modules())
        out.append({"losses": result.losses, "eval": result.eval_losses,
                    "export": str(result.export_dir), "layout": layout,
                    "checkpointed": wrapped, "compute": sorted(compute),
                    "master": sorted({str(p.dtype) for p in result.engine.module.parameters()})})  # fmt: skip
    return out


@pytest.mark.distributed
def test_dp_shard_2_and_ep_2_match_one_process(tmp_path) -> None:
    from am_utils.checkpointing import read_hf_state_dict

    single = run(build_recipe(_raw(tmp_path / "single", micro_batch_size=4)))
    unpacked = _raw(tmp_path / "single_unpacked", micro_batch_size=4)
    unpacked["data"]["pack"] = False
    single_unpacked = run(build_recipe(unpacked))
    dp = _raw(tmp_path / "dp", micro_batch_size=2)
    dp["parallelism"] = {"dp_shard": 2}
    ep = _raw(tmp_path / "ep", micro_batch_size=1, grad_accum=2)
    ep["parallelism"] = {"dp_shard": 1, "ep": 2}
    ep["model"]["backend"]["enable_fsdp_optimizations"] = True  # deferred reduction in accumulation
    pp = _raw(tmp_path / "pp", micro_batch_size=4)
    pp["data"]["pack"] = False
    pp["parallelism"] = {"dp_shard": 1, "pp": 2, "pp_microbatches": 2}
    pp_ac = _raw(tmp_path / "pp_ac", micro_batch_size=4)
    pp_ac["data"]["pack"] = False
    pp_ac["parallelism"] = {"dp_shard": 1, "pp": 2, "pp_microbatches": 2,
                            "activation_checkpointing": True}  # fmt: skip
    rep = _raw(tmp_path / "rep", micro_batch_size=2)
    rep["parallelism"] = {"dp_shard": 1, "dp_replicate": 2}
    pp_bf16 = _bf16_raw(tmp_path / "pp_bf16", micro_batch_size=4)
    pp_bf16["parallelism"].update(pp=2, pp_microbatches=2)
    results = run_distributed(_ranks, 2, [dp, ep, pp, rep, pp_ac, pp_bf16], timeout_s=600)
    _check_pp_mixed_precision(tmp_path, [r.pop() for r in results])
    assert results[0] == results[1] or all(
        r["losses"] == results[0][i]["losses"] for i, r in enumerate(results[1])
    )
    # dp_shard shards the weights over the 2 ranks; dp_replicate keeps a whole copy on each
    # (HSDP mesh (dp_replicate=2, dp_shard=1)), gradients all-reduced across the replicas
    dp_layout, rep_layout = results[0][0]["layout"], results[0][3]["layout"]
    assert dp_layout["placements"] == ["Shard"], dp_layout
    assert dp_layout["local"][0] * 2 == dp_layout["full"][0], dp_layout
    assert rep_layout["placements"] == ["Replicate", "Shard"], rep_layout
    assert rep_layout["local"] == rep_layout["full"], rep_layout
    # pp with activation checkpointing: every stage's blocks wrapped, the recomputed forward
    # the very same numbers (same ops, same order), so the very same losses as plain pp
    pp_run, pp_ac_run = results[0][2], results[0][4]
    assert pp_run["checkpointed"] == 0 and pp_ac_run["checkpointed"] >= 2, pp_ac_run
    assert all(r[4]["checkpointed"] >= 2 for r in results)
    assert pp_ac_run["losses"] == pp_run["losses"]
    refs = (single, single, single_unpacked, single, single_unpacked)
    names = ("dp_shard=2", "ep=2", "pp=2", "dp_replicate=2", "pp=2 + activation checkpointing")
    for name, got, ref_run in zip(names, results[0], refs, strict=True):
        assert sorted(got["losses"]) == list(range(1, STEPS + 1)), name
        for step, loss in ref_run.losses.items():
            assert abs(got["losses"][step] - loss) <= TOL, (name, step, got["losses"][step], loss)
        for step, loss in ref_run.eval_losses.items():
            assert abs(got["eval"][step] - loss) <= TOL, (name, "eval", step)
        # the gathered export equals the single-process weights
        ours, ref = read_hf_state_dict(got["export"]), read_hf_state_dict(ref_run.export_dir)
        assert ours.keys() == ref.keys()
        for key in ref:
            # weights ~0.06-0.09: Adam turns reduction-order noise of ~1e-7 in small
            # gradients into ~1e-5 weight differences after 10 steps (measured <= 1.2e-5)
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=5e-5, msg=f"{name} {key}")
    assert single.losses[STEPS] < single.losses[1] - 0.5


def _grad_norms(run_dir) -> dict[int, float]:
    from am_automodel.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return {r["step"]: r["grad_norm"] for r in read_metrics(path) if "grad_norm" in r}


BF16_STEPS = 4


def _bf16_raw(run_dir, **train) -> dict:
    raw = _raw(run_dir, **train)
    raw["train"].update(steps=BF16_STEPS, eval_every=2)
    raw["checkpoint"]["export_final"] = False
    raw["data"]["pack"] = False
    raw["parallelism"] = {"dp_shard": 1, "mixed_precision": "bf16"}
    return raw


def _check_pp_mixed_precision(tmp_path, results: list[dict]) -> None:
    """pp=2 with mixed precision (FSDP2's MixedPrecisionPolicy on each stage: bf16 compute,
    bf16 activations across the stage boundary, fp32 reduce, fp32 master weights) against one
    process with mixed precision and the same microbatches (2 x 2 rows a step).

    bf16 tolerance: step 1 (same weights, same microbatch shapes) computes the same bf16 ops:
    loss within 1e-6 and grad norm within 1e-5 relative (measured 1e-7 and 6e-8; the fp32
    run's grad norm differs by 8e-4, so this sees a stage that silently computes in fp32).
    Later steps: losses within 1e-3 absolute (measured <= 2e-4), grad norms within 2e-3
    relative (measured <= 1.5e-4): bf16 rounding of slightly
    different weights after each Adam step."""
    ref_raw = _bf16_raw(tmp_path / "single_bf16", micro_batch_size=2, grad_accum=2)
    single = run(build_recipe(ref_raw))
    ref_norms, norms = _grad_norms(single.run_dir), _grad_norms(tmp_path / "pp_bf16")
    for got in results:  # both stages
        assert got["compute"] == ["torch.bfloat16"], got["compute"]
        assert got["master"] == ["torch.float32"], got["master"]
    got = results[0]
    assert got["losses"] == results[1]["losses"]
    assert sorted(got["losses"]) == sorted(single.losses) == list(range(1, BF16_STEPS + 1))
    assert abs(got["losses"][1] - single.losses[1]) <= 1e-6
    assert norms[1] == pytest.approx(ref_norms[1], rel=1e-5)
    for step, loss in single.losses.items():
        assert abs(got["losses"][step] - loss) <= 1e-3, ("pp bf16", step, got["losses"][step], loss)
        assert norms[step] == pytest.approx(ref_norms[step], rel=2e-3), ("pp bf16 grad_norm", step)
    assert sorted(got["eval"]) == sorted(single.eval_losses) == [2, 4]
    for step, loss in single.eval_losses.items():
        assert abs(got["eval"][step] - loss) <= 1e-3, ("pp bf16 eval", step)
