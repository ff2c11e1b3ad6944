"""What every recipe section shares: strict, frozen, finite fields, and the checks on names.

A typo in a key, a NaN or an infinity anywhere in a recipe is refused before any model is loaded,
because every section derives from :class:`Section`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

NUMBERS = (int, float)


class Section(BaseModel):
    # allow_inf_nan=False: NaN passes every comparison test (abs(nan - 1) > tol is false) and inf
    # passes every `gt=0`, so every float of a recipe, nested ones too, must be a finite number
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A number given as true/false (YAML reads unquoted yes/no/on/off so too) is refused:
        pydantic's lax mode takes it as 1 or 0, and ``seed: true`` ran with seed 1, without a word.
        Checked wherever the field's type holds a number: the field itself, a mapping's values
        (``weights.init``), a list's or tuple's items (``weights.bounds``' pairs, ``train.mixtures.
        weights``), and a number beside a string (``model.device_map``'s devices)."""
        where = _bool_for_a_number(cls.model_fields[info.field_name].annotation, value)
        if where is not None:
            key = f"{'.'.join(str(p) for p in where[0])}: " if where[0] else ""
            raise ValueError(
                f"{key}{str(where[1]).lower()} is not a number (YAML reads unquoted true/false, yes/no "
                "and on/off as booleans)"
            )
        return value


def _members(annotation) -> tuple:
    """The types an annotation allows: each member of a union (``int | None``), else itself; an
    ``Annotated[T, ...]`` as its ``T``."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return tuple(m for a in get_args(annotation) if a is not NoneType for m in _members(a))
    return (annotation,)


def _bool_for_a_number(annotation, value, where: tuple = ()) -> tuple[tuple, bool] | None:
    """(the keys and indices to it, the boolean) of the first boolean in ``value`` that
    ``annotation`` takes as a number (a place that holds an ``int`` or ``float`` and no ``bool``);
    None where there is none. A section inside is left to its own fields' check."""
    members = _members(annotation)
    if isinstance(value, bool):
        if any(m is bool or m is Any for m in members) or not any(m in NUMBERS for m in members):
            return None
        return where, value
    for member in members:
        origin, args = get_origin(member), get_args(member)
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            items = [((*where, key), args[1], item) for key, item in value.items()]
        elif origin in (list, tuple) and isinstance(value, list | tuple) and args:
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                kinds = args if len(args) == len(value) else ()
            else:
                kinds = (args[0],) * len(value)
            items = [((*where, i), kind, item) for i, (kind, item) in enumerate(zip(kinds, value))]
        else:
            continue
        for place, kind, item in items:
            if (found := _bool_for_a_number(kind, item, place)) is not None:
                return found
    return None


def expand_home(path: str) -> str:
    """``~/x`` or ``~user/x`` as the shell would expand it: a recipe is YAML, which no shell reads, so
    ``model.experts.math: ~/ckpt/math`` was looked for in a folder named '~' and reported missing.
    Only a leading '~' is expanded (a hub id or a ``random://`` path never starts with one); an
    unknown user's ``~name`` is left as written, to be reported missing as it is."""
    return os.path.expanduser(path)


# a recipe value naming a file or directory the run reads or writes: '~' expanded when it is read
PathText = Annotated[str, AfterValidator(expand_home)]


def changed_options(section: BaseModel) -> list[tuple[str, Any]]:
    """A section's options set away from their defaults, in declaration order: what the
    ``unused_options`` warnings look at (a written recipe.yaml carries every default)."""
    fields = type(section).model_fields
    return [(o, getattr(section, o)) for o, f in fields.items() if getattr(section, o) != f.default]


def check_name(name: str, what: str) -> str:
    """Names become CSV columns, config keys and file names: no separators, no '..' (nothing can
    escape the output directory through a name)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} may only use letters, digits, '_', '.', '-' (not starting with '.', no '..')"
        )
    return name


def _says_test(name: str) -> bool:
    """'test' as a whole word: gsm8k_test, test-00000-of-00001, Math.Test; not contest, latest, testing."""
    return "test" in re.split(r"[^a-z0-9]+", name.lower())


def says_test_split(name: str, path: str) -> str | None:
    """Where a dev set says it is a test split, or None: the word 'test' in its name or its file's stem,
    or a folder named 'test' holding the file (a dataset's split folder, mmlu/test/x.jsonl).

    The folder must be named 'test' exactly: a folder such as ``tests`` or ``test_run0`` (pytest's
    temporary folders) is where files live, not what they hold.
    """
    file = Path(path)
    if _says_test(name):
        return f"its name {name!r}"
    if _says_test(file.stem):
        return f"its file name {file.name!r}"
    if file.parent.name.lower() == "test":
        return f"its folder {file.parent.name!r}"
    return None


def named_once(names: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``names`` as given, or the one-line error of a list that names ``what`` twice."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"names {what} twice: {', '.join(twice)}")
    return names
