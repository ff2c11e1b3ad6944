"""Recipes from YAML: a safe loader that refuses duplicate keys, dotted ``key=value`` overrides, and
validation errors turned into one line that names the file and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from mergeopt.config.recipe import Recipe
from mergeopt.errors import UserError, did_you_mean
from mergeopt.inputs import existing_file


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """The mapping, refusing a key written twice; a merge key (``<<: *defaults``) is YAML's way to
    share a block, its keys overridable by those written beside it, and is left to SafeLoader."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "output_dir=/tmp/x"]`` -> ``{"optim.lr": 0.1, "output_dir": "/tmp/x"}``.

    Values are read as YAML scalars or flow collections, so ``true``, ``3``, ``[a, b]`` and
    ``{math: 0.5, code: 0.5}`` get their natural types.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_\-]+)*", key):
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed[key] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"override {item!r}: value is not valid YAML ({problem})") from None
    return parsed


def _apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` in the YAML tree; a number indexes a list (``data.dev.0.name``), as the
    validation errors spell list items."""
    node: Any = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"override {dotted}: {where} is a list of {len(node)} item(s); "
                    f"index it with 0 to {len(node) - 1}, not {part!r}"
                )
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise UserError(f"override {dotted}: {where} is not a section, cannot set a key under it")
        if last:
            node[index] = value
            return
        child = node[index] if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[index] = {}
        node = child


def _section_model(parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The recipe section that ``parts`` (an error's location, list indices included) leads to."""
    section: type[BaseModel] | None = Recipe
    for part in parts:
        if isinstance(part, int) or section is None:
            continue  # a list's item: its section is the list's own
        field = section.model_fields.get(str(part))
        section = None if field is None else _first_model(field.annotation)
    return section


def _first_model(annotation: Any) -> type[BaseModel] | None:
    """The section class inside an annotation (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in get_args(annotation):
        found = _first_model(inner)
        if found is not None:
            return found
    return None


def _unknown_key(loc: tuple) -> str:
    """'unknown key', with the section's key it is most likely a typo of."""
    section = _section_model(loc[:-1])
    keys = [] if section is None else [f.alias or n for n, f in section.model_fields.items()]
    return "unknown key" + did_you_mean(str(loc[-1]), keys)


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return loc, _unknown_key(tuple(error["loc"]))
    if error["type"] == "missing":
        return loc, "required key is missing"
    if error["type"] == "string_type" and isinstance(error["input"], bool):
        return _yaml_boolean(error)
    if error["type"] in ("tuple_type", "list_type"):  # pydantic says "tuple" of a field users write as a list
        return loc, f"should be a list, such as [a, b] (YAML), got {error['input']!r}"
    if error["type"] in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        # pydantic writes a bound in full: 1e30 as thirty-one digits
        ((op, bound),) = error["ctx"].items()
        sign = {"le": "<=", "ge": ">=", "lt": "<", "gt": ">"}[op]
        shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return loc, f"{error['input']} is out of range: it must be {sign} {shown}"
    msg = error["msg"].removeprefix("Value error, ")
    return loc, msg


def _yaml_boolean(error: dict[str, Any]) -> tuple[str, str]:
    """A name YAML read as a boolean: an expert or dev set called ``no`` (Norwegian), ``on`` or ``yes``
    written unquoted is ``false`` or ``true``, which pydantic called only 'not a valid string'."""
    value = error["input"]
    words = "yes, on or true as true" if value else "no, off or false as false"
    parts = [str(p) for p in error["loc"]]
    what = "is the boolean"
    if parts[-1] == "[key]":  # a mapping's key: its location is the mapping's, the index pydantic's
        parts, what = parts[:-2], "has a key that is the boolean"
    return ".".join(parts), (
        f"{what} {str(value).lower()}, not a string: YAML reads an unquoted {words}; quote it (e.g. 'no')"
    )


def _set_by(key: str, loc: str, msg: str) -> bool:
    """Whether an error at ``loc`` saying ``msg`` is about the overridden ``key``: the key itself or
    a key inside it, a section's check (``weights`` for ``weights.init``) that names the key, or an
    unknown section the key made (``modle`` for ``modle.base``)."""
    above = key.startswith(f"{loc}." if loc else "")
    return (
        loc == key or loc.startswith(key + ".") or (above and (key in msg or msg.startswith("unknown key")))
    )


def recipe_from_dict(
    tree: dict[str, Any], source: str = "<recipe>", overridden: Sequence[str] = ()
) -> Recipe:
    """Validate a nested dict; the error names the source and the first offending key."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        errors = err.errors()
        # a misspelt key also leaves the key it meant missing: the typo is the error to show
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        loc, msg = _describe((unknown or errors)[0])
        where = f"{source}: {loc}" if loc else source
        origin = " (set on the command line)" if any(_set_by(k, loc, msg) for k in overridden) else ""
        raise UserError(f"{where}: {msg}{origin}") from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML (safe loader, no duplicate keys), apply ``key=value`` overrides, validate."""
    path = existing_file(path, "recipe")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (is this a YAML recipe?)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(tree).__name__}")
    if {"schema_version", "status"} & set(tree) and "model" not in tree:  # YAML reads JSON: a run's file
        raise UserError(
            f"{path} is a run's result file ({path.name}), not a recipe: pass the "
            "recipe, the run directory's recipe.yaml (merge takes a fitted mixture with --mixture)"
        )
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        _apply_override(tree, key, value)
    return recipe_from_dict(tree, str(path), list(parsed))


def recipe_to_yaml(recipe: Recipe, absolute_paths: bool = False) -> str:
    """The fully resolved recipe (every default spelled out), loadable again with load_recipe.

    ``absolute_paths``: each relative local path made absolute (:func:`anchor_paths`), as a run
    directory's recipe.yaml is written."""
    tree = recipe.model_dump(mode="json")
    if absolute_paths:
        anchor_paths(tree)
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


# the recipe keys that name local files or directories (``*``: every key or item at that level)
PATH_KEYS = (
    "output_dir",
    "model.base",
    "model.experts.*",
    "data.dev.*.path",
    "data.chat_template",
    "train.data.*",
    "train.output_dir",
    "rank.grid",
    "calibrate.grid",
    "world.cache_dir",
    "logging.dir",
    "objective.terms.*.include_path",
)


def anchor_paths(tree: dict, cwd: Path | None = None) -> None:
    """Make each relative path of ``tree`` (a dumped recipe) absolute against ``cwd``, in place.

    Recipe paths are relative to the directory a command runs in, but a run directory's
    recipe.yaml is read later from anywhere: by ``mergeopt export`` (mergekit's config names the
    experts), ``merge``, ``calibrate``, or a rerun. So it names the files the run read. A path is
    anchored where it exists (a hub name or a path that was never there is left as written), and
    output_dir always; ``tiny://`` world paths and absolute paths are kept.
    """
    here = Path.cwd() if cwd is None else cwd

    def anchored(value, always: bool):
        if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
            return value
        full = here / value
        return os.path.abspath(full) if always or full.exists() else value

    def walk(node, keys: list[str], always: bool):
        if not keys or node is None:
            return
        head, rest = keys[0], keys[1:]
        items = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        for key, value in items:
            if head != "*" and key != head:
                continue
            if rest:
                walk(value, rest, always)
            else:
                node[key] = anchored(value, always)

    for dotted in PATH_KEYS:
        walk(tree, dotted.split("."), dotted == "output_dir")
