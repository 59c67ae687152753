"""Test sessions for the am workspace (uv is the venv backend).

    uv run nox                      # default: lint, each package alone, cross-package tests + coverage, gpu
    uv run nox -s isolated          # every package in a venv holding only it and its dependencies
    uv run nox -s "isolated(package='am-moe')"
    uv run nox -s tests             # the cross-package tests/ + the coverage report of every session
    uv run nox -s gpu               # the gpu extras and `-m gpu` tests; skips without CUDA
    uv run nox -s lint
    uv run nox -s meta              # a fresh venv with only am-automodel: every package + the tiny recipe

Versions come from uv.lock in every session (`uv export --frozen`), so a
session tests what a user installing from the lock gets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "isolated", "tests", "gpu"]

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "pytest-cov>=5"]
# Coverage data of every session; `tests` combines it (paths in [tool.coverage.paths]).
COVERAGE_DIR = ROOT / ".nox-coverage"


def _package_import_name(package: str) -> str:
    return package.replace("-", "_")


def _install_locked(session: nox.Session, *export_args: str, editable: bool = False) -> None:
    """Install the locked requirements that `uv export` gives for export_args.

    Workspace members are built as wheels unless `editable` (coverage maps to src/ then).
    """
    req = Path(session.create_tmp()) / "requirements.txt"
    flags = [] if editable else ["--no-editable"]
    out = subprocess.run(
        ["uv", "export", "--frozen", "--no-hashes", "--no-header", *flags, *export_args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    req.write_text(out)
    # uv caches wheels built from local directories keyed on pyproject.toml only; force a
    # rebuild of our own packages so a session never tests stale sources.
    fresh = [arg for p in PACKAGES for arg in ("--refresh-package", p, "--reinstall-package", p)]
    session.install("-r", str(req), *fresh)


def _test_groups(package: str) -> list[str]:
    """`--group test` when the package declares test-only dependencies (e.g. the reference
    implementation its parity tests compare against), else nothing."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    meta = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())
    return ["--group", "test"] if "test" in meta.get("dependency-groups", {}) else []


def _coverage_env(name: str) -> dict[str, str]:
    """Environment that makes pytest-cov (and spawned ranks) write COVERAGE_DIR/.coverage.NAME.*"""
    COVERAGE_DIR.mkdir(exist_ok=True)
    for stale in COVERAGE_DIR.glob(f".coverage.{name}*"):
        stale.unlink()
    return {
        "OMP_NUM_THREADS": "2",
        "COVERAGE_FILE": str(COVERAGE_DIR / f".coverage.{name}"),
        "COVERAGE_RCFILE": str(ROOT / "pyproject.toml"),
    }


def _cov_args(names: list[str]) -> list[str]:
    args = [f"--cov-config={ROOT / 'pyproject.toml'}", "--cov-report="]
    return args + [f"--cov={name}" for name in names]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("package", PACKAGES)
def isolated(session: nox.Session, package: str) -> None:
    """One package alone: its wheel, its locked dependencies, pytest; then its tests.

    Siblings it does not declare are absent, so an undeclared import fails here.
    """
    _install_locked(session, "--package", package, "--no-dev", *_test_groups(package))
    session.install(*TEST_TOOLS)
    # Run from a temporary directory so the import comes from the installed wheel,
    # not from the source tree.
    session.chdir(session.create_tmp())
    session.run("python", "-c", f"import {_package_import_name(package)} as m; print(m.__file__)")
    session.run(
        "pytest",
        str(ROOT / "packages" / package / "tests"),
        "-p",
        "no:cacheprovider",
        "--durations=10",  # where the suite's time goes, in every CI log
        "--rootdir",
        str(ROOT),
        "-c",
        str(ROOT / "pyproject.toml"),
        *_cov_args([_package_import_name(package)]),
        *session.posargs,
        env=_coverage_env(package),
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The cross-package suite (top-level tests/: workspace invariants, READMEs, examples,
    benches, pipelines of our models) with every package installed, then one coverage report
    over it and the `isolated` sessions.

    Each package's own tests run once, in `isolated` (only its declared dependencies), not
    again here; run `nox -s isolated tests` for the full report.
    """
    _install_locked(session, "--all-packages", "--group", "dev", editable=True)
    names = [_package_import_name(p) for p in PACKAGES]
    session.run(
        "pytest",
        "tests",
        "-p",
        "no:cacheprovider",
        "--durations=15",
        *_cov_args(names),
        *session.posargs,
        env=_coverage_env("tests"),
    )
    data = COVERAGE_DIR / ".coverage"
    data.unlink(missing_ok=True)
    env = {"COVERAGE_FILE": str(data), "COVERAGE_RCFILE": str(ROOT / "pyproject.toml")}
    session.run("coverage", "combine", "--keep", "--quiet", str(COVERAGE_DIR), env=env)
    session.run("coverage", "report", "--skip-empty", "--precision=1", env=env)


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU extras and the tests marked `gpu`. Skips with a reason on machines without CUDA."""
    if (
        shutil.which("nvidia-smi") is None
        or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode
    ):
        session.skip("no CUDA device (nvidia-smi absent or found no GPU): gpu tests not run")
    _install_locked(session, "--all-packages", "--group", "dev", "--all-extras")
    for package in PACKAGES:
        # Not every package has GPU tests: "no tests collected" (5) is fine per package.
        session.run(
            "pytest",
            f"packages/{package}/tests",
            "-m",
            "gpu",
            *session.posargs,
            success_codes=[0, 5],
        )


@nox.session
def meta(session: nox.Session) -> None:
    """A fresh venv holding only `am-automodel` (from the lock) gets every am package and runs
    the tiny recipe end to end: train a few steps, export, generate from the export."""
    _install_locked(session, "--package", "am-automodel", "--no-dev")
    session.chdir(session.create_tmp())
    imports = "; ".join(f"import {_package_import_name(p)}" for p in PACKAGES)
    session.run("python", "-c", f"{imports}; print('every am package imports')")
    recipe = str(ROOT / "examples" / "tiny_nemotron.yaml")
    session.run(
        "automodel", "train", recipe, "--train.steps=4", "--train.eval_every=2",
        "--data.builtin_documents=200", "--checkpoint.dir=meta_run", "--checkpoint.resume=never",
        "--logging.progress=false", env={"OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    session.run("automodel", "generate", "meta_run/hf/final", "--prompt", "Ada went to",
                "--max-new-tokens", "8")  # fmt: skip
