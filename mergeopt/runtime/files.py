"""Atomic writes for run directories: a reader never sees a half-written file.

Every output is written to a temporary file in the same directory and renamed over the target,
which is atomic on POSIX filesystems, so a crash leaves either the old file or the new one.
``mkstemp`` creates its file with mode 0600 whatever the umask; the file is given the mode ``open()``
would have given it (0666 less the umask, 0644 under the usual 022) before it is renamed into place,
so a teammate on a shared cluster can read a run as they can read any other file the user writes.
Staging directories made with ``mkdtemp`` (0700) get ``mkdir``'s 0777 less the umask the same way.
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


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it: setting and
    restoring it would, for a moment, give files other threads create the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only other way to read it
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new hidden directory in ``parent`` with the mode ``mkdir`` would give it (``mkdtemp``'s
    0700 would stay on the directory it is renamed to)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(staging, 0o777 & ~current_umask())
    return staging


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
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
