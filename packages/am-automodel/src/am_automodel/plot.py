"""`automodel plot RUN_DIR`: loss, eval loss and throughput curves of a run as one PNG."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from am_automodel.metrics import read_metrics
from am_automodel.recipe import RecipeError

__all__ = ["plot_run"]


def plot_run(run_dir: str, out: str | None = None) -> Path:
    """Write `RUN_DIR/metrics.png` (or `out`) from `RUN_DIR/metrics.jsonl`; returns the path."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise RecipeError(f"{run_dir!r} has no metrics.jsonl (is it a run directory?)")
    if importlib.util.find_spec("matplotlib") is None:
        raise RecipeError("automodel plot needs matplotlib: pip install 'am-automodel[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval"
        )
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_tok.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax_tok.set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
