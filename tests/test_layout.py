"""The package layout: no import cycles, and the subpackages along a run's path.

Compared against: the import statements themselves (every ``import``/``from`` of a mergeopt module,
including those inside functions), read with ``ast`` rather than by importing anything.
"""

from __future__ import annotations

import ast
import re
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
        "calibrate",
        "cli",
        "cli_options",
        "diagnose",
        "errors",
        "fit",
        "inputs",
        "merge",
        "plan",
        "rank",
        "train",
        "transfer",
    ]
    for name in SUBPACKAGES:
        assert (PACKAGE / name / "__init__.py").read_text().startswith('"""'), f"{name} has no docstring"


def _private_uses(source: str, packages: tuple[str, ...] = ("mergeopt",)) -> list[str]:
    """Where ``source`` reaches a private name of ``packages``: ``from mergeopt.x import _y``, a
    private module in the path, or ``m._y`` on a name bound to one of their modules (``import
    mergeopt.x``, ``from mergeopt import x``, ``import mergeopt.x as m``). Dunder names are not private."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    tree = ast.parse(source)
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in packages:
            if any(private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: module {node.module}")
            for alias in node.names:
                if private(alias.name):
                    found.append(f"line {node.lineno}: {node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)  # a module or a name: its attributes count alike
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in packages:
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(f"line {node.lineno}: {root.id}…{node.attr}")
    return found


def _user_facing_sources() -> dict[str, str]:
    """The Python that users read and copy: benchmarks, the notebooks' code cells, the docs' examples."""
    import json
    import re

    sources = {
        str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in (REPO / "benchmarks").rglob("*.py")
    }
    for notebook in (REPO / "notebooks").rglob("*.ipynb"):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [
            line for cell in code for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))
        ]
        sources[str(notebook.relative_to(REPO))] = "\n".join(lines)
    for page in (REPO / "docs").rglob("*.md"):
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
        for i, block in enumerate(blocks):
            sources[f"{page.relative_to(REPO)} (python block {i + 1})"] = block
    return sources


def test_benchmarks_notebooks_and_docs_use_only_public_names():
    """DESIGN.md: notebooks, benchmarks and docs use the public API only, so that a module's private
    helpers can be renamed or moved without breaking what users run. The diagnostic benchmarks that
    rebuild a test's models (tests/test_lora_parameters.py's, on a GPU) use the tests' public helpers,
    and one benchmark another's."""
    sources = _user_facing_sources()
    assert any(name.startswith("benchmarks/") for name in sources) and any(".ipynb" in n for n in sources)
    found = {
        name: uses
        for name, source in sources.items()
        if (uses := _private_uses(source, ("mergeopt", "tests", "benchmarks")))
    }
    assert found == {}


def test_no_module_imports_a_private_name_of_another():
    """A name another module needs is public; ``_name`` is a module's own."""
    found = {}
    for name, path in _modules().items():
        uses = _private_uses(path.read_text(encoding="utf-8"))
        if uses:
            found[name] = uses
    assert found == {}


def test_the_private_name_finder_finds_each_form():
    source = """
import mergeopt.merging.stacking
import mergeopt.loading.problem as problem
from mergeopt.evaluation import baselines
from mergeopt.loading.problem import _random_world
from mergeopt._internal import thing
from mergeopt.evaluation.baselines import leave_one_out
mergeopt.merging.stacking._differences = None
problem._shard(None)
baselines._mixing_law(1, 2)
leave_one_out.__name__
other._private
from tests.test_lora_parameters import _batch
"""
    assert _private_uses(source, ("mergeopt", "tests")) == [
        "line 5: mergeopt.loading.problem._random_world",
        "line 6: module mergeopt._internal",
        "line 13: tests.test_lora_parameters._batch",
        "line 8: mergeopt…_differences",
        "line 9: problem…_shard",
        "line 10: baselines…_mixing_law",
    ]


def test_nothing_in_the_package_imports_tests_notebooks_or_benchmarks():
    outside = {"tests", "notebooks", "benchmarks"}
    found = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in outside:
                found.setdefault(name, []).append(node.module)
            elif isinstance(node, ast.Import):
                found.setdefault(name, []).extend(
                    a.name for a in node.names if a.name.split(".")[0] in outside
                )
    assert {k: v for k, v in found.items() if v} == {}


def _documented_modules(text: str) -> tuple[set[str], set[str]]:
    """(modules, packages) the Modules table of docs/explanations/architecture.md names in its first
    column: ``search/grid.py``, ``dirichlet.py`` is two modules of search/ (a bare name takes the
    folder of the name before it); ``config/`` is a package, every module in it."""
    modules, packages = set(), set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            if name.endswith("/"):
                packages.add(name)
                continue
            if "/" in name:
                folder = name.rpartition("/")[0] + "/"
                modules.add(name)
            else:
                modules.add(folder + name)
    return modules, packages


def test_every_module_has_a_row_in_the_architecture_table():
    """A module's job is said where the docs list the package's modules; two had none (the device
    checks of loading/devices.py, export/token_files.py), found by reading, not by a test."""
    modules, packages = _documented_modules(
        (REPO / "docs" / "explanations" / "architecture.md").read_text(encoding="utf-8")
    )
    missing = [
        relative
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
        and (relative := path.relative_to(PACKAGE).as_posix()) not in modules
        and not relative.startswith(tuple(packages))
    ]
    assert missing == []
    assert {m for m in modules if not (PACKAGE / m).is_file()} == set()  # no row for a module gone
    assert _documented_modules("| `search/grid.py`, `cmaes.py` | x |\n| `config/` | y |") == (
        {"search/grid.py", "search/cmaes.py"},
        {"config/"},
    )
