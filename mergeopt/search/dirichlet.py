"""Dirichlet strategy: the best of N seeded random mixtures, Beta(α, α) for two experts (M³).

Mixup Model Merge (M³, arXiv 2502.15434) merges two models with λ ~ Beta(α, α) and keeps the best
λ on the dev set; its reference code draws unseeded. Here every draw comes from
``np.random.default_rng(seed)``, and K > 2 experts draw from Dirichlet(α·1_K), the same draws as
mixtures.dirichlet_samples. Random search is the honest baseline for the model-based strategies.
Under constraints the draws are conditioned on the feasible set (``FeasibleSet.sample``).
"""

from __future__ import annotations

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.search.evaluator import BudgetExhausted, Evaluator, SearchResult, with_start


def draw_mixtures(rng: np.random.Generator, k: int, alpha: float, count: int) -> np.ndarray:
    """``count`` mixtures (rows) from Dirichlet(α·1_k); for k = 2 rows (λ, 1 − λ), λ ~ Beta(α, α)."""
    if k == 2:
        lam = rng.beta(alpha, alpha, size=count)
        return np.stack([lam, 1.0 - lam], axis=1)
    return rng.dirichlet(np.full(k, alpha), size=count)


def draw_feasible(
    rng: np.random.Generator, k: int, alpha: float, count: int, feasible: FeasibleSet | None
) -> np.ndarray:
    """:func:`draw_mixtures`, or under constraints Dirichlet draws conditioned on the feasible set."""
    if feasible is None:
        return draw_mixtures(rng, k, alpha, count)
    return feasible.sample(rng, alpha, count)


def run(
    evaluator: Evaluator, search: SearchSection, seed: int, progress: bool, start: np.ndarray | None = None
) -> SearchResult:
    """``start`` (``weights.init``) is evaluated before the draws."""
    spec = search.dirichlet
    rng, k = np.random.default_rng(seed), len(evaluator.names)
    draws = draw_feasible(rng, k, spec.alpha, spec.samples, evaluator.feasible)
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
