"""Search strategies: each finds the mixture w that minimises the target and logs every evaluation.

The gradient strategy differentiates through the merged model (``fit_gradient``). The zero-order
strategies only score mixtures, through an :class:`Evaluator` (cache, budget, log), and share one
signature: ``STRATEGIES[name](evaluator, search, seed, progress, start) -> SearchResult``, where
``start`` is ``weights.init`` (None: uniform) and every strategy starts from it.
"""

from collections.abc import Callable

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.search import cmaes, dirichlet, grid, spsa, surrogate
from mergeopt.search.evaluator import BudgetExhausted, Evaluator, SearchResult
from mergeopt.search.gradient import GradientResult, fit_gradient

# (evaluator, search, seed, progress, start: weights.init or None) -> result
Strategy = Callable[[Evaluator, SearchSection, int, bool, np.ndarray | None], SearchResult]

STRATEGIES: dict[str, Strategy] = {
    "grid": grid.run,
    "dirichlet": dirichlet.run,
    "cmaes": cmaes.run,
    "spsa": spsa.run,
    "surrogate": surrogate.run,
}

__all__ = [
    "STRATEGIES",
    "BudgetExhausted",
    "Evaluator",
    "GradientResult",
    "SearchResult",
    "Strategy",
    "fit_gradient",
]
