"""Sets of data mixtures to train ground-truth runs on: a simplex lattice, Dirichlet samples, a list.

Every set is a deterministic function of the recipe (and its seed), so a rerun names the same runs
and a resumed training finds its finished ones. A mixture is a dict {expert: weight} on the simplex.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from mergeopt.config import MixtureSetSection
from mergeopt.errors import UserError


def simplex_lattice(
    names: Sequence[str], divisions: int, interior_only: bool = False
) -> list[dict[str, float]]:
    """All w with every w_i a multiple of 1/divisions, in lexicographic order of the counts."""
    k = len(names)
    points = []
    for counts in itertools.product(range(divisions + 1), repeat=k):
        if sum(counts) != divisions or (interior_only and min(counts) == 0):
            continue
        points.append({name: c / divisions for name, c in zip(names, counts)})
    return points


def dirichlet_samples(names: Sequence[str], alpha: float, count: int, seed: int) -> list[dict[str, float]]:
    """``count`` seeded draws from a symmetric Dirichlet(alpha) (``rng.dirichlet`` for every K: for
    K = 2 that is the Beta(alpha, alpha) distribution, but not the numbers the dirichlet search
    strategy's own Beta draws give for the same seed)."""
    rng = np.random.default_rng(seed)
    draws = rng.dirichlet(np.full(len(names), alpha), size=count)
    return [{name: float(v) for name, v in zip(names, row)} for row in draws]


def mixture_set(spec: MixtureSetSection, names: Sequence[str], seed: int) -> list[dict[str, float]]:
    """The set ``spec`` names; refused when two of its mixtures are the same (rounded to 1e-6): the
    second run would spend a whole training budget on a row the grid already has, and a set whose
    rows are all one mixture (a list repeating itself, a huge Dirichlet alpha) ranks nothing."""
    if spec.kind == "lattice":
        mixtures = simplex_lattice(names, spec.divisions, spec.interior_only)
    elif spec.kind == "dirichlet":
        mixtures = dirichlet_samples(names, spec.alpha, spec.count, seed)
    else:
        mixtures = [{name: float(m[name]) for name in names} for m in spec.weights]
    seen: dict[tuple, int] = {}
    for i, w in enumerate(mixtures):
        key = tuple(round(w[n], 6) for n in names)
        if key in seen:
            raise UserError(
                f"train.mixtures ({spec.kind}): mixture {i} is the same as mixture {seen[key]} "
                f"({mixture_id(w, names)}); every run must train a different mixture"
            )
        seen[key] = i
    return mixtures


def mixture_id(weights: dict[str, float], names: Sequence[str]) -> str:
    """A stable, readable run name: ``mix-0.500-0.250-0.250``."""
    return "mix-" + "-".join(f"{weights[n]:.3f}" for n in names)
