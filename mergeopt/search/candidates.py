"""How a strategy forms the mixtures it asks the :class:`~mergeopt.search.evaluator.Evaluator` to score.

Two rules every strategy shares, so each states them once: the user's start (``weights.init``) is
scored first, and a strategy that searches over logits maps them to the simplex, or to the feasible
set under constraints, the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mergeopt.merging.constraints import FeasibleSet


def with_start(
    start: np.ndarray | None, points: Sequence[np.ndarray], phase: str
) -> tuple[list[np.ndarray], list[str]]:
    """``points`` with ``weights.init`` first (logged as phase "start"), and each point's phase.

    Strategies that sample or enumerate mixtures evaluate the start too, so no search returns a
    mixture its own objective scores worse than the one the user started from.
    """
    points = list(points)
    if start is None:
        return points, [phase] * len(points)
    return [np.asarray(start, dtype=np.float64), *points], ["start", *[phase] * len(points)]


def mixture_of_logits(feasible: FeasibleSet | None) -> Callable[[np.ndarray], np.ndarray]:
    """How a logit strategy (CMA-ES, SPSA) turns logits into a mixture: softmax, or under
    constraints the feasible softmax (the same function when the set is the whole simplex)."""
    if feasible is None:
        from scipy.special import softmax

        return softmax
    return feasible.softmax
