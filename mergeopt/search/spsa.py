"""SPSA strategy: simultaneous-perturbation stochastic approximation on the K logits z.

SPSA (Spall 1992, 1998) estimates the whole gradient from two evaluations per iteration, whatever
K is: z ± c_k Δ with Δ a seeded Rademacher vector, ĝ = (f(z + c_k Δ) − f(z − c_k Δ)) / (2 c_k Δ),
z ← z − a_k ĝ, with Spall's gains a_k = a / (k + 1 + A)^0.602 and c_k = c / (k + 1)^0.101. It is
the cheapest zero-order method that still follows a gradient. The iterate itself is not a point
SPSA evaluates, so the final iterate gets one evaluation of its own, and the result is the best
mixture really evaluated. Under constraints mixtures are the feasible softmax of the logits and the
iterate is projected back after each step, as the gradient strategy's is
(:mod:`mergeopt.merging.constraints`).
"""

from __future__ import annotations

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.merging.weights import logits_of
from mergeopt.search.candidates import mixture_of_logits
from mergeopt.search.evaluator import BudgetExhausted, Evaluator, SearchResult

DEFAULT_BUDGET = 100
ALPHA, GAMMA = 0.602, 0.101  # Spall's recommended gain exponents
STALE_ITERATIONS = 10  # iterations in a row without a new real evaluation end the search


def gains(k: int, a: float, c: float, stability: float) -> tuple[float, float]:
    """(a_k, c_k) at iteration k (from 0)."""
    return a / (k + 1 + stability) ** ALPHA, c / (k + 1) ** GAMMA


def perturbation(rng: np.random.Generator, k: int) -> np.ndarray:
    """A Rademacher vector, redrawn while all its signs agree.

    softmax(z + c·1) = softmax(z): a constant Δ moves no weight and wastes two evaluations (half
    of all draws when K = 2). Since the gradient on the logits is orthogonal to 1, dropping those
    draws only rescales the expected estimate, E[ĝ] = (1 − ρ)·∇f with ρ = E[Δ_i Δ_j] < 0.
    """
    while True:
        delta = rng.choice([-1.0, 1.0], size=k)
        if np.any(delta != delta[0]):
            return delta


def run(
    evaluator: Evaluator, search: SearchSection, seed: int, progress: bool, start: np.ndarray | None = None
) -> SearchResult:
    """``start`` (``weights.init``) is the first iterate; uniform (z = 0) without one."""
    spec = search.spsa
    softmax = mixture_of_logits(evaluator.feasible)
    rng = np.random.default_rng(seed)
    z = np.zeros(len(evaluator.names)) if start is None else logits_of(start)
    if evaluator.feasible is not None:
        z = evaluator.feasible.project_logits(z)
    iterations, stopped = 0, "budget"
    with evaluator.running("spsa search", search.budget, DEFAULT_BUDGET, progress):
        try:
            stale = 0
            while evaluator.remaining >= 3:  # a pair, then the final iterate
                if stale >= STALE_ITERATIONS:  # pairs that are all cache hits never use the budget up
                    stopped = "no new mixtures"
                    break
                before = evaluator.evaluations
                a_k, c_k = gains(iterations, spec.lr, spec.perturbation, spec.stability)
                delta = perturbation(rng, len(z))
                pair = [softmax(z + c_k * delta), softmax(z - c_k * delta)]
                evaluator.prefetch(pair, [f"spsa {iterations} +", f"spsa {iterations} -"])
                plus = evaluator(softmax(z + c_k * delta), f"spsa {iterations} +")
                minus = evaluator(softmax(z - c_k * delta), f"spsa {iterations} -")
                z = z - a_k * (plus - minus) / (2.0 * c_k * delta)
                if evaluator.feasible is not None:  # the iterate stays on the feasible set's logits
                    z = evaluator.feasible.project_logits(z)
                iterations += 1
                stale = stale + 1 if evaluator.evaluations == before else 0
            # a batch of one, as the pairs are: under torchrun one rank scores it whole, so the log
            # holds the number one process finds (scored alone, the ranks split its data instead)
            evaluator.prefetch([softmax(z)], "spsa final")
            evaluator(softmax(z), "spsa final")
        except BudgetExhausted:
            stopped = "budget (mid-iteration)"
    info = {
        "strategy": "spsa",
        "iterations": iterations,
        "stopped": stopped,
        "final_weights": softmax(z).tolist(),
    }
    return evaluator.result(info)
