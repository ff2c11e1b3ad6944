"""mergeopt.runtime.exact_csv: every float a table holds reads back as the float written, under the pandas
installed, without pandas' deprecation warning; and the package reads no CSV any other way."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergeopt.runtime import exact_csv

REPO = Path(__file__).resolve().parent.parent


def _doubles(n: int = 20000) -> np.ndarray:
    """Doubles over 16 decades; before pandas 3.1 its default parser reads about a third of them
    one unit in the last place off."""
    rng = np.random.default_rng(0)
    return rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)


def test_floats_read_back_exactly_without_a_warning(tmp_path):
    values = _doubles()
    path = tmp_path / "grid.csv"
    path.write_text("run,w_a\n" + "".join(f"r{i},{float(v)!r}\n" for i, v in enumerate(values)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pandas 3.1 warns (Pandas4Warning) when asked for round_trip
        frame = exact_csv.read_csv(path)
    assert frame["w_a"].to_numpy().tobytes() == values.tobytes()


def test_the_callers_arguments_pass_through(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b,\n0.1,0.30000000000000004,\n")  # a trailing comma, as RegMix's tables have
    frame = exact_csv.read_csv(path, index_col=False)
    assert list(frame.columns)[:2] == ["a", "b"]
    assert frame.at[0, "b"] == 0.30000000000000004


@pytest.mark.parametrize(
    ("version", "asked"),
    [("2.2.2", True), ("2.3.3", True), ("3.0.6", True), ("3.1.0", False), ("4.0.0", False)],
)
def test_round_trip_is_asked_for_exactly_where_the_default_is_inexact(monkeypatch, version, asked):
    """Measured with each pandas (2026-12-05): 2.2.2 to 3.0.6 read 71,682 of 200,000 such doubles
    an ulp off by default and none with round_trip; 3.1.0 and 3.1.1 read none off by default and
    warn when round_trip is asked for."""
    seen = {}
    monkeypatch.setattr(pd, "__version__", version)
    monkeypatch.setattr(pd, "read_csv", lambda path, **kwargs: seen.update(kwargs))
    exact_csv._needs_round_trip.cache_clear()
    try:
        exact_csv.read_csv("unused.csv", index_col=False)
    finally:
        exact_csv._needs_round_trip.cache_clear()
    assert seen == ({"index_col": False, "float_precision": "round_trip"} if asked else {"index_col": False})


def test_the_package_and_benchmarks_read_csv_only_through_exact_csv():
    """A plain ``pd.read_csv`` would bring back pandas-before-3.1's inexact floats (a benchmark's
    numbers would then depend on the pandas installed, in their last digits)."""
    found = []
    for path in sorted([*(REPO / "mergeopt").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        if path.name == "exact_csv.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "read_csv":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, found


def test_a_rows_line_is_where_pandas_read_it_from(tmp_path):
    """data_lines: the file line each row pandas reads starts on (header = line 1), past the blank
    and whitespace-only lines pandas skips and the line breaks of a quoted cell; at_line and line_of
    are how errors and reports name it."""
    path = tmp_path / "grid.csv"
    path.write_text('\n  \nw_a,note\n0.5,plain\n\n1.0,"two\nlines"\n   \n0.0,last\r\n,\n')
    rows = exact_csv.read_csv(path)
    assert rows["note"].tolist()[:3] == ["plain", "two\nlines", "last"] and len(rows) == 4
    assert exact_csv.data_lines(path) == [4, 6, 9, 10]
    assert [exact_csv.file_line(path, i) for i in range(4)] == [4, 6, 9, 10]
    assert exact_csv.at_line(path, 2) == f"{path} line 9"
    assert exact_csv.line_of(path, 9) == "line 9 of grid.csv"
    # a row the file no longer has (it was rewritten since): the plain case, index + 2
    assert exact_csv.file_line(path, 7) == 9 and exact_csv.file_line(tmp_path / "gone.csv", 0) == 2
