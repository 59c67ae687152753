"""The README's main job keeps working: `automodel train examples/tiny_nemotron.yaml`
(shortened with overrides), then `automodel generate` on its export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_nemotron_recipe_trains_exports_and_generates(tmp_path) -> None:
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "am_automodel", "train", str(ROOT / "examples" / "tiny_nemotron.yaml"),
         "--train.steps=6", "--train.eval_every=3", "--checkpoint.every=3",
         f"--checkpoint.dir={run_dir}", "--logging.progress=false"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "eval_loss" in train.stdout and "automodel: exported to" in train.stdout
    assert (run_dir / "hf" / "final" / "model.safetensors").is_file()
    gen = subprocess.run(
        [sys.executable, "-m", "am_automodel", "generate", str(run_dir / "hf" / "final"),
         "--prompt", "Ada went to", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("Ada went to") and len(gen.stdout.strip()) > len("Ada went to")
