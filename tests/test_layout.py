"""The package layout: no import cycles, and the subpackages along a run's path.

Compared against: the import statements themselves (every ``import``/``from`` of a mergeopt module,
including those inside functions), read with ``ast`` rather than by importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "mergeopt"
SUBPACKAGES = {
    "config",
    "loading",
    "merging",
    "memory",
    "objectives",
    "search",
    "evaluation",
    "export",
    "worlds",
    "runtime",
    "reporting",
    "run_files",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The mergeopt modules a file imports, anywhere in it (a lazy import is still a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergeopt"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mergeopt"))
    return {m for m in out if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_is_laid_out_along_a_run():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == SUBPACKAGES
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    # the CLI (its verbs, and each verb's options) and its python -m aliases, errors and the up-front
    # checks of what a user hands a command (inputs), and the fit itself
    assert top == [
        "__init__",
        "__main__",
        "cli",
        "cli_options",
        "errors",
        "fit",
        "inputs",
        "merge",
        "rank",
        "train",
        "transfer",
    ]
    for name in SUBPACKAGES:
        assert (PACKAGE / name / "__init__.py").read_text().startswith('"""'), f"{name} has no docstring"
