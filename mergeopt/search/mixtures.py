"""Sets of data mixtures to train ground-truth runs on: a simplex lattice, Dirichlet samples, a list.

Every set is a deterministic function of the recipe (and its seed), so a rerun names the same runs
and a resumed training finds its finished ones. A mixture is a dict {expert: weight} on the simplex.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from mergeopt.config import MixtureSetSection


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
    """``count`` seeded draws from a symmetric Dirichlet(alpha); Beta(alpha, alpha) when K = 2."""
    rng = np.random.default_rng(seed)
    draws = rng.dirichlet(np.full(len(names), alpha), size=count)
    return [{name: float(v) for name, v in zip(names, row)} for row in draws]


def mixture_set(spec: MixtureSetSection, names: Sequence[str], seed: int) -> list[dict[str, float]]:
    if spec.kind == "lattice":
        return simplex_lattice(names, spec.divisions, spec.interior_only)
    if spec.kind == "dirichlet":
        return dirichlet_samples(names, spec.alpha, spec.count, seed)
    return [{name: float(m[name]) for name in names} for m in spec.weights]


def mixture_id(weights: dict[str, float], names: Sequence[str]) -> str:
    """A stable, readable run name: ``mix-0.500-0.250-0.250``."""
    return "mix-" + "-".join(f"{weights[n]:.3f}" for n in names)
