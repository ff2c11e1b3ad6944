"""CMA-ES strategy: the ``cmaes`` library's ask/tell on the K logits z, with w = softmax(z).

CMA-ES is the standard derivative-free optimiser for a few continuous variables and a budget of
tens to hundreds of evaluations, and a maintained library (CyberAgent's ``cmaes``) gets its many
details right. The search starts at the logits of ``weights.init`` (z = 0, the uniform mixture,
without one) with the recipe's sigma; a
generation cut short by the budget is never told to the optimiser. A proposal whose w is already
cached costs nothing, so generations that bring nothing new (a collapsed search) end the run.
Under constraints a proposal's mixture is the feasible softmax of its logits (the KL projection of
softmax(z) onto the feasible set, :meth:`mergeopt.merging.constraints.FeasibleSet.softmax`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.merging.weights import logits_of
from mergeopt.search.candidates import mixture_of_logits
from mergeopt.search.evaluator import BudgetExhausted, Evaluator, SearchResult

if TYPE_CHECKING:  # the library is imported when a search runs, not when the CLI starts
    from cmaes import CMA

DEFAULT_BUDGET = 100
STALE_GENERATIONS = 10  # generations in a row without a new real evaluation end the search


def optimizer(
    k: int, sigma: float, population: int | None, seed: int, start: np.ndarray | None = None
) -> CMA:
    """The CMA instance the strategy runs: its mean on the logits is the start (0: the uniform mixture)."""
    from cmaes import CMA

    extra = {} if population is None else {"population_size": population}
    mean = np.zeros(k) if start is None else logits_of(start)
    return CMA(mean=mean, sigma=sigma, seed=seed, **extra)


def run(
    evaluator: Evaluator, search: SearchSection, seed: int, progress: bool, start: np.ndarray | None = None
) -> SearchResult:
    """``start`` (``weights.init``) is the initial mean; uniform (z = 0) without one."""
    spec = search.cmaes
    softmax = mixture_of_logits(evaluator.feasible)
    opt = optimizer(len(evaluator.names), spec.sigma, spec.population, seed, start)
    generation, stale, reason = 0, 0, "budget"
    with evaluator.running("cma-es search", search.budget, DEFAULT_BUDGET, progress):
        while True:
            before = evaluator.evaluations
            told = []
            proposals = [opt.ask() for _ in range(opt.population_size)]
            phase = f"cma gen {generation}"
            evaluator.prefetch([softmax(z) for z in proposals], phase)  # torchrun ranks split a generation
            try:
                for z in proposals:
                    told.append((z, evaluator(softmax(z), phase)))
            except BudgetExhausted:
                break
            opt.tell(told)
            generation += 1
            stale = stale + 1 if evaluator.evaluations == before else 0
            if stale >= STALE_GENERATIONS:
                reason = "no new mixtures"
                break
            if opt.should_stop():
                reason = "converged"
                break
            if evaluator.remaining == 0:
                break
    info = {
        "strategy": "cmaes",
        "generations": generation,
        "population": opt.population_size,
        "stopped": reason,
        "final_mean_weights": softmax(opt.mean).tolist(),
    }
    return evaluator.result(info)
