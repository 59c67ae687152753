"""Context parallelism: two spawned gloo ranks with `parallelism.cp = 2` on the tiny Gemma 4
(the model's own CP hooks: load-balanced sequence chunks, ring attention) match one process
over the first 10 steps, and the eval loss too; in the same spawn, Gemma 4 under dp_shard=2,
and cp=2 with bf16 mixed precision (tolerances in `_check_cp_mixed_precision`).
Four ranks with cp=2 x dp_shard=2 (FSDP2 over the data axis and cp, the root being
`ContextParallelRoot`), and in the same spawn cp=2 x ep=2 (`_check_cp_x_ep`), match the same
single-process run.

Tolerance: fp32. The first step's loss (same weights) within 1e-6 (measured 2e-7: the ring
attention's explicit fp32 softmax with a log-sum-exp merge of the key blocks vs SDPA); every
step within 1e-4 absolute (~2e-5 relative; measured <= 3.4e-5): Adam's normalized updates turn
those ~1e-7 gradient differences into slightly different weights.
"""

from __future__ import annotations

import pytest
import torch
from automodel_helpers import tiny_raw

from am_automodel.recipe import build_recipe
from am_automodel.train import run
from am_dtype.testing import run_distributed

STEPS = 10
TOL = 1e-4
TOL_STEP1 = 1e-6
# Grad norms (before clipping): step 1 (same weights) within rel 1e-5 (measured 1.2e-6 for
# cp x dp_shard); later steps within 1e-3 (measured <= 2e-4 at step 5: the weights drift apart
# by ~1e-5 through Adam, and the norm is more sensitive to that than the loss).
GRAD_NORM_RTOL_STEP1 = 1e-5
GRAD_NORM_RTOL = 1e-3


def _raw(run_dir, cp: int = 1, dp_shard: int = 1, steps: int = STEPS, grad_accum: int = 1,
         ep: int = 1) -> dict:  # fmt: skip
    raw = tiny_raw(
        run_dir,
        # 2 layers (sliding, full) with window 8 < seq_len 32: both attention kinds cross
        # the CP chunk boundaries
        model={
            "preset": "tiny-gemma4-moe",
            "config_overrides": {
                "num_hidden_layers": 2,
                "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 8,
            },
        },
        data={"pack": False, "seq_len": 32},
        train={"steps": steps, "eval_every": 5},
        checkpoint={"every": 0, "export_final": dp_shard * ep > 1},
    )
    raw["parallelism"] = {"cp": cp, "dp_shard": dp_shard, "ep": ep}
    raw["train"]["micro_batch_size"] = 2 // (dp_shard * ep)
    raw["train"]["grad_accum"] = grad_accum
    return raw


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run every layout is compared with."""
    return run(build_recipe(_raw(tmp_path_factory.mktemp("cp") / "single")))


def _rank(rank: int, world: int, raws: list[dict]) -> list[dict]:
    out = []
    for raw in raws:
        result = run(build_recipe(raw))
        model = result.model
        out.append({"losses": result.losses, "eval": result.eval_losses,
                    "export": str(result.export_dir),
                    "experts": _experts(model),
                    "tied": model.lm_head.weight is model.model.language_model.embed_tokens.weight,
                    "master": sorted({str(p.dtype) for p in model.parameters()})})  # fmt: skip
    return out


def _experts(model) -> dict:
    """The first MoE block's experts: those this rank computes (its dispatcher's) and all."""
    from am_moe.layers import MoE

    block = next(m for m in model.modules() if isinstance(m, MoE))
    weight = next(block.experts.parameters())
    return {"local": block.experts.dispatcher.num_local_experts, "full": weight.shape[0]}


@pytest.mark.distributed
def test_cp_2_and_gemma4_dp_shard_2_match_one_process(tmp_path, single) -> None:
    """cp=2, and (same spawn) dp_shard=2: FSDP2 keeps the tied lm_head tied and the export, a
    collective save (it hung when only rank 0 called the mixin's save_pretrained), completes."""
    raws = [_raw(tmp_path / "cp", cp=2), _raw(tmp_path / "dp", dp_shard=2)]
    raws.append(_bf16(_raw(tmp_path / "cp_bf16", cp=2, steps=BF16_STEPS)))
    results = run_distributed(_rank, 2, raws, timeout_s=300)
    _check_cp_mixed_precision(tmp_path, [r.pop() for r in results])
    assert [r["losses"] for r in results[0]] == [r["losses"] for r in results[1]]
    got, dp = results[0]
    assert got["tied"] and dp["tied"]
    for step, loss in single.losses.items():
        assert abs(dp["losses"][step] - loss) <= TOL, ("dp_shard=2", step)
    assert (tmp_path / "dp" / "hf" / "final" / "model.safetensors").is_file()
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    assert abs(got["losses"][1] - single.losses[1]) <= TOL_STEP1
    for step, loss in single.losses.items():
        assert abs(got["losses"][step] - loss) <= TOL, (step, got["losses"][step], loss)
    assert sorted(got["eval"]) == sorted(single.eval_losses) == [5, 10]
    for step, loss in single.eval_losses.items():
        assert abs(got["eval"][step] - loss) <= TOL, ("eval", step)
    assert single.losses[STEPS] < single.losses[1] - 0.5
    norms = {d: _grad_norms(tmp_path / d / "metrics.jsonl") for d in ("cp", "dp")}
    for step, norm in _grad_norms(single.run_dir / "metrics.jsonl").items():
        rtol = GRAD_NORM_RTOL_STEP1 if step == 1 else GRAD_NORM_RTOL
        for layout, got_norms in norms.items():
            assert got_norms[step] == pytest.approx(norm, rel=rtol), (layout, step)


BF16_STEPS = 5  # eval at step 5, the last


def _bf16(raw: dict) -> dict:
    raw["parallelism"]["mixed_precision"] = "bf16"
    return raw


def _check_cp_mixed_precision(tmp_path, results: list[dict]) -> None:
    """cp=2 with bf16 mixed precision (FSDP2 over the cp axis, the `ContextParallelRoot` root:
    bf16 compute, fp32 reduce, fp32 master weights) against one process with bf16 mixed
    precision (it failed before: Gemma 4's fp32 `layer_scalar` buffer turned the residual
    stream fp32 ahead of the bf16 lm_head).

    bf16 tolerance: the ring attention (fp32 softmax over bf16 q/k/v) and SDPA round
    differently. Step 1 (same weights): loss within 1e-3, grad norm within 1e-2 relative
    (measured 1.6e-4 and 3e-3; the fp32 run differs by 5e-3 and 2.3%, so a rank computing
    in fp32, or a CP gradient averaged instead of summed (1/2), fails). Later steps and the
    eval: losses within 2e-2 (measured <= 7.7e-3: bf16 rounding of weights that Adam moves
    apart; the grad norms then drift by up to 10%, so only step 1's is compared)."""
    single = run(build_recipe(_bf16(_raw(tmp_path / "single_bf16", steps=BF16_STEPS))))
    assert results[0]["losses"] == results[1]["losses"]
    got = results[0]
    assert got["master"] == ["torch.float32"], got["master"]
    assert sorted(got["losses"]) == sorted(single.losses) == list(range(1, BF16_STEPS + 1))
    assert abs(got["losses"][1] - single.losses[1]) <= 1e-3
    for step, loss in single.losses.items():
        assert abs(got["losses"][step] - loss) <= 2e-2, ("cp bf16", step, got["losses"][step])
    assert sorted(got["eval"]) == sorted(single.eval_losses) == [5]
    assert abs(got["eval"][5] - single.eval_losses[5]) <= 2e-2
    ref = _grad_norms(tmp_path / "single_bf16" / "metrics.jsonl")[1]
    assert _grad_norms(tmp_path / "cp_bf16" / "metrics.jsonl")[1] == pytest.approx(ref, rel=1e-2)


CP_DP_STEPS = 5  # eval at step 5, the last


@pytest.mark.distributed
def test_cp_2_x_dp_shard_2_matches_one_process(tmp_path) -> None:
    """4 ranks, cp=2 x dp_shard=2: each data rank reads one row, each CP rank half of its
    tokens, every rank holds a quarter of the (FSDP2) weights, the tied lm_head and the
    embedding included. Same tolerances as cp=2 alone over 5 steps; the export gathers the
    shards."""
    single = run(build_recipe(_raw(tmp_path / "single", steps=CP_DP_STEPS)))
    raw = _raw(tmp_path / "cp_dp", cp=2, dp_shard=2, steps=CP_DP_STEPS)
    accum = _raw(tmp_path / "cp_dp_accum", cp=2, dp_shard=2, steps=ACCUM_STEPS, grad_accum=2)
    # MoEFSDPSyncMixin defers FSDP2's reduction to the last microbatch only with this on
    # (BackendConfig's default is off: a reduction per microbatch)
    accum["model"]["backend"]["enable_fsdp_optimizations"] = True
    cp_ep = _raw(tmp_path / "cp_ep", cp=2, ep=2, steps=CP_DP_STEPS)
    results = run_distributed(_rank, 4, [raw, accum, cp_ep], timeout_s=300)
    assert all(r[0]["losses"] == results[0][0]["losses"] for r in results)
    got = results[0][0]
    assert got["tied"]
    assert sorted(got["losses"]) == list(range(1, CP_DP_STEPS + 1))
    assert sorted(got["eval"]) == sorted(single.eval_losses) == [5]
    _assert_matches_one_process(tmp_path, got, single, ("single", "cp_dp"), "cp x dp_shard")
    assert (tmp_path / "cp_dp" / "hf" / "final" / "model.safetensors").is_file()
    _check_accumulation(tmp_path, results)
    _check_cp_x_ep(tmp_path, single, [r[2] for r in results])


def _check_cp_x_ep(tmp_path, single, results) -> None:
    """cp=2 x ep=2 (no dp_shard): each ep rank reads one row, each CP rank half of its tokens
    (the model's ring attention over the CP pair), each rank keeps half of the experts and
    routes its tokens to them through the EP all-to-all with the other row's rank of the same
    CP coordinate; FSDP2 shards the rest over (cp, ep) and the experts over cp. Against the same
    single-process run, with the cp tolerances (measured: step-1 loss 3e-7 and grad norm 7e-7
    relative; all steps' losses <= 3e-5, grad norms <= 4.2e-4, eval 1e-5)."""
    from am_utils.checkpointing import read_hf_state_dict

    for r in results:
        assert r["experts"] == {"local": 4, "full": 8}, r["experts"]  # 8 experts split over ep
        assert r["losses"] == results[0]["losses"]
    got = results[0]
    assert sorted(got["losses"]) == list(range(1, CP_DP_STEPS + 1))
    _assert_matches_one_process(tmp_path, got, single, ("single", "cp_ep"), "cp x ep")
    # the export gathers the expert shards: all 8 experts, as the cp x dp_shard run's within
    # the Adam drift of 5 steps
    ours = read_hf_state_dict(got["export"])
    ref = read_hf_state_dict(tmp_path / "cp_dp" / "hf" / "final")
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-3, msg=key)


ACCUM_STEPS = 3


def _check_accumulation(tmp_path, results) -> None:
    """Gradient accumulation (2 microbatches of 1 row per data rank, FSDP2's reduction deferred
    to the last backward by `MoEFSDPSyncMixin` on the `ContextParallelRoot` root) against one
    process accumulating 2 microbatches of 2 rows: the same 4 rows a step, so the same losses
    and gradients within the cp tolerances above. A root whose own reduction is not turned
    back on for the last backward (embedding, final norm, tied lm_head never reduced) fails:
    step 2's loss 6e-3 off."""
    single = run(build_recipe(_raw(tmp_path / "single_accum", steps=ACCUM_STEPS, grad_accum=2)))
    assert all(r[1]["losses"] == results[0][1]["losses"] for r in results)
    got = results[0][1]
    assert sorted(got["losses"]) == sorted(single.losses) == list(range(1, ACCUM_STEPS + 1))
    dirs = ("single_accum", "cp_dp_accum")
    _assert_matches_one_process(tmp_path, got, single, dirs, "accum")
    assert sorted(_grad_norms(tmp_path / dirs[1] / "metrics.jsonl")) == list(
        range(1, ACCUM_STEPS + 1)
    )


def _assert_matches_one_process(tmp_path, got, single, dirs, label) -> None:
    """`got`'s losses (step 1 within TOL_STEP1, every step within TOL) and eval losses equal
    the one-process run `single`'s, and so do the grad norms in the metrics of
    tmp_path/dirs[1] against tmp_path/dirs[0]. Adam hides a wrong gradient scale in the losses
    (its update is scale-invariant); the grad norm (before clipping) shows it: a CP gradient
    averaged instead of summed reads 1/2."""
    assert abs(got["losses"][1] - single.losses[1]) <= TOL_STEP1
    for step, loss in single.losses.items():
        assert abs(got["losses"][step] - loss) <= TOL, (label, step, got["losses"][step], loss)
    for step, loss in single.eval_losses.items():
        assert abs(got["eval"][step] - loss) <= TOL, (f"{label} eval", step)
    norms = [_grad_norms(tmp_path / d / "metrics.jsonl") for d in dirs]
    assert sorted(norms[1]) == sorted(norms[0])
    for step, norm in norms[0].items():
        rtol = GRAD_NORM_RTOL_STEP1 if step == 1 else GRAD_NORM_RTOL
        assert norms[1][step] == pytest.approx(norm, rel=rtol), (f"{label} grad_norm", step)


def _grad_norms(path) -> dict[int, float]:
    from am_automodel.metrics import read_metrics

    return {r["step"]: r["grad_norm"] for r in read_metrics(path) if "grad_norm" in r}


@pytest.mark.parametrize(
    ("sizes", "world", "fsdp", "axes", "mean_ranks"),
    [
        ({"cp": 2}, 2, False, ("dp_replicate", "dp_shard", "cp"), 1),
        ({"cp": 2, "dp_shard": 2}, 4, True, ("dp_replicate", "dp_shard", "cp"), 4),
        ({"cp": 2, "dp_shard": 1, "dp_replicate": 2}, 4, True,
         ("dp_replicate", "dp_shard", "cp"), 4),
        ({"dp_shard": 2}, 2, True, ("dp_replicate", "dp_shard"), 2),
        ({"cp": 2, "dp_shard": 1, "ep": 2}, 4, True, ("dp_replicate", "dp_shard", "cp"), 4),
    ],
)  # fmt: skip
def test_the_mesh_plan_of_cp_with_data_axes(sizes, world, fsdp, axes, mean_ranks) -> None:
    """FSDP2 shards over the data axes and cp; the loss scale undoes FSDP's mean over exactly
    the ranks it averages (CP gradients are sums: each CP rank's loss covers its tokens)."""
    from am_automodel.mesh import plan_mesh
    from am_automodel.models import build_model_config, model_spec
    from am_automodel.tokenizer import byte_tokenizer

    raw = _raw("/unused")
    raw["parallelism"] = {"dp_shard": 1, **sizes}
    recipe = build_recipe(raw)
    config = build_model_config(recipe.model, len(byte_tokenizer()))
    plan = plan_mesh(recipe.parallelism, world, model_spec(config), config, 32, pack=False)
    assert (plan.use_fsdp, plan.fsdp_axes, plan.grad_mean_ranks) == (fsdp, axes, mean_ranks)
    assert plan.data_size == world // sizes.get("cp", 1)
