"""Atomic writes for run directories: a reader never sees a half-written file.

Every output is written to a temporary file in the same directory and renamed over the target,
which is atomic on POSIX filesystems, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_csv_atomic(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and v != v else v) for k, v in row.items()})
    return write_text_atomic(path, buffer.getvalue())


def save_figure_atomic(figure, path: str | Path, dpi: int = 120) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())
