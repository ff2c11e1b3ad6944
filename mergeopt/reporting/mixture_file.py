"""Reading a finished fit's mixture.json: one set of checks for every command that consumes one.

mergeopt.export.merge, mergeopt.export and mergeopt.reporting.analysis all start from a mixture.json; a
half-written or hand-edited one must be refused the same way by each, in one line naming the file.
fit writes ``status: complete`` into it, last, so a missing or other status means the fit did not
finish.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergeopt.errors import UserError


def read_finished_mixture(path: str | Path) -> dict:
    """The mixture.json at ``path`` (a run directory means its mixture.json), checked as finished."""
    path = Path(path)
    if path.is_dir():
        path = path / "mixture.json"
    if not path.is_file():
        raise UserError(f"mixture file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a mixture.json must be a JSON object")
    if data.get("status") != "complete":
        raise UserError(
            f"{path}: the fit did not finish (status {data.get('status')!r}, not 'complete'); "
            "use a finished fit's mixture.json"
        )
    if not isinstance(data.get("weights"), dict) or not data["weights"]:
        raise UserError(f"{path}: has no 'weights' mapping (not a mixture.json written by mergeopt.fit)")
    if not isinstance(data.get("method", {}), dict):
        raise UserError(f"{path}: 'method' must be a mapping")
    return data
