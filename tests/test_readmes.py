"""Every package README's Python example runs as written (docs that cannot rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = sorted((ROOT / "packages").glob("*/README.md"))


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.name)
def test_readme_example_runs(readme: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, f"{readme} has no python example"
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "AM_DTYPE_COMPILE_RMSNORM": "0"},
    )
    assert out.returncode == 0, f"{readme.parent.name} example failed:\n{out.stderr[-3000:]}"
