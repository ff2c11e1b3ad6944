"""The docs: generated pages cover everything they document, the nav and the README hold together.

The site is built by ``mkdocs build --strict`` in .ci/run (it fails on a broken link or anchor);
these tests check the generators' output (docs/scripts/pages.py) without building it, against
independent walks of what each page documents: the recipe schema, the parser tree, the JSON
Schemas and benchmarks/results/.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from mergeopt.cli import HANDLERS, build_parser
from mergeopt.config import Recipe

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"


def _load_pages():
    spec = importlib.util.spec_from_file_location("mergeopt_docs_pages", DOCS / "scripts" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pages = _load_pages()


@pytest.fixture(scope="module")
def generated() -> dict[str, str | bytes]:
    return pages.all_pages()


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """First cell (a `code` key) -> the row's cells, for every table row of a page."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and re.fullmatch(r"`[^`]+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


# ----------------------------------------------------------------------------- recipe keys


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, pydantic.BaseModel)


def _schema_fields(model: type[pydantic.BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, FieldInfo) of every key of the schema: sections walked into, a list of items
    (``data.dev``) listed and then the keys of one item (``data.dev[].name``)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        optional = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(optional) == 1 and _is_model(optional[0]):  # Section | None
            ann = optional[0]
        items = typing.get_args(ann)
        if _is_model(ann):
            keys += _schema_fields(ann, f"{prefix}{name}.")
        elif len(items) == 2 and items[1] is Ellipsis and _is_model(items[0]):
            keys.append((prefix + name, field))
            keys += _schema_fields(items[0], f"{prefix}{name}[].")
        else:
            keys.append((prefix + name, field))
    return keys


def test_every_recipe_key_has_a_description():
    missing = [key for key, field in _schema_fields(Recipe) if not (field.description or "").strip()]
    assert not missing, f"recipe keys without a description in mergeopt/config/: {missing}"


def test_recipe_reference_lists_every_key_with_its_type_default_and_description():
    rows = _table_rows(pages.recipe_page())
    keys = _schema_fields(Recipe)
    assert len(keys) > 90
    for key, field in keys:
        assert key in rows, f"the recipe reference misses {key}"
        _, type_cell, default_cell, meaning = rows[key]
        assert type_cell and meaning, key
        assert meaning == pages._cell(field.description), key
        if field.is_required():
            assert default_cell == "*required*", key
    # defaults as YAML spells them
    optim = Recipe.model_fields["optim"].default
    for name in ("lr", "steps", "batch_size", "eval_every", "patience", "min_delta", "eval_batch_size"):
        assert rows[f"optim.{name}"][2] == f"`{getattr(optim, name)}`", name
    assert rows["model.exclude"][2] == "`[]`" and rows["model.gguf_file"][2] == "`null`"
    assert rows["deterministic"][2] == "`false`" and rows["objective.terms[].stop"][2] == '`["\\n"]`'
    assert "`bfloat16`" in rows["model.stack_dtype"][1] and rows["optim.lr"][1] == "float, > 0.0"


def test_a_key_without_a_description_shows_as_an_empty_cell():
    class Section(pydantic.BaseModel):
        documented: int = pydantic.Field(default=1, description="Has words.")
        bare: int = 2

    class Top(pydantic.BaseModel):
        section: Section = Section()

    rows = _table_rows(pages.recipe_page(Top))
    assert rows["section.documented"][3] == "Has words." and rows["section.bare"][3] == ""


# ----------------------------------------------------------------------------- CLI


def test_cli_reference_lists_every_verb_and_option():
    page = pages.cli_page()
    verbs = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    assert set(verbs) == set(HANDLERS)
    for name, parser in verbs.items():
        section = page.split(f"## `mergeopt {name}`", 1)[1].split("\n## ", 1)[0]
        assert f"usage: mergeopt {name}" in section, name
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in section, f"mergeopt {name} {option}"
            if not action.option_strings:
                assert (action.metavar or action.dest) in section, f"mergeopt {name} {action.dest}"
        assert "```bash\nmergeopt " + name in section, f"the example of mergeopt {name}"


# ----------------------------------------------------------------------------- run files


def test_run_file_page_lists_every_key_of_every_schema():
    page = pages.schemas_page()
    schemas = sorted((DOCS / "reference" / "schemas").glob("*.schema.json"))
    assert [p.name for p in schemas] == [
        "calibration.schema.json",
        "diagnose.schema.json",
        "mixture.schema.json",
        "rank_report.schema.json",
        "transfer_report.schema.json",
    ]
    for path in schemas:
        schema = json.loads(path.read_text(encoding="utf-8"))
        name = path.name.removesuffix(".schema.json") + ".json"
        section = page.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        assert f"(schemas/{path.name})" in section
        for key in schema["properties"]:
            assert f"| `{key}` |" in section, f"{name}: {key}"
        for definition, body in schema.get("$defs", {}).items():
            assert f"### `{definition}`" in section
            for key in body["properties"]:
                assert f"| `{key}` |" in section, f"{name}: {definition}.{key}"


def test_schema_types_read_as_types():
    nullable_map = {
        "anyOf": [{"type": "object", "additionalProperties": {"type": "number"}}, {"type": "null"}]
    }
    assert pages.schema_type(nullable_map) == "object of number or null"
    assert pages.schema_type({"type": "array", "items": {"$ref": "#/$defs/RankStatistics"}}) == (
        "array of RankStatistics"
    )


# ----------------------------------------------------------------------------- benchmarks


def test_every_result_file_is_in_the_benchmarks_section(generated):
    summary = generated["benchmarks/SUMMARY.md"]
    results = [p for p in sorted(RESULTS.rglob("*")) if p.is_file()]
    assert len([p for p in results if p.suffix == ".md"]) >= 12
    for path in results:
        rel = path.relative_to(RESULTS).as_posix()
        page = generated[f"benchmarks/{rel}"]
        if path.suffix != ".md":
            assert page == path.read_bytes(), rel
            continue
        assert f"]({pages._link(rel)})" in summary, rel
        body = path.read_text(encoding="utf-8")
        if body.startswith("# "):
            body = body.split("\n", 1)[1]
        assert body.strip() in page, f"{rel} is not shown verbatim"
        assert f"`benchmarks/results/{rel}`" in page


def test_generated_pages_link_only_to_pages_and_files_that_exist(generated):
    handwritten = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*") if p.is_file()}
    known = handwritten | set(generated)
    for path, content in generated.items():
        if isinstance(content, bytes):
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", content):
            if target.startswith(("http://", "https://")):
                continue
            resolved = (Path(path).parent / pages.urllib.parse.unquote(target)).as_posix()
            parts = []
            for part in resolved.split("/"):
                parts = parts[:-1] if part == ".." else [*parts, part]
            assert "/".join(parts) in known, f"{path} links to {target}"


# ----------------------------------------------------------------------------- nav and README


def _nav_paths(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_paths(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_paths(value)]
    return []


def test_the_nav_lists_every_page_and_only_pages_that_exist(generated):
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_paths(config["nav"])
    written = {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if "scripts" not in p.relative_to(DOCS).parts
    }
    pages_ = written | {p for p in generated if p.endswith(".md") and not p.endswith("SUMMARY.md")}
    for entry in nav:
        if entry.endswith("/"):  # a section whose nav literate-nav reads from its SUMMARY.md
            assert f"{entry}SUMMARY.md" in generated, entry
        else:
            assert entry in pages_, f"mkdocs.yml names {entry}, which is neither written nor generated"
    covered = {p for p in pages_ if p in nav or any(e.endswith("/") and p.startswith(e) for e in nav)}
    assert pages_ - covered == set(), "pages missing from the nav"


def test_readme_is_short_links_resolve_and_matches_ci():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    install, tests = blocks[0], blocks[1]
    assert install.startswith("python3 -m venv .venv") and "pip install -e '.[dev]'" in install
    assert tests == ". .venv/bin/activate && python -m pytest -q -n auto"
    assert ci.rstrip().endswith("\npython -m pytest -q -n auto")
    assert ci.index("ruff format --check .") < ci.index("mkdocs build --strict\n") < ci.index("pytest")


# ----------------------------------------------------------------------------- recipe keys in prose

PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
# dotted names in the docs that start like a recipe section but are something else
MIXTURE_JSON_KEYS = (  # mixture.json's free-form "search" and "objective" records
    "search.evaluations_per_process",
    "search.scoring",
    "search.non_finite",
    "search.non_finite_closing",
    "objective.scores",
)
REMOVED_KEYS = ("weights.temperature",)  # the docs say a recipe that still sets it is refused
NOT_KEYS = re.compile(
    r"\.(py|json|safetensors|md|yaml)$"  # files: merge.py, model.safetensors
    r"|^model\.(layers|embed_tokens)\b"  # a model's parameter names
    r"|^model\.data\."  # NeMo's own config keys (the export guide)
)


def _schema_has(model: type[pydantic.BaseModel], parts: list[str]) -> bool:
    """Whether a dotted recipe key (list indices as numbers) names a field of ``model``."""
    if not parts:
        return True
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    rest = parts[1:]
    while rest and rest[0].isdigit():  # data.dev.0.weight: an item of a list
        rest = rest[1:]
    if not rest:
        return True
    inner = [field.annotation, *typing.get_args(field.annotation)]
    inner += [a for t in inner for a in typing.get_args(t)]
    if len(rest) == 1 and any(typing.get_origin(t) is dict for t in inner):
        return True  # model.experts.math: a key of a mapping
    sections = [t for t in inner if isinstance(t, type) and issubclass(t, pydantic.BaseModel)]
    return any(_schema_has(section, rest) for section in sections)


def test_every_recipe_key_the_docs_name_is_a_key_of_the_recipe():
    """A key in backticks that starts with a recipe section (`optim.lr`, `model.compute_dtype=...`)
    is a field of the recipe, so renaming a key without its docs fails here. mixture.json's own
    keys are checked against what the code writes."""
    sections = "|".join(Recipe.model_fields)
    named = re.compile(rf"`((?:{sections})\.[A-Za-z_][A-Za-z0-9_.]*?)\.?(?:[=:][^`]*)?`")
    unknown, found = [], 0
    for page in PAGES:
        for key in named.findall(page.read_text(encoding="utf-8")):
            if NOT_KEYS.search(key) or key in MIXTURE_JSON_KEYS or key in REMOVED_KEYS:
                continue
            found += 1
            if not _schema_has(Recipe, key.split(".")):
                unknown.append(f"{page.relative_to(REPO)}: {key}")
    assert found > 100 and not unknown, unknown
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "mergeopt").rglob("*.py"))
    for key in MIXTURE_JSON_KEYS:
        assert f'"{key.split(".")[-1]}"' in source, f"mixture.json's {key} is not written by the code"
    for key in REMOVED_KEYS:
        assert not _schema_has(Recipe, key.split(".")) and f'"{key.split(".")[-1]}"' in source


def _fragment_recipe(fragment: dict) -> dict:
    """A docs fragment (``weights:``, ``logging:``) inside the least recipe it needs: experts named
    after those it constrains, and training sets where a repetition cap counts their tokens."""
    weights = fragment.get("weights") or {}
    names = {*weights.get("bounds", {}), *weights.get("pinned", {}), *weights.get("tokens", {})}
    names |= {n for members in (weights.get("groups") or {}).values() for n in members}
    names = sorted(names) or ["math", "code"]
    if len(names) < 2:
        names.append("chat")
    least = {
        "model": {"base": "/ckpt/base", "experts": {n: f"/ckpt/{n}" for n in names}},
        "data": {"dev": [{"name": "dev", "path": "dev.jsonl"}]},
    }
    if "max_epochs" in weights:  # the sources' tokens: weights.tokens, the others' from train.data
        least["train"] = {"data": {n: f"train/{n}.jsonl" for n in names}}
    return {**least, **fragment}


def test_every_recipe_the_docs_show_is_a_valid_recipe():
    """Each YAML block of the README and the docs whose keys are recipe sections validates as a
    recipe: whole recipes as they are, fragments inside the least recipe they need."""
    from mergeopt.config.loading import recipe_from_dict

    shown = 0
    for page in PAGES:
        for block in re.findall(r"```ya?ml\n(.*?)\n```", page.read_text(encoding="utf-8"), flags=re.S):
            tree = yaml.safe_load(block)
            if not set(tree) <= set(Recipe.model_fields):  # an lm-eval task, a mergekit config
                assert not set(tree) & {"model", "data", "optim", "search", "weights"}, (page, block)
                continue
            recipe_from_dict(tree if "model" in tree else _fragment_recipe(tree), str(page))
            shown += 1
    assert shown >= 6


# ----------------------------------------------------------------------------- commands in the docs

COMMAND = re.compile(r"(?:^|&&|;|\s)(?:mergeopt |python -m mergeopt\.|-m mergeopt\.)([a-z]+)\b(.*)$")


def _shown_commands() -> list[tuple[str, str, str]]:
    """(page, verb, the rest of the line) of every mergeopt command in the docs' bash blocks."""
    import shlex

    commands = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)\n```", page.read_text(encoding="utf-8"), flags=re.S):
            lines = block.replace("\\\n", " ").splitlines()
            # the block's shell variables (T='objective.terms=[...]'), put in where they are used
            variables = dict(re.findall(r"^([A-Za-z_]\w*)=(.+)$", "\n".join(lines), flags=re.M))
            variables = {name: shlex.split(value)[0] for name, value in variables.items()}
            for line in lines:
                line = re.sub(r'"?\$(\w+)"?', lambda m, v=variables: shlex.quote(v.get(m[1], m[0])), line)
                command = re.split(r" # | && | \| | > ", line)[0]  # the command, not what follows
                match = COMMAND.search(command)
                if match:
                    commands.append((str(page.relative_to(REPO)), match.group(1), match.group(2)))
    return commands


def test_every_command_the_docs_show_parses_and_its_overrides_are_recipe_keys():
    """Each mergeopt command of a bash block parses with that verb's parser (no unknown or missing
    option), and each key=value override in it names a key of the recipe."""
    import shlex

    from mergeopt.cli import command_parser

    commands = _shown_commands()
    assert len(commands) >= 40
    for page, verb, rest in commands:
        assert verb in HANDLERS, f"{page}: mergeopt {verb}"
        argv = []
        for word in shlex.split(rest):  # "..." stands for an option's values, or for more overrides
            if word not in ("...", "…"):
                argv.append(word)
            elif argv and argv[-1].startswith("--"):
                argv.append("name=path")
        args = command_parser(verb).parse_intermixed_args(argv)  # a mistake raises UserError
        for override in getattr(args, "overrides", None) or []:
            key = override.split("=", 1)[0]
            assert _schema_has(Recipe, key.split(".")), f"{page}: mergeopt {verb} {rest}: {key}"


def test_every_option_the_docs_name_is_an_option_of_its_verb():
    """`mergeopt VERB ... --option` in the prose (often a fragment, not a whole command) names an
    option that verb has."""
    from mergeopt.cli import command_parser

    options = {
        verb: {s for action in command_parser(verb)._actions for s in action.option_strings}
        for verb in HANDLERS
    }
    named = 0
    for page in PAGES:
        for verb, rest in re.findall(r"`mergeopt ([a-z]+)\b([^`]*)`", page.read_text(encoding="utf-8")):
            assert verb in HANDLERS, f"{page.name}: mergeopt {verb}"
            for option in re.findall(r"(?:^|\s)(--[a-z][a-z-]*)", rest):
                named += 1
                assert option in options[verb], f"{page.name}: mergeopt {verb} {option}"
    assert named >= 10


def test_the_python_the_set_up_names_is_the_one_pyproject_requires():
    """README and the tiny-world page name the oldest Python; pyproject's requires-python is what
    pip enforces. It said 3.10 while the floors of transformers (5.25) and trl (1.16) require 3.11:
    on 3.10 pip failed to find a transformers, not saying that the Python was too old."""
    import tomllib

    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "requires-python"
    ]
    assert requires == ">=3.11", requires
    floor = requires.removeprefix(">=")
    for page in (REPO / "README.md", DOCS / "getting-started" / "tiny-world.md"):
        named = re.findall(r"Python (3\.[0-9]+)\+", page.read_text(encoding="utf-8"))
        assert named == [floor], (page.name, named)
    assert sys.version_info >= tuple(int(x) for x in floor.split("."))


def test_the_dependency_floors_are_the_pins_of_requirements_lowest():
    """pyproject.toml's lower bounds are the versions requirements/lowest.txt pins (the oldest the
    suite has run with, docs/development.md), one for one."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    floors = dict(
        re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d.split(";")[0].strip()).groups() for d in declared
    )
    lines = (REPO / "requirements" / "lowest.txt").read_text(encoding="utf-8").splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))

    def release(version: str) -> list[int]:  # 2.11 is 2.11.0
        parts = [int(x) for x in version.split(".")]
        return parts + [0] * (3 - len(parts))

    assert floors.keys() == pins.keys()
    assert all(release(floors[name]) == release(pins[name]) for name in floors), (floors, pins)
