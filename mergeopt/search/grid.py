"""Grid strategy: evaluate every mixture of the simplex lattice with step 1/divisions, keep the best.

The exhaustive baseline every cleverer strategy is measured against. It refuses to run when the
lattice does not fit in the budget: a grid cut short covers only the first corner of the simplex
in lattice order, a biased answer that looks like a complete one. Under constraints the lattice
is that of the feasible set (:meth:`mergeopt.merging.constraints.FeasibleSet.lattice`).
"""

from __future__ import annotations

import math

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.errors import UserError
from mergeopt.search.candidates import with_start
from mergeopt.search.evaluator import Evaluator, SearchResult
from mergeopt.search.mixtures import simplex_lattice

# the largest lattice a grid search runs without a search.budget that covers it: divisions=1000 for
# 10 (a typo) over four experts is 1.7e8 mixtures, the array alone 5 GB and each a forward pass
UNBUDGETED_POINTS = 1_000_000


def lattice(names: tuple[str, ...], divisions: int) -> np.ndarray:
    """The lattice points as rows of an array, in mixtures.simplex_lattice order."""
    return np.array([[p[n] for n in names] for p in simplex_lattice(names, divisions)], dtype=np.float64)


def _too_small(divisions: int, k: int, mixtures: str, new: int, remaining: int) -> UserError:
    return UserError(
        f"search.grid.divisions={divisions} over {k} experts is {mixtures} ({new} not yet evaluated) but "
        f"the budget leaves {remaining} evaluations; raise search.budget or lower search.grid.divisions "
        "(a truncated grid is biased)"
    )


def check_budget(recipe) -> None:
    """A budget below the plain lattice's size, or a lattice above :data:`UNBUDGETED_POINTS` without
    a budget, refused when the recipe is read, before any model is loaded. Constraints and groups change the lattice (and a resumed run's journal what is left):
    those are checked as the search starts (:func:`run`)."""
    search, k = recipe.search, len(recipe.expert_names)
    if search.strategy != "grid" or recipe.weights.constrained or recipe.weights.groups:
        return
    points = math.comb(search.grid.divisions + k - 1, k - 1)
    if search.budget is None and points > UNBUDGETED_POINTS:
        raise UserError(
            f"search.grid.divisions={search.grid.divisions} over {k} experts is a lattice of {points:,} "
            f"mixtures, one forward pass each (held in memory before the first): lower "
            f"search.grid.divisions, or set search.budget to at least {points} to run it knowingly"
        )
    if search.budget is not None and points > search.budget:
        raise _too_small(search.grid.divisions, k, f"{points} mixtures", points, search.budget)


def run(
    evaluator: Evaluator, search: SearchSection, seed: int, progress: bool, start: np.ndarray | None = None
) -> SearchResult:
    """``start`` (``weights.init``) is evaluated first, on the lattice or not."""
    divisions = search.grid.divisions
    feasible = evaluator.feasible  # constraints: the lattice of the feasible set instead
    grid = lattice(evaluator.names, divisions) if feasible is None else feasible.lattice(divisions)
    points, phases = with_start(start, grid, "grid")
    new = evaluator.uncached(points)
    with evaluator.running("grid search", search.budget, new, progress) as remaining:
        if remaining is not None and new > remaining:
            mixtures = (
                f"{len(points) - (start is not None)} mixtures{' and the start' if start is not None else ''}"
            )
            raise _too_small(divisions, len(evaluator.names), mixtures, new, remaining)
        evaluator.prefetch(points, phases)  # one batch: torchrun ranks split it
        for w, phase in zip(points, phases):
            evaluator(w, phase)
    info = {"strategy": "grid", "points": len(points) - (start is not None), "new_evaluations": new}
    return evaluator.result(info)
