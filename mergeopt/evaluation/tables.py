"""Score tables made elsewhere: loading, joining a proxy table to a truth table on their mixtures.

A table is one CSV, or RegMix's layout ``MIXTURES.csv+METRICS.csv`` (two files joined on their
``index`` column). Rows are matched on their weight vectors (rounded to 1e-6) and metric columns are
paired by name, then scored with :func:`mergeopt.evaluation.rank_stats.rank_statistics`. Two scales of runs
(``python -m mergeopt.transfer``) are paired on the mixtures both hold, :func:`shared_mixtures`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from mergeopt.errors import UserError
from mergeopt.evaluation.rank_stats import rank_statistics, varies
from mergeopt.evaluation.table_checks import (
    WEIGHT_DECIMALS,
    check_enough_mixtures,
    check_numbers,
    check_weights,
)
from mergeopt.runtime.exact_csv import at_line, read_csv

DEFAULT_PREFIXES = ("w_", "train_")  # ours, then RegMix's train_the_pile_*
# columns mergeopt train (and RegMix's tables) write beside the metrics that are not metrics: a run's
# number, its path, its token count, its seed. Ranked as metrics they would pass for findings.
BOOKKEEPING_COLUMNS = frozenset({"index", "run", "path", "tokens", "steps", "seed"})


def check_commas(path: str) -> None:
    """Refuse a table whose header is split by semicolons or tabs rather than commas.

    Why: pandas reads such a file as one column (or, with a decimal comma, as a ragged table with a
    warning), and the error that followed blamed the mixture columns. Spreadsheets in many locales
    save "CSV" with semicolons, so the delimiter is what the message must name. A rank grid and
    calibrate's runs are checked too (:func:`mergeopt.evaluation.proxy.read_grid`): the error there
    was "no weight column w_<expert>", for a table whose weight columns are all there.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = next((line for line in handle if line.strip()), "")
    if "," in header:
        return
    for delimiter, name in ((";", "semicolons"), ("\t", "tabs")):
        if delimiter in header:
            raise UserError(
                f"{path}: the header is separated by {name}, not commas; save the table as comma-separated CSV"
            )


def check_header(path: str) -> None:
    """:func:`check_commas`, then refuse a header that names a column twice or a row with more
    cells than the header names.

    Why: pandas renames a repeated ``loss`` to ``loss.1`` and ranked the first alone, or blamed a
    column ``w_a.1`` the file does not have; a row with a cell too many (a stray comma) lost its
    last cell without a word (``index_col=False``, a ParserWarning), or shifted every column of a
    grid by one when every row had it. Empty cells past the header's (a trailing comma) are left to
    pandas, which drops them. Lines are counted as :func:`data_lines` counts them.
    """
    check_commas(path)
    try:
        _check_cells(path)
    except csv.Error:
        return  # what the csv module cannot split (a cell past its size limit): pandas says why


def _check_cells(path: str) -> None:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        after = 0
        for row in reader:
            start, after = after + 1, reader.line_num
            if len(row) <= 1 and not "".join(row).strip():
                continue  # blank: pandas skips it
            if header is None:
                header = row
                seen: set[str] = set()
                for name in row:
                    if name and name in seen:
                        raise UserError(
                            f"{path}: the header names column {name!r} twice; give each column a name of its own"
                        )
                    seen.add(name)
            elif any(cell.strip() for cell in row[len(header) :]):  # a trailing comma is no cell
                raise UserError(
                    f"{path} line {start}: {len(row)} cells, but the header names {len(header)} columns "
                    "(a stray comma, or a cell with a comma that needs quotes?)"
                )


def _read_csv(path: str) -> pd.DataFrame:
    """A CSV with RegMix's quirks handled: a trailing comma makes an unnamed, empty column; drop it."""
    if Path(path).is_dir():
        raise UserError(f"{path} is a directory, not a file")
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    check_header(path)
    try:
        frame = read_csv(path, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable CSV table ({first})") from None
    empty = [c for c in frame.columns if str(c).startswith("Unnamed:") and frame[c].isna().all()]
    frame = frame.drop(columns=empty)
    if frame.empty:
        raise UserError(f"{path}: the table has no rows")
    return frame


def row_label(frame: pd.DataFrame, i: int) -> str:
    """A mixture's label in the transfer report (its 1-based data row; errors name the line: :func:`row_at`)."""
    return f"row {i + 1} (index {frame['index'].iloc[i]})" if "index" in frame.columns else f"row {i + 1}"


def _split(spec: str) -> list[str] | None:
    """A split table's two files, ``MIXTURES.csv+METRICS.csv``; None for one CSV."""
    return None if Path(spec).is_file() or "+" not in spec else spec.split("+")


def row_at(spec: str, frame: pd.DataFrame, i: int, column: str | None = None) -> str:
    """Where row ``i`` of the table :func:`load_table` read from ``spec`` is, for an error:
    ``"FILE line N"`` (:func:`mergeopt.runtime.exact_csv.at_line`). A split table's rows are its
    mixture file's, in that order; a ``column`` of its metrics file names that file's line of the
    row with the same index."""
    parts = _split(spec)
    if parts is None:
        return at_line(spec, i)
    if column is not None and column != "index":
        metrics = _read_csv(parts[1])
        if column in metrics.columns:
            hits = np.flatnonzero((metrics["index"] == frame["index"].iloc[i]).to_numpy())
            if hits.size:
                return at_line(parts[1], int(hits[0]))
    return at_line(parts[0], i)


def load_table(spec: str) -> tuple[pd.DataFrame, str]:
    """One CSV, or ``MIXTURES.csv+METRICS.csv`` joined on ``index``; returns the table and the file holding weights."""
    parts = _split(spec)
    if parts is None:
        return _read_csv(spec), spec
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{spec}: write a split table as MIXTURES.csv+METRICS.csv (two files)")
    mixtures, metrics = (_read_csv(p) for p in parts)
    for path, frame in zip(parts, (mixtures, metrics)):
        if "index" not in frame.columns:
            raise UserError(f"{path}: a split table needs an 'index' column to join on")
        repeated = np.flatnonzero(frame["index"].duplicated().to_numpy())
        if repeated.size:
            i = int(repeated[0])
            first = int(np.flatnonzero((frame["index"] == frame["index"].iloc[i]).to_numpy())[0])
            raise UserError(
                f"{at_line(path, i)}: index {frame['index'].iloc[i]} appears more than once, first at "
                f"{at_line(path, first)}"
            )
    for path, frame, other in ((parts[0], mixtures, metrics), (parts[1], metrics, mixtures)):
        unmatched = ~frame["index"].isin(other["index"])
        if unmatched.any():
            i = int(np.flatnonzero(unmatched)[0])
            raise UserError(
                f"{at_line(path, i)}: index {frame['index'].iloc[i]} has no row in the other file"
            )
    shared = (set(mixtures.columns) & set(metrics.columns)) - {"index"}
    if shared:
        raise UserError(f"{spec}: both files have column(s) {sorted(shared)}")
    return mixtures.merge(metrics, on="index", how="left", validate="one_to_one"), parts[0]


def mixture_columns(
    frame: pd.DataFrame, source: str, prefix: str | None, columns: Sequence[str] | None
) -> list[str]:
    """The weight columns: named explicitly, or found by prefix (``w_``, then RegMix's ``train_``)."""
    if columns:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise UserError(f"{source}: no mixture column(s) {missing}")
        return list(columns)
    for candidate in [prefix] if prefix else DEFAULT_PREFIXES:
        found = [str(c) for c in frame.columns if str(c).startswith(candidate)]
        if found:
            return found
    tried = prefix or " or ".join(DEFAULT_PREFIXES)
    # RegMix keeps the weights apart from the scores: its METRICS.csv alone has an index and no weights
    split = (
        "; a table of scores by index wants its weights as MIXTURES.csv+METRICS.csv"
        if "index" in frame
        else ""
    )
    raise UserError(
        f"{source}: no mixture columns (looked for the prefix {tried}); use --mixture-prefix or "
        f"--mixture-columns{split}"
    )


def same_mixture_columns(cols: Sequence[str], own: Sequence[str], source: str, reference: str) -> None:
    """Refuse a table whose mixture columns (``own``, in ``source``) are not those of ``reference``
    (``cols``), before any row's weights are checked: a column one table lacks would otherwise show
    as weights that do not sum to 1. The table lacking a column is named."""
    lacks, extra = sorted(set(cols) - set(own)), sorted(set(own) - set(cols))
    if lacks and not extra:
        raise UserError(f"{source}: no mixture column(s) {lacks} (present in {reference})")
    if extra and not lacks:
        raise UserError(f"{reference}: no mixture column(s) {extra} (present in {source})")
    if lacks:
        raise UserError(
            f"{source}: its mixture columns differ from those of {reference}; it lacks {lacks}; "
            f"it has extra {extra}"
        )


def check_distinct_mixtures(weights: np.ndarray, frame: pd.DataFrame, spec: str) -> dict[tuple, int]:
    """Refuse a table holding one mixture twice (weights rounded to 1e-6): ranked as two mixtures,
    a repeated run would be counted twice. Returns each mixture's row, keyed by its rounded weights."""
    seen: dict[tuple, int] = {}
    for i, row in enumerate(np.round(weights, WEIGHT_DECIMALS)):
        key = tuple(row.tolist())
        if key in seen:
            raise UserError(
                f"{row_at(spec, frame, i)}: the same weights as {row_at(spec, frame, seen[key])}; "
                "average repeated runs of a mixture into one row first"
            )
        seen[key] = i
    return seen


def shared_mixtures(
    weights: Sequence[np.ndarray], frames: Sequence[pd.DataFrame], sources: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two tables with the same weights (rounded to 1e-6), in the first table's order.

    Either table may hold mixtures the other lacks (a large-scale sweep usually reruns a few of the
    small-scale mixtures; a proxy scores many more mixtures than were trained); a mixture twice in
    one table is ambiguous.
    """
    first, second = (check_distinct_mixtures(w, f, s) for w, f, s in zip(weights, frames, sources))
    pairs = [(i, second[key]) for key, i in first.items() if key in second]
    if not pairs:
        raise UserError(
            f"{sources[0]} and {sources[1]} share no mixtures (rows are matched on their weights, rounded to 1e-6)"
        )
    rows = np.array(sorted(pairs), dtype=int)
    return rows[:, 0], rows[:, 1]


def weight_prefixes(cols: Sequence[str], prefix: str | None, named: Sequence[str] | None) -> list[str]:
    """The prefix that found the weight columns (``w_``, ``train_``, ``--mixture-prefix``): every
    column with it is a weight, even one not chosen. None when the columns were named one by one."""
    if named:
        return []
    return [p for p in ([prefix] if prefix else DEFAULT_PREFIXES) if any(c.startswith(p) for c in cols)][:1]


def holds_numbers(values: pd.Series) -> bool:
    """Whether a column holds numbers: a numeric column, or one with at least one cell that reads as
    a finite number (a metric with a stray text cell, which :func:`metric_values` then names). A
    column of text only (a run's name, a note) holds none."""
    if pd.api.types.is_numeric_dtype(values):
        return True
    return bool(np.isfinite(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)).any())


def not_a_metric(column: str, weights: set, prefixes: Sequence[str] = ()) -> str | None:
    """Why ``column`` is no metric (a weight or bookkeeping column), or None when it may be one."""
    if column in weights or any(column.startswith(p) for p in prefixes):
        return "a mixture weight"
    if column in BOOKKEEPING_COLUMNS or column.startswith("Unnamed:"):
        return "a bookkeeping column"
    return None


def metric_columns(
    proxy: pd.DataFrame,
    truth: pd.DataFrame,
    exclude: set,
    requested,
    sources,
    prefixes: Sequence[str] = (),
) -> list[str]:
    """Metrics paired by name: those requested, or every column both tables share that holds numbers
    in either (:func:`holds_numbers`) and is neither a weight (``exclude``, or a column with a
    mixture prefix) nor bookkeeping (run, tokens...). A metric's cell that is not a finite number is
    refused later, naming its line (:func:`metric_values`), never dropped with its column."""
    if requested:
        for m in requested:
            if (why := not_a_metric(str(m), exclude, prefixes)) is not None:
                raise UserError(f"--metrics {m}: {m} is {why}, not a metric")
        for frame, source in zip((proxy, truth), sources):
            missing = [m for m in requested if m not in frame.columns]
            if missing:
                raise UserError(f"{source}: no metric column(s) {missing}")
        return list(requested)
    shared = [
        str(c)
        for c in proxy.columns
        if c in truth.columns
        and not_a_metric(str(c), exclude, prefixes) is None
        and (holds_numbers(proxy[c]) or holds_numbers(truth[c]))
    ]
    if not shared:
        raise UserError(f"{sources[0]} and {sources[1]} share no numeric metric columns")
    return shared


def metric_values(frame: pd.DataFrame, metric: str, source: str) -> np.ndarray:
    """A metric column's values; each must be a finite number (an error names the first row that is not)."""
    check_numbers(frame, metric, lambda i: row_at(source, frame, i, metric))
    return frame[metric].to_numpy(dtype=np.float64)


def aggregate_metrics(pairs: dict, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the metrics an aggregate is taken over, those left out): a metric constant in the proxy or
    the truth ranks nothing (its statistics are n/a) and would only blur the aggregate, so the
    aggregate is over the others; over every metric when none varies in both."""
    over = [m for m in names if varies(*pairs[m])]
    return (over, [m for m in names if m not in over]) if over else (list(names), [])


def rank_tables(
    proxy_spec: str,
    truth_spec: str,
    *,
    mixture_prefix: str | None = None,
    mixture_cols: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    higher_is_better: Sequence[str] = (),
    k: int = 3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[dict, dict, pd.DataFrame]:
    """Load, join and score two tables on the mixtures both hold; returns the report, the paired
    scores (for the plot) and the compared mixtures' weights (one row per pair, the proxy table's order)."""
    (proxy, proxy_src), (truth, truth_src) = load_table(proxy_spec), load_table(truth_spec)
    cols = mixture_columns(proxy, proxy_src, mixture_prefix, mixture_cols)
    if mixture_cols:
        missing = [c for c in cols if c not in truth.columns]
        if missing:
            raise UserError(f"{truth_src}: no mixture column(s) {missing} (present in {proxy_src})")
    else:
        same_mixture_columns(
            cols, mixture_columns(truth, truth_src, mixture_prefix, None), truth_src, proxy_src
        )
    proxy_w, truth_w = check_weights(proxy, cols, proxy_src), check_weights(truth, cols, truth_src)
    proxy_rows, truth_rows = shared_mixtures([proxy_w, truth_w], [proxy, truth], [proxy_spec, truth_spec])
    check_enough_mixtures(len(proxy_rows), (proxy_spec, truth_spec))
    prefixes = weight_prefixes(cols, mixture_prefix, mixture_cols)
    names = metric_columns(proxy, truth, set(cols), metrics, (proxy_spec, truth_spec), prefixes)
    unknown = sorted(set(higher_is_better) - set(names))
    if unknown or "mean" in names:
        raise UserError(
            f"--higher-is-better names {unknown}, not a compared metric"
            if unknown
            else "a metric column is called 'mean', which names the overall target here; rename it"
        )
    pairs = {
        m: (metric_values(proxy, m, proxy_spec)[proxy_rows], metric_values(truth, m, truth_spec)[truth_rows])
        for m in names
    }
    directions = {m: m in higher_is_better for m in names}
    options = {"k": k, "n_bootstrap": n_bootstrap, "seed": seed, "confidence": confidence}
    results = {
        m: rank_statistics(
            *pairs[m], higher_is_better=directions[m], name=m, undefined_when_constant=True, **options
        )
        for m in names
    }
    notes = []
    if len(proxy_rows) < len(proxy) or len(truth_rows) < len(truth):
        notes.append(
            f"compared on the {len(proxy_rows)} mixtures both tables hold (of {len(proxy)} in the proxy "
            f"table and {len(truth)} in the truth table)"
        )
    if len(set(directions.values())) == 1:
        over, left_out = aggregate_metrics(pairs, names)
        pairs["mean"] = tuple(np.mean([pairs[m][s] for m in over], axis=0) for s in (0, 1))
        results["mean"] = rank_statistics(
            *pairs["mean"],
            higher_is_better=directions[names[0]],
            name="mean",
            undefined_when_constant=True,
            **options,
        )
        if left_out:
            notes.append(f"mean of {', '.join(over)}; left out, constant in a table: {', '.join(left_out)}")
    else:
        notes.append("no mean: the metrics mix lower- and higher-is-better")
    note = "\n".join(notes) or None
    report = {
        "proxy": proxy_spec,
        "truth": truth_spec,
        "mixture_columns": cols,
        "n_mixtures": len(proxy_rows),
        "options": options,
        "metrics": results,
        "note": note,
    }
    weights = proxy.iloc[proxy_rows][cols].reset_index(drop=True)
    return report, pairs, weights


class ScaleTable(NamedTuple):
    """One table ``mergeopt transfer`` loaded: its role (SMALL, LARGE or TRAIN), the frame, the spec the
    user wrote, the weights."""

    role: str
    frame: pd.DataFrame
    spec: str
    weights: np.ndarray
