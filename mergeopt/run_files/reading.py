"""Reading and checking a run file: one line for every way a file can be wrong, a newer
``schema_version`` refused rather than misread, and the JSON Schemas the docs publish.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

import mergeopt
from mergeopt.errors import UserError
from mergeopt.inputs import existing_file
from mergeopt.run_files.base import SCHEMA_VERSION, RunFile
from mergeopt.run_files.diagnose import DiagnoseFile
from mergeopt.run_files.mixture import MixtureFile
from mergeopt.run_files.reports import CalibrationReport, RankReport, TransferReport

RUN_FILES: tuple[type[RunFile], ...] = (
    MixtureFile,
    RankReport,
    CalibrationReport,
    TransferReport,
    DiagnoseFile,
)
T = TypeVar("T", bound=RunFile)


def validated(model: type[T], data: dict[str, Any], path: str | Path) -> T:
    """``data`` as ``model`` (the writer's check before writing, the reader's after reading)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "required key is missing" if first["type"] == "missing" else first["msg"]
        raise UserError(f"{path}: {loc + ': ' if loc else ''}{msg.removeprefix('Value error, ')}") from None


def read_run_file(model: type[T], path: str | Path) -> T:
    """Read ``path`` (a run directory means its ``model.FILE``): one line for every way it can be wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / model.FILE
    existing_file(path, f"{model.FILE.removesuffix('.json').replace('_', ' ')} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if path.suffix.lower() in (".yaml", ".yml"):  # a recipe where the run's file was meant
            raise UserError(
                f"{path}: a YAML file (a recipe?), not a {model.FILE}: name the run directory or its {model.FILE}"
            ) from None
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {model.FILE} must be a JSON object")
    version = data.get("schema_version", 1)  # files from before versioning are version 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: schema_version {version!r} is not a positive whole number")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {version} is newer than mergeopt {mergeopt.__version__} reads "
            f"(up to {SCHEMA_VERSION}); upgrade mergeopt to read it"
        )
    return validated(model, data, path)


def read_finished_mixture(path: str | Path) -> MixtureFile:
    """A finished fit's mixture.json: the one check every command that consumes one makes."""
    mixture = read_run_file(MixtureFile, path)
    if mixture.status != "complete":
        where = Path(path) / MixtureFile.FILE if Path(path).is_dir() else path
        raise UserError(
            f"{where}: the fit did not finish (status {mixture.status!r}, not 'complete'); "
            "use a finished fit's mixture.json"
        )
    return mixture


def json_schemas() -> dict[str, dict]:
    """{file name: its JSON Schema}: what the docs publish."""
    return {model.FILE: model.model_json_schema() for model in RUN_FILES}
