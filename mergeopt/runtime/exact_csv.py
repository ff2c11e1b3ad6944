"""pandas' ``read_csv`` with every float parsed exactly, under every pandas mergeopt supports.

Why: a ``grid.csv``, a rank table or a trace is written with each float's shortest repr and must
read back as the same float, or a resumed run, a bit-exact comparison with the grid runs or a
ranking of near-tied mixtures changes in the 17th digit. pandas before 3.1 parses floats to within
a unit in the last place by default (about a third of random doubles come back one ulp off), and
only ``float_precision="round_trip"`` is exact there; pandas 3.1 parses exactly by default and
deprecates that argument (a ``Pandas4Warning`` on every read). So the argument is passed where it
is needed and nowhere else.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path
from typing import Any


@cache
def _needs_round_trip() -> bool:
    import pandas as pd

    major, minor = (int(part) for part in pd.__version__.split(".")[:2])
    return (major, minor) < (3, 1)


def read_csv(path: Any, **kwargs: Any):
    """``pandas.read_csv(path, **kwargs)``, its floats exactly those written (see the module)."""
    import pandas as pd

    if _needs_round_trip():
        kwargs.setdefault("float_precision", "round_trip")
    return pd.read_csv(path, **kwargs)


def data_lines(path: Any) -> list[int]:
    """The 1-based line of the file on which each data row of the CSV table at ``path`` starts.

    What every message about a row of a user's table names (:func:`at_line`, :func:`line_of`): the
    line an editor shows, the header's being 1 unless blank lines come before it. It is the row's
    0-based index + 2 only in the plain case: ``pandas.read_csv`` (as mergeopt calls it, with its
    defaults) skips blank lines, those empty or of whitespace alone, before the header too, and a
    quoted cell may hold line breaks. So the lines are counted here with Python's ``csv`` module
    (the same double-quote quoting), skipping what pandas skips. Assumed: no ``comment`` or
    ``skiprows`` options, and no quoted cell that pandas and the ``csv`` module split differently.
    An unreadable file gives no lines (callers then take the plain case: :func:`file_line`).
    """
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.reader(handle)
            after = 0  # the last line the reader has consumed
            for row in reader:
                start, after = after + 1, reader.line_num
                if len(row) <= 1 and not "".join(row).strip():
                    continue  # blank: pandas skips it
                lines.append(start)
    except (OSError, csv.Error):
        return []
    return lines[1:]  # the first is the header


def file_line(path: Any, row: int) -> int:
    """The line (1-based, header = line 1) of the 0-based data row ``row`` of a CSV (:func:`data_lines`);
    row + 2, the plain case, when the file can no longer be read as it was."""
    lines = data_lines(path)
    return lines[row] if 0 <= row < len(lines) else row + 2


def at_line(path: Any, row: int) -> str:
    """``"PATH line N"``: how an error names the 0-based data row ``row`` of the CSV at ``path``
    (``f"{at_line(path, row)}: what is wrong"``), the same for every command that reads a table."""
    return f"{path} line {file_line(path, row)}"


def line_of(path: Any, line: int) -> str:
    """``"line N of NAME"``: how a report names line ``line`` (from :func:`file_line`) of a table."""
    return f"line {line} of {Path(str(path)).name}"
