"""Checks of what a user hands a command, made before the command does any work.

Every command (fit, plan, train, rank, calibrate, merge, export, transfer, diagnose) runs its
paths, numbers and files through these first, so a mistake is one line naming the culprit (a
:class:`~mergeopt.errors.UserError`) instead of a traceback, and a run that could not write its
outputs is refused before it spends an hour computing them, not after. The checks say what is
wrong in the user's terms: a directory given where a file is expected is "a directory, not a
file", not "does not exist"; NaN is "not a finite number" (``abs(nan - 1) > tol`` is false, so a
tolerance test alone lets it through).

Standard library only at import time: the command line checks its options with these before the
seconds torch takes to import.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.runtime import faults

MAX_SEED = 2**63 - 1  # what numpy, torch and Python's random all accept


# ----------------------------------------------------------------------------- paths


def kind_of(path: Path) -> str:
    """What is at ``path``, in words: 'a directory', 'a file', 'a broken link', 'nothing', ..."""
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    if path.is_dir():
        return "a directory"
    if path.is_file():
        return "a file"
    if path.exists():
        return "a device, pipe or socket"
    return "nothing"


def _refuse(path: Path, what: str, wanted: str) -> UserError:
    found = kind_of(path)
    if found == "nothing":
        return UserError(f"{what} {path} does not exist")
    return UserError(f"{what} {path} is {found}, not {wanted}")


def _given(path: str | os.PathLike, what: str, wanted: str = "give a path") -> Path:
    """``path`` as a Path; an empty one is refused (``Path("")`` is ".", the current directory)."""
    if not os.fspath(path).strip():
        raise UserError(f"{what} is empty: {wanted}")
    return Path(path)


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path``, which must be a file (a directory there is said to be one)."""
    path = _given(path, what)
    if not path.is_file():
        raise _refuse(path, what, "a file")
    return path


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    """``path``, which must be a directory (a file there is said to be one)."""
    path = _given(path, what)
    if not path.is_dir():
        raise _refuse(path, what, "a directory")
    return path


def existing(path: str | os.PathLike, what: str) -> Path:
    """``path``, a file or a directory (for inputs that take either)."""
    path = _given(path, what)
    if not (path.is_file() or path.is_dir()):
        raise _refuse(path, what, "a file or a directory")
    return path


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    return probe


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path``, a directory the command can create (when missing) and write files into.

    The check creates and at once removes one hidden entry in the directory, or in the nearest
    directory above it that exists, which is where the command would create it: permission bits
    alone cannot tell (root may write anywhere but not into ``/proc``, or onto a read-only mount).
    An empty path is refused: ``Path("")`` is the current directory, where it would write.
    """
    path = _given(path, what, "name a directory for the outputs (e.g. runs/NAME)")
    probe = _nearest_existing(path)
    if not probe.is_dir():
        if probe == path:
            raise _refuse(path, what, "a directory")
        raise UserError(f"{what} {path} cannot be created: {probe} is {kind_of(probe)}, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".mergeopt-write-check-", dir=probe)).rmdir()
    except OSError as err:
        where = "written" if probe == path else f"created in {probe}"
        raise UserError(f"{what} {path} cannot be {where} ({err.strerror or type(err).__name__})") from None
    return path


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path``, a file the command can write (replace, or create in a directory it can create)."""
    path = _given(path, what, "name a file to write")
    if path.exists() and not path.is_file():
        raise _refuse(path, what, "a file")
    writable_dir(path.parent, f"{what} {path}: the directory")
    return path


def distinct_dirs(named: Mapping[str, str | os.PathLike]) -> None:
    """Directories a command writes whole, one per name: two names for one place (``a/b`` and
    ``a/./b``, or a link to it) would have the second output replace the first."""
    seen: dict[Path, str] = {}
    for what, path in named.items():
        full = Path(path).expanduser().resolve()
        if full in seen:
            raise UserError(f"{seen[full]} and {what} are the same directory {path}: each needs its own")
        seen[full] = what


# ----------------------------------------------------------------------------- numbers


def finite(
    value: Any,
    what: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a float, refused unless finite and within the bounds given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} is {value!r}, not a number")
    if not math.isfinite(value):
        raise UserError(f"{what} is {value}, not a finite number")
    if above is not None and not value > above:
        raise UserError(f"{what} is {value:g}; it must be above {above:g}")
    if at_least is not None and not value >= at_least:
        raise UserError(f"{what} is {value:g}; it must be at least {at_least:g}")
    if at_most is not None and not value <= at_most:
        raise UserError(f"{what} is {value:g}; it must be at most {at_most:g}")
    return float(value)


def seed(value: Any, what: str) -> int:
    """A seed: a whole number in 0 ... 2^63 - 1 (what numpy, torch and random all take)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{what} is {value!r}, not a whole number")
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{what} is {value}; a seed is a whole number from 0 to 2^63 - 1")
    return value


# ----------------------------------------------------------------------------- files that must parse


def json_file(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """The JSON in the file at ``path``, which must parse and be a ``kind`` (an object by default)."""
    path = existing_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text (is it JSON?)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, kind):
        expected = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise UserError(f"{what} {path} must hold {expected}, not {type(data).__name__}")
    return data


# the files a Hugging Face tokenizer is saved as (fast, SentencePiece, byte-level BPE vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def tokenizer_error(
    path: str | os.PathLike, err: Exception, what: str = "", gguf_file: str | None = None
) -> UserError:
    """One line for a tokenizer transformers cannot load from ``path`` (``what``: the recipe's
    words for it, such as "the base"; ``gguf_file``: the GGUF file that holds it).

    A directory without any tokenizer file is said so: transformers' own message then begins
    "Couldn't instantiate the backend tokenizer from one of:" and lists the options on the lines
    after it. Otherwise transformers' message, its lines folded into one.
    """
    named = f"{what} {path}" if what else str(path)
    directory = Path(path)
    if (
        gguf_file is None
        and directory.is_dir()
        and not any((directory / f).is_file() for f in TOKENIZER_FILES)
    ):
        return UserError(
            f"{named} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside "
            "the weights, as tokenizer.save_pretrained(DIR) does"
        )
    detail = " ".join(str(err).split())[:300] or type(err).__name__
    source = f"{named}/{gguf_file}" if gguf_file else named
    return UserError(f"cannot load a tokenizer from {source}: {detail}")


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a safetensors file; a truncated or damaged file is
    one line (safetensors checks that the header's offsets cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {}
            for name in handle.keys():  # noqa: SIM118
                sliced = handle.get_slice(name)
                tensors[name] = (tuple(sliced.get_shape()), str(sliced.get_dtype()))
            return tensors
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable safetensors file ({first})") from None


def _positive_number(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    )


def lora_patterns(config: Mapping[str, Any], where: str) -> None:
    """A LoRA adapter's ``rank_pattern`` and ``alpha_pattern``: objects whose keys are regexes and
    whose values are positive numbers (ranks whole), as PEFT reads them."""
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise UserError(f"{where}: {key} must be an object {{module: value}}, not {pattern!r}")
        for module, value in pattern.items():
            try:
                re.compile(module)
            except re.error as err:
                raise UserError(f"{where}: {key} key {module!r} is not a valid regex ({err})") from None
            whole = key != "rank_pattern" or (isinstance(value, int) and not isinstance(value, bool))
            if not (_positive_number(value) and whole):
                need = "a positive whole number" if key == "rank_pattern" else "a positive number"
                raise UserError(f"{where}: {key}[{module!r}] is {value!r}, not {need}")


def lora_targets(targets: Iterable[str], module_names: Iterable[str], what: str) -> None:
    """Every LoRA target names some module, by PEFT's rule (the name, or its last dotted part)."""
    names = list(module_names)
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            leaves = sorted({n.rpartition(".")[2] for n in names} - {""})
            leaves = [leaf for leaf in leaves if not leaf.isdigit()]
            raise UserError(
                f"{what} {target!r} matches no module of the base (its modules end in: {', '.join(leaves)})"
            )


# ----------------------------------------------------------------------------- the environment

# torchrun's variables: name -> (the value of a lone process, the least valid value, what it is)
TORCHRUN = {
    "WORLD_SIZE": (1, 1, "a number of processes (1 or more)"),
    "RANK": (0, 0, "a process rank (0 or more)"),
    "LOCAL_RANK": (0, 0, "a process rank (0 or more)"),
}


def torchrun_variable(name: str, environ: Mapping[str, str] = os.environ) -> int:
    """``WORLD_SIZE``, ``RANK`` or ``LOCAL_RANK`` as a whole number; unset or empty, a lone
    process's value. Every reader goes through here: ``int(os.environ[...])`` made garbage a
    traceback in one command and ignored it in the next."""
    lone, least, meaning = TORCHRUN[name]
    raw = environ.get(name, "")
    if not raw.strip():
        return lone
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise UserError(f"{name}={raw!r} in the environment is not {meaning}")
    return value


def environment(environ: Mapping[str, str] = os.environ) -> None:
    """The variables every command may read, checked before it starts: torchrun's (whole numbers,
    each rank below ``WORLD_SIZE``) and ``MERGEOPT_FAULT``. Checked where they are read, a garbage
    value was a traceback after the work had begun, or (a fault spec) only once a loop reached its
    first fault point."""
    size = torchrun_variable("WORLD_SIZE", environ)
    for name in ("RANK", "LOCAL_RANK"):
        rank = torchrun_variable(name, environ)
        if rank >= size:
            raise UserError(
                f"{name}={rank} in the environment is not below WORLD_SIZE={size}: a process rank "
                "runs from 0 to WORLD_SIZE - 1 (torchrun sets both; unset them to run one process)"
            )
    spec = environ.get(faults.VARIABLE)
    if spec:
        faults.parse(spec)
