"""Workspace invariants every package must keep (cross-package, no GPU).

- a package imports only the siblings it declares (what lets a user install one piece);
- importing any package loads no GPU-only module (TE, DeepEP, grouped_gemm, mamba-ssm);
- every package has the files a user needs: README with an install line, tests, __all__.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
IMPORT_NAMES = {p.name.replace("-", "_"): p.name for p in PACKAGES}
GPU_MODULES = (
    "transformer_engine",
    "deep_ep",
    "grouped_gemm",
    "mamba_ssm",
    "causal_conv1d",
    "uccl",
)


def _declared(package: Path) -> set[str]:
    meta = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    deps = list(meta.get("dependencies", []))
    return {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() for d in deps}


def _imported_siblings(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (package / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in IMPORT_NAMES:
                    found.setdefault(IMPORT_NAMES[top], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_imports_only_declared_siblings(package: Path) -> None:
    declared = _declared(package) | {package.name}
    undeclared = {k: v for k, v in _imported_siblings(package).items() if k not in declared}
    assert not undeclared, f"{package.name} imports undeclared siblings: {undeclared}"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_package_layout(package: Path) -> None:
    import_name = package.name.replace("-", "_")
    readme = (package / "README.md").read_text()
    assert f"pip install {package.name}" in readme, (
        f"{package.name}/README.md lacks an install line"
    )
    assert "```python" in readme, f"{package.name}/README.md lacks an example"
    assert list((package / "tests").glob("test_*.py")), f"{package.name} has no tests"
    init = (package / "src" / import_name / "__init__.py").read_text()
    assert "__all__" in init, f"{import_name}/__init__.py does not define __all__"


def test_versions_agree() -> None:
    versions = {
        p.name: tomllib.loads((p / "pyproject.toml").read_text())["project"]["version"]
        for p in PACKAGES
    }
    assert len(set(versions.values())) == 1, f"package versions differ: {versions}"


def test_import_loads_no_gpu_module() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in sorted(IMPORT_NAMES))
        + f"bad = [m for m in sys.modules if m.split('.')[0] in {GPU_MODULES!r}]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the am packages loaded GPU modules: {out.stdout}"
