"""The generated pages of the docs: the recipe keys, the CLI, the run-file schemas and the benchmarks.

Each page is written from the thing it documents, at build time, so it cannot drift from it: the
recipe reference from the pydantic schema (``mergeopt.config.Recipe``), the CLI reference from the
parser tree (``mergeopt.cli.build_parser``), the run-file page from the JSON Schemas in
``docs/reference/schemas/`` (themselves generated from ``mergeopt.run_files``), and the benchmark
pages from ``benchmarks/results/``. ``gen_pages.py`` hands :func:`all_pages` to mkdocs-gen-files;
tests/test_docs.py checks the pages without building the site.

Functions here return page contents (Markdown text, or the bytes of a copied result file); nothing
is written to disk.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "docs" / "reference" / "schemas"
RESULTS = REPO / "benchmarks" / "results"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, and outside code spans ``<``
    escaped, so a placeholder such as ``<output_dir>`` is not read as an HTML tag."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`" if "`" not in text else f"`` {text} ``"


# ----------------------------------------------------------------------------- recipe keys


@dataclass(frozen=True)
class RecipeKey:
    """One row of the recipe reference: a dotted key and what the schema says about it."""

    key: str  # e.g. "optim.lr", "data.dev[].name"
    type: str
    default: str
    constraints: str
    description: str
    section: str  # the section the row is listed under, e.g. "data.dev[]"


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(model, is_list, optional) when the annotation is a section, a list of items, or ``Section | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, False
    if _is_union(annotation):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and isinstance(rest[0], type) and issubclass(rest[0], BaseModel):
            return rest[0], False, True
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True, False
    return None, False, False


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any, nested: bool = False) -> str:
    """A recipe author's name for a type: ``float``, ``one of `a`, `b` ``, ``list of str``,
    ``mapping str → float``, ``int or null``; inside a list or mapping, alternatives join with ``/``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        values = [f"`{a}`" for a in args]
        return "/".join(values) if nested else "one of " + ", ".join(values)
    if _is_union(annotation):
        return ("/" if nested else " or ").join(type_name(a, nested) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list of {type_name(args[0], True)}"
    if origin is dict:
        return f"mapping {type_name(args[0], True)} → {type_name(args[1], True)}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


_BOUNDS = (
    (annotated_types.Gt, "gt", "> {}"),
    (annotated_types.Ge, "ge", "≥ {}"),
    (annotated_types.Lt, "lt", "< {}"),
    (annotated_types.Le, "le", "≤ {}"),
)


def _constraints(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for kind, attr, text in _BOUNDS:
            if isinstance(item, kind):
                parts.append(text.format(getattr(item, attr)))
        if isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} item{'s' if item.min_length != 1 else ''}")
    return ", ".join(parts)


def recipe_keys(model: type[BaseModel], prefix: str = "", section: str = "") -> list[RecipeKey]:
    """Every key of the recipe, depth first in declaration order: sections are walked into, a list of
    items (``data.dev``) is a row and then the keys of one item (``data.dev[].name``)."""
    rows: list[RecipeKey] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub, is_list, optional = _model_of(field.annotation)
        if sub is not None and not is_list:
            rows += recipe_keys(sub, key + ".", key)
            continue
        description = field.description or ""
        shown = "list of items (keys below)" if is_list else type_name(field.annotation)
        rows.append(RecipeKey(key, shown, _default(field), _constraints(field), description, section))
        if is_list:
            rows += recipe_keys(sub, key + "[].", key + "[]")
    return rows


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], bool]]:
    """(dotted name, model, optional) of every section and list item, depth first."""
    found = []
    for name, field in model.model_fields.items():
        sub, is_list, optional = _model_of(field.annotation)
        if sub is None:
            continue
        key = prefix + name + ("[]" if is_list else "")
        found.append((key, sub, optional))
        found += _sections(sub, key + ".")
    return found


RECIPE_INTRO = """\
# Recipe keys

A recipe is one YAML file that describes a whole run. Every key, its type and its default live in
one typed, frozen schema, `mergeopt/config/`; this page is generated from it when the docs are
built, so it lists exactly what the code accepts. Unknown keys and wrong types are errors that name
the key and the file (see [Bad input](bad-input.md)).

Any key can be set on the command line after the recipe, as a dotted `key=value`. Values are read
as YAML: `optim.steps=50`, `model.exclude=[norm,lm_head]`, `weights.init={math: 0.5, code: 0.5}`.
A number indexes a list, as the error messages spell list items: `data.dev.0.weight=2`.
`mergeopt fit --out DIR` is the same as `output_dir=DIR`. A run directory's `recipe.yaml` is the
resolved recipe, every default spelled out, so `mergeopt fit runs/x/recipe.yaml --out runs/y` reruns
it (`--restart` instead of `--out` replaces `runs/x`, which the fit otherwise refuses to overwrite).

Paths of the form `tiny://base`, `tiny://experts/<domain>`, `tiny://dev/<domain>.jsonl` (and
`tiny://train/<domain>.jsonl`) point into the tiny world, `smollm2://...` into the SmolLM2 world;
each is built on first use, under `world.cache_dir`. `random://CONFIG` builds seeded random
weights from a `config.json` ([Memory](../guides/memory.md#a-synthetic-world-for-large-shapes-random)).
"""


def recipe_page(model: type[BaseModel] | None = None) -> str:
    """The recipe reference: one table per section, every key with its type, default and meaning."""
    if model is None:
        from mergeopt.config import Recipe

        model = Recipe
    rows = recipe_keys(model)
    lines = [RECIPE_INTRO]
    header = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def table(section: str) -> list[str]:
        out = []
        for row in rows:
            if row.section == section:
                default = "*required*" if row.default == "required" else _code(row.default)
                kind = row.type + (f", {row.constraints}" if row.constraints else "")
                out.append(f"| {_code(row.key)} | {_cell(kind)} | {default} | {_cell(row.description)} |")
        return header + out if out else []

    lines += ["## Top level", "", *table(""), ""]
    for name, sub, optional in _sections(model):
        lines += [f"## `{name}`", ""]
        if name.endswith("[]"):
            lines += [f"The keys of each item of the `{name[:-2]}` list.", ""]
        doc = (sub.__doc__ or "").strip()
        if doc and not doc.startswith(("A base class", "Usage docs")):
            lines += [" ".join(doc.split()), ""]
        if optional:
            lines += ["Optional: only `mergeopt train` needs it.", ""]
        rows_here = table(name)
        lines += [*(rows_here or ["(keys in the sections below)"]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


CLI_INTRO = """\
# Command line

mergeopt is one command with verbs: `mergeopt VERB ...`. This page is generated from the parser
tree (`mergeopt.cli.build_parser`) when the docs are built. `mergeopt VERB --help` prints the same.

Every `python -m mergeopt.VERB ...` form (`python -m mergeopt.fit`, `python -m mergeopt.rank`, ...)
and `python -m mergeopt VERB ...` are aliases of `mergeopt VERB ...`, for scripts written before
the single command.

What every verb shares:

- A recipe verb (`fit`, `plan`, `train`, `rank`, `merge`) takes the recipe and then any number of
  dotted `key=value` overrides ([Recipe keys](recipe.md)); options may come before or after them.
- `--quiet` turns off progress bars and messages; `--debug` shows the traceback of a user error.
- A mistake in the input is one line on stderr, `mergeopt: error: ...`, and exit code 2, with
  nothing written ([Bad input](bad-input.md)). SIGINT and SIGTERM save a fit's state and exit
  with 130 and 143 ([Resume](../guides/resume.md)).

Environment: `MERGEOPT_CACHE` is where the built-in worlds are cached (default
`~/.cache/mergeopt`; `world.cache_dir` overrides it). Under torchrun, `WORLD_SIZE` and
`LOCAL_RANK` set the ranks ([Several GPUs](../guides/multi-gpu.md)).

**Shell completion** of verbs, options and choices comes with the optional `argcomplete` extra:

```bash
pip install 'mergeopt[completion]'
eval "$(register-python-argcomplete mergeopt)"   # in ~/.bashrc (bash, zsh)
```
"""


def _arg_name(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return names
        meta = action.metavar or (
            "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
        )
        return f"{names} {meta}"
    meta = action.metavar or action.dest
    return {"*": f"[{meta} ...]", "+": f"{meta} [{meta} ...]", "?": f"[{meta}]"}.get(action.nargs, meta)


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _wide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage wrapped at a fixed width, so the page does not depend on the terminal that built it."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=96)
    return parser


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI reference: each verb's usage, arguments and options, and an example."""
    from mergeopt.cli import EXAMPLES as examples

    if parser is None:
        from mergeopt.cli import build_parser

        parser = build_parser()
    lines = [CLI_INTRO, "## `mergeopt`", "", "```", _wide(parser).format_usage().strip(), "```", ""]
    verbs = _verbs(parser)
    lines += ["| verb | what it does |", "| --- | --- |"]
    lines += [
        f"| [`{name}`](#mergeopt-{name}) | {_cell(sub.description or '')} |" for name, sub in verbs.items()
    ]
    lines += ["", "`mergeopt --version` prints the version.", ""]
    for name, sub in verbs.items():
        lines += [f"## `mergeopt {name}`", "", sub.description or "", ""]
        lines += ["```", _wide(sub).format_usage().strip(), "```", ""]
        exclusive = {
            id(a): [b for b in g._group_actions if b is not a]
            for g in sub._mutually_exclusive_groups
            for a in g._group_actions
        }
        lines += ["| argument | meaning |", "| --- | --- |"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            help_text = action.help or ""
            notes = []
            default = action.default
            unset = default is None or default is False or default in ([], "", argparse.SUPPRESS)
            if not unset and action.nargs != 0 and "default" not in help_text:
                notes.append(f"default {default}")
            if action.required and action.option_strings:
                notes.append("required")
            if action.choices and action.option_strings and action.metavar is not None:
                notes.append("one of " + ", ".join(map(str, action.choices)))
            others = exclusive.get(id(action))
            if others:
                notes.append("not with " + ", ".join(o.option_strings[0] for o in others))
            meaning = help_text + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(f"| {_code(_arg_name(action))} | {_cell(meaning)} |")
        lines.append("")
        if name == "export":
            from mergeopt.export.formats import FORMATS

            lines += ["| `--to` | what the numbers are |", "| --- | --- |"]
            lines += [f"| `{f.name}` | {_cell(f.meaning)} |" for f in FORMATS.values()]
            lines += ["", "More in [Export](../guides/export.md).", ""]
        if name in examples:
            lines += ["Example:", "", "```bash", examples[name], "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run-file schemas


def schema_type(node: dict[str, Any], nested: bool = False) -> str:
    """A JSON Schema node as a short type: ``number or null``, ``object of number/null``,
    ``RankStatistics``; inside an object or array, alternatives join with ``/``."""
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in node:
        return ("/" if nested else " or ").join(schema_type(n, nested) for n in node["anyOf"])
    if "enum" in node:
        return "one of " + ", ".join(map(str, node["enum"]))
    if "const" in node:
        return json.dumps(node["const"])
    kind = node.get("type", "any")
    if kind == "array":
        items = node.get("items")
        return f"array of {schema_type(items, True)}" if isinstance(items, dict) and items else "array"
    if kind == "object":
        extra = node.get("additionalProperties")
        return f"object of {schema_type(extra, True)}" if isinstance(extra, dict) and extra else "object"
    return str(kind)


def _properties_table(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", ()))
    lines = ["| key | type | required | meaning |", "| --- | --- | :---: | --- |"]
    for key, node in schema.get("properties", {}).items():
        description = _cell(node.get("description", "").replace("``", "`"))
        mark = "yes" if key in required else ""
        lines.append(f"| `{key}` | {_cell(schema_type(node))} | {mark} | {description} |")
    return lines


SCHEMAS_INTRO = """\
# Run-file schemas

The JSON files a run leaves behind are each one pydantic model in `mergeopt/run_files/`: the
writer validates through it before writing, every reader after reading, and each file carries a
`schema_version`. A file from a newer mergeopt (a larger `schema_version`) is refused in one line
rather than misread; files written before versioning are read as version 1. Readers keep keys an
older 0.x release wrote and later dropped (such as `temperature`) aside as extras.

The JSON Schemas below are generated from those models with
`python -m mergeopt.run_files docs/reference/schemas` (a test keeps them equal), and this page is
generated from the schemas when the docs are built. The other files of a run directory are
described in [Run directory](run-directory.md).
"""


def schemas_page(schema_dir: Path = SCHEMAS) -> str:
    """The run-file reference: each schema's top-level keys and definitions, and a link to the file."""
    lines = [SCHEMAS_INTRO]
    for path in sorted(schema_dir.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        name = path.name.removesuffix(".schema.json") + ".json"
        lines += [f"## `{name}`", ""]
        lines += [_cell(schema.get("description", "").replace("``", "`")), ""]
        lines += [
            f"Schema: [`{path.name}`](schemas/{path.name}) (JSON Schema, model `{schema.get('title')}`).",
            "",
        ]
        lines += [*_properties_table(schema), ""]
        for def_name, definition in schema.get("$defs", {}).items():
            lines += [f"### `{def_name}` (in `{name}`)", ""]
            if definition.get("description"):
                lines += [_cell(definition["description"].replace("``", "`")), ""]
            lines += [*_properties_table(definition), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmarks


def _title(markdown: str, fallback: str) -> tuple[str, str]:
    """(title, body without its first-level heading); a result file without one gets ``fallback``."""
    first, _, rest = markdown.partition("\n")
    if first.startswith("# "):
        return first[2:].strip(), rest.lstrip("\n")
    return fallback, markdown


# how each result folder is made again, where its name is not its script's
RERUN = {
    "gpu": "python benchmarks/gpu_check.py",
    "tiny_grid": "mergeopt train recipes/tiny_grid.yaml && mergeopt fit recipes/tiny_grid.yaml",
    "tiny_grid_metrics": "the exact-match commands of [Rank checks]({docs}guides/rank-checks.md#the-tiny-world)",
    "smollm2": "mergeopt train recipes/smollm2.yaml && mergeopt fit recipes/smollm2.yaml",
    "export_dtype": (
        "`python benchmarks/export_dtype.py RUN`, RUN a fit of `recipes/smollm2.yaml` over its three "
        "experts trained alone (the script's docstring)"
    ),
    "dora_path": "python benchmarks/lora_path.py --dora",
    "lora_moe_path": "python benchmarks/lora_path.py --moe",
    "layer_merge_moe": (
        "python benchmarks/layer_merge.py --config tests/data/configs/mixtral-140m.json "
        "--out benchmarks/results/layer_merge_moe"
    ),
}
# result files without a report of their own, shown with the report they belong to
COMPANIONS = {"layer_merge.md": ("peer_fusionbench.json",)}


def _rerun(top: str) -> str | None:
    if top in RERUN:
        return RERUN[top]
    if (REPO / f"benchmarks/{top}.py").is_file():
        return f"python benchmarks/{top}.py"
    if (REPO / f"benchmarks/{top}.sh").is_file():
        return f"bash benchmarks/{top}.sh"
    return None


def _link(path: str) -> str:
    """A relative link target that survives spaces and other characters (a GPU's name in a file name)."""
    return urllib.parse.quote(path)


# titles for result files whose own heading is missing or shared with another file's
TITLES = {
    "tiny_grid/rank_report.md": "Rank check on the tiny world's trained grid (loss)",
    "tiny_grid/amd-epyc-avx2/rank_report.md": (
        "Rank check on the tiny world's trained grid (loss), trained on an AMD EPYC with AVX2"
    ),
    "tiny_grid/intel-xeon-amx/rank_report.md": (
        "Rank check on the tiny world's trained grid (loss and exact match), trained on an Intel Xeon with AMX"
    ),
    "tiny_grid_metrics/rank_report.md": "Rank check on the tiny world's trained grid (loss and exact match)",
    "smollm2/rank_report.md": "Rank check on SmolLM2-135M with LoRA experts",
    "transfer_regmix/direct/transfer_report.md": "Ranking transfer on RegMix: 1M runs rank 60M runs",
    "transfer_regmix/surrogate/transfer_report.md": "Ranking transfer on RegMix: a LightGBM surrogate of the 1M runs",
    "transfer_tiny/transfer_report.md": "Ranking transfer between two sizes of the tiny world",
}


def benchmark_pages(results: Path = RESULTS) -> dict[str, str | bytes]:
    """Docs path -> content: a page per result file (``benchmarks/<path>.md``), the result's other
    files beside it (figures, JSON, CSV) and ``benchmarks/SUMMARY.md``, the section's navigation."""
    pages: dict[str, str | bytes] = {}
    nav = ["* [Overview](index.md)"]
    for path in sorted(results.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(results).as_posix()
        if path.suffix != ".md":
            pages[f"benchmarks/{rel}"] = path.read_bytes()
            continue
        title, body = _title(path.read_text(encoding="utf-8"), rel)
        title = TITLES.get(rel, title)
        folder = path.parent
        rerun = _rerun(rel.split("/", 1)[0].removesuffix(".md"))
        source = f"Generated from `benchmarks/results/{rel}` when the docs are built"
        depth = rel.count("/")
        back = "../" * depth + "index.md"
        if rerun is None:
            source += "."
        elif rerun.startswith(("python ", "bash ", "mergeopt ")):
            source += f"; made by `{rerun}`."
        else:  # prose with links relative to the docs root
            source += "; made by " + rerun.replace("{docs}", "../" * (depth + 1)) + "."
        lines = [f"# {title}", "", f"{source} [All benchmarks]({back}).", "", body.rstrip(), ""]
        figures = sorted(p.name for p in folder.glob("*.png")) if folder != results else []
        for figure in figures:
            lines += [f"![{figure}]({_link(figure)})", ""]
        data = [
            p
            for p in sorted(folder.iterdir())
            if p.is_file()
            and p.suffix in (".json", ".csv", ".yaml")
            and (folder != results or p.stem == path.stem or p.name in COMPANIONS.get(rel, ()))
        ]
        if data:
            links = ", ".join(f"[`{p.name}`]({_link(p.name)})" for p in data)
            lines += [f"Data: {links}.", ""]
        page = f"benchmarks/{rel}"
        pages[page] = "\n".join(lines)
        nav.append(f"* [{title}]({_link(rel)})")
    shown = {name for names in COMPANIONS.values() for name in names}
    orphans = [
        p.name
        for p in sorted(results.glob("*.json"))
        if not (results / f"{p.stem}.md").is_file() and p.name not in shown
    ]
    if orphans:
        lines = [
            "# Other result files",
            "",
            "Results committed without a Markdown report; generated from `benchmarks/results/`.",
            "",
        ]
        lines += [f"- [`{name}`]({_link(name)})" for name in orphans]
        pages["benchmarks/other.md"] = "\n".join(lines) + "\n"
        nav.append("* [Other result files](other.md)")
    pages["benchmarks/SUMMARY.md"] = "\n".join(nav) + "\n"
    return pages


def all_pages() -> dict[str, str | bytes]:
    """Every generated file of the site: docs path -> text or bytes."""
    return {
        "reference/recipe.md": recipe_page(),
        "reference/cli.md": cli_page(),
        "reference/run-files.md": schemas_page(),
        **benchmark_pages(),
    }
