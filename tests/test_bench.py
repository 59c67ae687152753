"""The bench/ scripts keep running: each in its --quick mode, checking what it prints.

Speed is not asserted here (timings belong to the scripts' own output); this only keeps
the scripts from rotting as the packages change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "nemotron.py",
            ("--quick", "--repeats", "1"),
            [
                "Mamba2 mixer",
                "Whole model",
                "speedup",
                "load 1/5/15 min",
                "1 threads (fixed)",
                "Per-block forward+backward",
                "routed matmuls alone",
            ],
        ),
        (
            "nemotron.py",
            ("--quick", "--sweep", "--repeats", "1"),
            ["forward+backward sweep", "chunk 64", "smallest speedup", "load 1/5/15 min"],
        ),
        (
            "moe.py",
            # bf16 matmuls run ~30x slower than fp32 on this CPU: the bf16 tables are the
            # same code with another dtype, so the smoke run keeps to fp32.
            ("--quick", "--repeats", "1", "--dtypes", "fp32"),
            [
                "all four implementations agree",
                "ceiling: dense matmul fp32",
                "6 fwd+bwd matmuls alone",
                "goal fwd+bwd",
                "load 1/5/15 min",
            ],
        ),
        ("moe_ep.py", ("--quick",), ["bytes sent per rank", "lower bound"]),
        (
            "gemma4.py",
            ("--quick", "--repeats", "1"),
            [
                "ceiling: dense matmul fp32",
                "MoE block alone",
                "Whole MoE text model",
                "goal fwd+bwd",
                "ratios on cpu seconds",
                "load 1/5/15 min",
            ],
        ),
        (
            "gemma4.py",
            ("--quick", "--sweep", "--repeats", "1"),
            [
                "forward+backward sweep",
                "64 experts top-8",
                "matmul share",
                "smallest speedup",
                "experts implementation: grouped_mm",
                "load 1/5/15 min",
            ],
        ),
        (
            "pp.py",
            ("--quick",),
            [
                "ratio pipeline / one rank",
                "ideal",
                "where the pipeline's CPU time goes",
                "gloo p2p at the boundary",
                "mask cache: build",
                "load 1/5/15 min",
            ],
        ),
        (
            "train.py",
            ("--quick",),
            [
                "automodel / bare loop",
                "automodel / HF Trainer",
                "model fwd+bwd, ours / HF",
                "Trainer-ratio ceiling",
                "load 1/5/15 min",
            ],
        ),
    ],
)
def test_bench_script_runs(script: str, args: tuple[str, ...], expected: list[str]) -> None:
    stdout = _run(script, *args)
    for text in expected:
        assert text in stdout, f"{script}: {text!r} missing from\n{stdout[-2000:]}"
