"""`automodel train` end to end on one process: loss falls, eval loss, resolved recipe,
metrics, an export that transformers loads with identical logits, generate, plot."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from am_automodel.cli import main
from am_automodel.recipe import RecipeError
from am_automodel.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from automodel_helpers import tiny_raw

    from am_automodel.recipe import build_recipe

    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    raw = tiny_raw(run_dir, train={"steps": 8, "eval_every": 4}, checkpoint={"every": 4})
    return run(build_recipe(raw)), build_recipe(raw)


def test_loss_falls_and_eval_is_reported(trained) -> None:
    result, _ = trained
    assert sorted(result.losses) == list(range(1, 9))
    assert result.losses[8] < result.losses[1] - 0.5, result.losses
    assert sorted(result.eval_losses) == [4, 8]
    assert result.eval_losses[8] < result.eval_losses[4]


def test_resolved_recipe_and_metrics_are_written(trained) -> None:
    result, recipe = trained
    written = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert written == recipe.model_dump(mode="json")
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb", "moe_load_imbalance"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert all(r["moe_load_imbalance"] >= 1.0 for r in steps)
    assert [r["loss"] for r in steps] == [result.losses[s] for s in range(1, 9)]
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    # warmup 1 step then cosine: lr at step 1 is the peak, then it decays
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] < steps[1]["lr"]
    ckpts = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"]


def test_export_loads_in_transformers_with_identical_logits(trained) -> None:
    from transformers import AutoTokenizer
    from transformers import NemotronHForCausalLM as HFNemotronH

    result, _ = trained
    assert result.export_dir == result.run_dir / "hf" / "final"
    reference = HFNemotronH.from_pretrained(result.export_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.export_dir)
    ids = torch.tensor(
        [[1, *tokenizer("Ada went to the park", add_special_tokens=False)["input_ids"]]]
    )
    ours = result.model.eval()
    with torch.no_grad():
        theirs, mine = reference(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert (result.export_dir / "recipe.yaml").is_file()


def test_generate_prints_text(trained, capsys) -> None:
    result, _ = trained
    assert (
        main(["generate", str(result.export_dir), "--prompt", "Ada went", "--max-new-tokens", "12"])
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert out.startswith("Ada went") and len(out) > len("Ada went")


def test_plot(trained, capsys) -> None:
    result, _ = trained
    code = main(["plot", str(result.run_dir)])
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 2
        assert "automodel plot needs matplotlib" in capsys.readouterr().err
    else:
        assert code == 0 and (result.run_dir / "metrics.png").stat().st_size > 1000
    with pytest.raises(RecipeError, match="no metrics.jsonl"):
        from am_automodel.plot import plot_run

        plot_run(str(result.run_dir / "nothing"))
