"""The am_dtype modules import each other without cycles, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import am_dtype

PACKAGE = Path(am_dtype.__file__).parent


def _imports(path: Path) -> set[str]:
    """The am_dtype submodules `path` imports anywhere in its body (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "am_dtype":
                out |= {f"am_dtype.{a.name}" for a in node.names}
            elif node.module.startswith("am_dtype."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("am_dtype.")}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {f"am_dtype.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_import_cycle_between_am_dtype_modules():
    graph = _graph()
    assert "am_dtype.backend" in graph and "am_dtype.fp8" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_fp8_does_not_import_backend():
    # fp8 reads the availability flags from am_dtype.availability, not from backend.
    assert "am_dtype.backend" not in _graph()["am_dtype.fp8"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
