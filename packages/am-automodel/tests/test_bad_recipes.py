"""Bad recipes fail before any work: one line naming the key, no process group, no run dir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from automodel_helpers import tiny_raw

from am_automodel.recipe import RecipeError, build_recipe
from am_automodel.train import run

G4 = {"preset": "tiny-gemma4-moe"}
CASES = {
    "unknown key": ({"train": {"stepz": 3}}, {}, "unknown key 'train.stepz'"),
    "misspelled section": ({"parallelsim": {"ep": 2}}, {}, "unknown section 'parallelsim'"),
    "pp > layers": ({"parallelism": {"pp": 8, "dp_shard": 1}}, {"WORLD_SIZE": "8"},
                    "parallelism.pp = 8 is larger than the model's 4 layers"),
    "pp with packed rows": ({"parallelism": {"pp": 2, "dp_shard": 1}}, {"WORLD_SIZE": "2"},
                            "parallelism.pp = 2 needs data.pack = false"),
    "pp with cp": ({"model": G4, "parallelism": {"pp": 2, "cp": 2, "dp_shard": 1},
                    "data": {"pack": False}}, {"WORLD_SIZE": "4"},
                   "parallelism.pp = 2 with cp=2: not wired"),
    "pp schedule": ({"parallelism": {"pp": 2, "dp_shard": 1, "pp_schedule": "Zigzag"},
                     "data": {"pack": False}}, {"WORLD_SIZE": "2"}, "parallelism.pp_schedule = 'Zigzag'"),
    "pp microbatches": ({"parallelism": {"pp": 2, "dp_shard": 1, "pp_microbatches": 3},
                         "data": {"pack": False}}, {"WORLD_SIZE": "2"},
                        "parallelism.pp_microbatches = 3 does not divide the 2 rows"),
    "ep not dividing experts": ({"parallelism": {"ep": 3, "dp_shard": 1}}, {"WORLD_SIZE": "3"},
                                "parallelism.ep = 3 does not divide the model's 8 routed experts"),
    "missing data file": ({"data": {"path": "/nonexistent/train.jsonl"}}, {},
                          "data.path = '/nonexistent/train.jsonl': no such file"),
    "world size vs mesh": ({"parallelism": {"dp_shard": 2, "ep": 2}}, {"WORLD_SIZE": "2"},
                           "dp_replicate*dp_shard*ep*pp*cp = 4 does not match the world size 2"),
    "dp_shard=-1 cannot fill": ({"parallelism": {"ep": 2}}, {"WORLD_SIZE": "3"},
                                "does not divide the world size 3"),
    "cp without model CP hooks": (
        {"parallelism": {"cp": 2, "dp_shard": 1}}, {"WORLD_SIZE": "2"},
        "parallelism.cp = 2: NemotronHForCausalLM has no context-parallel hooks "
        "(setup_cp_attention, prepare_model_inputs_for_cp)"),
    "cp not dividing seq_len": (
        {"model": G4, "parallelism": {"cp": 2}, "data": {"pack": False, "seq_len": 30}},
        {"WORLD_SIZE": "2"}, "parallelism.cp = 2 needs data.seq_len = 30 to be a multiple of "
        "2*cp = 4"),
    "cp with packed rows": ({"model": G4, "parallelism": {"cp": 2}}, {"WORLD_SIZE": "2"},
                            "parallelism.cp = 2 needs data.pack = false"),
    "resume path": ({"checkpoint": {"resume": "/nonexistent/step_1"}}, {},
                    "checkpoint.resume = '/nonexistent/step_1'"),
    "tokenizer dir": ({"tokenizer": {"path": "/nonexistent/tok"}}, {}, "tokenizer.path"),
    "config override": ({"model": {"config_overrides": {"hidden_sz": 3}}}, {},
                        "model.config_overrides.hidden_sz"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_fails_before_any_work(case, tmp_path, monkeypatch) -> None:
    sections, env, expected = CASES[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        run(build_recipe(tiny_raw(run_dir, **sections)))
    msg = str(info.value)
    assert expected in msg and "\n" not in msg, msg
    assert not dist.is_initialized(), "a process group was created before the recipe was checked"
    assert not run_dir.exists(), "work started (the run directory exists) before the check"


def test_cli_prints_one_line_and_no_traceback(tmp_path, capsys, monkeypatch) -> None:
    from am_automodel.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"automodel: error: recipe file '{tmp_path / 'nope.yaml'}' does not exist"
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallelism:\n  ep: 3\n  dp_shard: 1\n")
    # The real entry point in a fresh interpreter: exit code 2, the one line, no traceback.
    out = subprocess.run(
        [sys.executable, "-m", "am_automodel", "train", str(recipe), "--optimizer.lr=1e-3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "3"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "automodel: error: parallelism.ep = 3 does not divide the model's 8 routed experts"
    ], out.stderr


@pytest.mark.parametrize("axis", ["dp_shard", "dp_replicate", "ep"])
def test_pipeline_combines_with_data_and_expert_axes(axis, tmp_path, monkeypatch) -> None:
    from am_automodel.train import prepare

    monkeypatch.setenv("WORLD_SIZE", "4")
    par = {"pp": 2, "dp_shard": 1, axis: 2}
    prep = prepare(build_recipe(tiny_raw(tmp_path / "run", parallelism=par, data={"pack": False})))
    assert prep.plan.pp == 2 and getattr(prep.plan, axis) == 2 and prep.plan.data_size == 2
