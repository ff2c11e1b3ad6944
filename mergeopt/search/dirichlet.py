"""Dirichlet strategy: the best of N seeded random mixtures, Beta(α, α) for two experts (M³).

Mixup Model Merge (M³, arXiv 2502.15434) merges two models with λ ~ Beta(α, α) and keeps the best
λ on the dev set; its reference code draws unseeded. Here every draw comes from
``np.random.default_rng(seed)``, and K > 2 experts draw from Dirichlet(α·1_K), the same draws as
mixtures.dirichlet_samples. Random search is the honest baseline for the model-based strategies.
Under constraints the draws are conditioned on the feasible set (``FeasibleSet.sample``). For a
hierarchical mixture (``weights.groups``) a draw is a Dirichlet(α) over the groups times a
Dirichlet(α) within each group of several experts (:func:`draw_hierarchical`): each domain gets the
same prior mass however many experts it holds, where a flat Dirichlet(α·1_K) gives a domain of n of
the K experts a mean share n/K. With singleton groups the draws are the flat ones, number for number.
Groups under constraints: the hierarchical draw over the free experts, conditioned on the box like
the flat one (:func:`draw_feasible`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.groups import Groups
from mergeopt.search.candidates import with_start
from mergeopt.search.evaluator import BudgetExhausted, Evaluator, SearchResult


def draw_mixtures(rng: np.random.Generator, k: int, alpha: float, count: int) -> np.ndarray:
    """``count`` mixtures (rows) from Dirichlet(α·1_k); for k = 2 rows (λ, 1 − λ), λ ~ Beta(α, α)."""
    if k == 2:
        lam = rng.beta(alpha, alpha, size=count)
        return np.stack([lam, 1.0 - lam], axis=1)
    return rng.dirichlet(np.full(k, alpha), size=count)


def draw_hierarchical(
    rng: np.random.Generator, groups: Groups, alpha: float, count: int, level: Callable = draw_mixtures
) -> np.ndarray:
    """``count`` mixtures: group shares from ``level`` (:func:`draw_mixtures`) over the groups,
    times shares within each group of several experts from ``level`` over its experts (in the
    groups' order); a singleton's share within is 1 and draws nothing."""
    shares = level(rng, len(groups.labels), alpha, count) if len(groups.labels) > 1 else np.ones((count, 1))
    index = np.asarray(groups.index)
    within = np.ones((count, len(groups.names)))
    for g in range(len(groups.labels)):
        members = np.flatnonzero(index == g)
        if len(members) > 1:
            within[:, members] = level(rng, len(members), alpha, count)
    return shares[:, index] * within


def _dirichlet(rng: np.random.Generator, k: int, alpha: float, count: int) -> np.ndarray:
    """Dirichlet(α·1_k) for every k, as FeasibleSet.sample draws its flat shares (no Beta for k = 2)."""
    return rng.dirichlet(np.full(k, alpha), size=count)


def draw_feasible(
    rng: np.random.Generator,
    k: int,
    alpha: float,
    count: int,
    feasible: FeasibleSet | None,
    groups: Groups | None = None,
) -> np.ndarray:
    """:func:`draw_mixtures`, or :func:`draw_hierarchical` with groups; under constraints the same
    draws over the free experts conditioned on the feasible set (:meth:`FeasibleSet.sample`): the
    hierarchy shares out what the lower bounds and pins leave (groups restricted to the free
    experts), and with singleton groups the draws are the flat constrained ones, number for number."""
    if feasible is None:
        return (
            draw_mixtures(rng, k, alpha, count)
            if groups is None
            else draw_hierarchical(rng, groups, alpha, count)
        )
    if groups is None:
        return feasible.sample(rng, alpha, count)
    free = groups.restrict(feasible.free)
    return feasible.sample(
        rng, alpha, count, lambda rng, n: draw_hierarchical(rng, free, alpha, n, level=_dirichlet)
    )


def run(
    evaluator: Evaluator, search: SearchSection, seed: int, progress: bool, start: np.ndarray | None = None
) -> SearchResult:
    """``start`` (``weights.init``) is evaluated before the draws."""
    spec = search.dirichlet
    rng, k = np.random.default_rng(seed), len(evaluator.names)
    draws = draw_feasible(rng, k, spec.alpha, spec.samples, evaluator.feasible, evaluator.groups)
    points, phases = with_start(start, draws, "sample")
    stopped, drawn = False, len(draws)
    with evaluator.running("dirichlet search", search.budget, len(points), progress):
        evaluator.prefetch(points, phases)  # one batch: torchrun ranks split it
        for i, (w, phase) in enumerate(zip(points, phases)):
            try:
                evaluator(w, phase)
            except BudgetExhausted:
                stopped, drawn = True, max(i - (start is not None), 0)
                break
    info = {"strategy": "dirichlet", "samples_evaluated": drawn, "stopped_by_budget": stopped}
    return evaluator.result(info)
