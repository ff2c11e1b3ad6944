"""What a mixture is: one weight per expert, each finite and non-negative, summing to 1.

Recipes (``weights.init``, ``train.mixtures``), ``mergeopt merge --weights``, mixture.json and the
search's own candidates are all checked against this one definition and this one tolerance, so a
mixture accepted in one place is accepted in every other. Pure Python: the recipe schema uses it.
(Score tables made elsewhere, often rounded to three decimals, have their own looser tolerance:
:data:`mergeopt.evaluation.table_checks.WEIGHT_SUM_TOLERANCE`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SIMPLEX_TOLERANCE = 1e-6  # |Σ w − 1| allowed
# A weight in [−ROUNDOFF, 0) is round-off of 0, read as 0: a script that writes the last weight as
# 1 − Σ others gets 1 − 0.01 − 0.06 − 0.93 = −1.1e-16 in float64 (and about −4e-8 in float32).
ROUNDOFF = SIMPLEX_TOLERANCE


def snap_roundoff(weights: Mapping[str, object]) -> dict[str, object]:
    """``weights`` with each round-off negative (see ROUNDOFF) replaced by 0.0; the rest unchanged."""
    return {n: 0.0 if _is_roundoff(v) else v for n, v in weights.items()}


def _is_roundoff(value: object) -> bool:
    return isinstance(value, float) and -ROUNDOFF <= value < 0


def weight_problem(weights: Mapping[str, object]) -> str | None:
    """Why one of ``weights`` cannot be a mixture weight (not a finite number, or negative beyond
    round-off), or None. Callers keep :func:`snap_roundoff` of the weights they accept."""
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"the weight of {name!r} is {value!r}, not a finite number"
        if value < -ROUNDOFF:
            return f"the weight of {name!r} is negative ({value})"
    return None


def sum_problem(weights: Mapping[str, object]) -> str | None:
    """Why valid weights do not sum to 1 (within SIMPLEX_TOLERANCE), or None."""
    total = math.fsum(float(v) for v in weights.values())
    if not abs(total - 1.0) <= SIMPLEX_TOLERANCE:  # `>` would let NaN through
        return f"the weights sum to {total:.9g}, not 1 (within {SIMPLEX_TOLERANCE:g})"
    return None


def mixture_problem(weights: Mapping[str, object]) -> str | None:
    """Why ``weights`` is not a mixture, in words that name the weight, or None when it is one."""
    return weight_problem(weights) or sum_problem(snap_roundoff(weights))  # the sum of what is kept
