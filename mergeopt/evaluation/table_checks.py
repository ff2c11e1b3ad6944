"""The checks every table of mixtures passes before it is compared: each weight and score a finite
number, each row a mixture, the rows not all one mixture, and enough of them to rank.

Why one module: score tables (`mergeopt rank`'s table mode, `transfer`), grid.csv and calibrate's
runs are refused by the same rules with the same messages, so a table accepted by one command is
accepted by all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mergeopt.errors import UserError
from mergeopt.merging.simplex import ROUNDOFF
from mergeopt.runtime.exact_csv import at_line

WEIGHT_DECIMALS = 6  # rows are matched on weights rounded to 1e-6
# RegMix publishes weights rounded to 3 decimals over 17 domains: row sums drift by up to 0.003 in
# its test tables and 0.004 in its train table, so 1e-3 would reject real data; 5e-3 still catches
# percentages, a missing column or a metric taken for a weight.
WEIGHT_SUM_TOLERANCE = 5e-3
# With 2 mixtures Spearman and Kendall are ±1 and every bootstrap resample is the same pair (or
# constant): an interval [1, 1] that says nothing. Table mode needs 3 shared mixtures at least.
MIN_MIXTURES = 3


def not_numbers(values: pd.Series) -> np.ndarray:
    """The positions of a column's empty, non-numeric, NaN or infinite cells."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return np.flatnonzero(~np.isfinite(numbers))


def check_numbers(frame: pd.DataFrame, column: str, where, what: str = "") -> None:
    """Refuse a column with a cell that is not a finite number, naming its row: ``where(i)`` is the
    row's place (:func:`mergeopt.runtime.exact_csv.at_line`), ``what`` says what the column holds."""
    bad = not_numbers(frame[column])
    if bad.size:
        more = f" (and {bad.size - 1} more row(s) below)" if bad.size > 1 else ""
        raise UserError(
            f"{where(int(bad[0]))}: column {column}{f' ({what})' if what else ''} is empty or not a finite "
            f"number{more}"
        )


def check_mixture_rows(
    weights: np.ndarray, columns: Sequence[str], where, allow_negative: bool = False
) -> None:
    """Refuse the first row (``where(i)``: its place) whose weights do not sum to 1 (±tolerance)
    or, unless ``allow_negative``, hold a negative weight beyond round-off (see :func:`clip_roundoff`)."""
    off = ~(np.abs(weights.sum(axis=1) - 1) <= WEIGHT_SUM_TOLERANCE)  # inf - inf is NaN
    negative = np.zeros_like(weights, dtype=bool) if allow_negative else weights < -ROUNDOFF
    below = negative.any(axis=1)
    bad = np.flatnonzero(off | below)
    if bad.size:
        i = int(bad[0])
        if below[i]:
            j = int(np.flatnonzero(negative[i])[0])
            raise UserError(f"{where(i)}: weight {columns[j]} is negative ({weights[i, j]:.6g})")
        raise UserError(
            f"{where(i)}: weights sum to {weights[i].sum():.6g}, not 1 (±{WEIGHT_SUM_TOLERANCE:g})"
        )


def check_weights(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    """The weights as a matrix; every entry a number, every row a mixture (sums to 1, none negative:
    the same rule as a grid's; no table we know, RegMix's included, has a negative weight)."""
    for col in columns:
        check_numbers(frame, col, lambda i: at_line(source, i), "a mixture weight")
    weights = frame[list(columns)].to_numpy(dtype=np.float64)
    check_mixture_rows(weights, list(columns), lambda i: at_line(source, i))
    weights = clip_roundoff(weights)
    check_mixtures_vary(weights, source)
    return weights


def clip_roundoff(weights: np.ndarray) -> np.ndarray:
    """Checked weights with their round-off negatives (down to −ROUNDOFF, the rule every mixture in
    mergeopt follows: :mod:`mergeopt.merging.simplex`) read as 0."""
    return np.where(weights < 0, 0.0, weights)


def check_mixtures_vary(weights: np.ndarray, source: str) -> None:
    """Refuse a table whose rows are all one mixture (rounded to 1e-6): a ranking or a fit over the
    mixtures needs at least two of them, and one mixture repeated only ranks its runs' noise."""
    distinct = len({tuple(row.tolist()) for row in np.round(weights, WEIGHT_DECIMALS)})
    if len(weights) > 1 and distinct < 2:  # one row is one run, which calibrate takes
        raise UserError(
            f"{source}: all {len(weights)} row(s) hold the same mixture; ranking mixtures needs at least "
            "two different ones"
        )


def check_enough_mixtures(n: int, specs: Sequence[str]) -> None:
    """Refuse fewer than :data:`MIN_MIXTURES` compared mixtures: with 2, every correlation is ±1."""
    if n < MIN_MIXTURES:
        where = f"{specs[0]} and {specs[1]} share only" if len(specs) == 2 else f"{specs[0]}: only"
        raise UserError(
            f"{where} {n} mixture(s); the rank statistics need at least {MIN_MIXTURES} (with 2, "
            "Spearman and Kendall are always ±1)"
        )
