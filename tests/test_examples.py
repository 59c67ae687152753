"""The README's main jobs keep working: `automodel train examples/tiny_nemotron.yaml` and
`examples/tiny_gemma4.yaml` (shortened with overrides), then `automodel generate` on the export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("example", ["tiny_nemotron", "tiny_gemma4"])
def test_tiny_recipe_trains_exports_and_generates(example, tmp_path) -> None:
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "am_automodel", "train", str(ROOT / "examples" / f"{example}.yaml"),
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
    out = gen.stdout.removesuffix("\n")  # 6 steps: the continuation may be mostly spaces
    assert out.startswith("Ada went to") and len(out) > len("Ada went to"), repr(out)
