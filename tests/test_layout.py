"""The package's import graph has no cycle, lazy imports inside functions included: a cycle is
where a newcomer's change starts failing at import time for reasons far from the change."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "src" / "linearize"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("linearize", *parts)).removesuffix(".__init__")
        mods[name] = f
    return mods


def _typing_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under ``if TYPE_CHECKING:``: read by type checkers, never run, so they
    cannot fail at import time (a strategy names the session type that runs it)."""
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere but under ``TYPE_CHECKING``
    (``from pkg import submodule`` counts as the submodule, not the package's ``__init__``)."""
    out = set()
    tree = ast.parse(path.read_text())
    skip = _typing_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("linearize"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in mods else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    found: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_typing_only_imports_are_told_apart():
    src = "from typing import TYPE_CHECKING\nfrom a import b\nif TYPE_CHECKING:\n    from c import d\n"
    tree = ast.parse(src)
    names = [n.module for n in _typing_only(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["c"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    mods = _modules()
    assert len(mods) > 20 and "linearize.report.pages" in mods
    graph = {m: _imports(f, mods) - {m} for m, f in mods.items()}
    assert "linearize.report.pages" in graph["linearize.report"]  # the graph sees the edges
    assert _cycles(graph) == []


def _lazy_sibling_imports(source: str) -> list[int]:
    """Lines where a function imports from the package: sibling imports belong at the top,
    where the layout (and the cycle check above) can see them."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("linearize"):
                    found.append(node.lineno)
                elif isinstance(node, ast.Import) and any(
                    a.name.startswith("linearize") for a in node.names
                ):
                    found.append(node.lineno)
    return found


def test_sibling_imports_are_at_the_top():
    assert _lazy_sibling_imports("def f():\n    from linearize import data\n") == [2]
    lazy = {
        name: lines
        for name, f in _modules().items()
        if (lines := _lazy_sibling_imports(f.read_text()))
    }
    assert lazy == {}
