"""Search strategies: each finds the mixture w that minimises the target and logs every evaluation.

Only the gradient strategy exists so far; the zero-order strategies (grid, dirichlet, cmaes, spsa,
surrogate) will join it behind the same interface.
"""

from mergeopt.search.gradient import GradientResult, fit_gradient

__all__ = ["GradientResult", "fit_gradient"]
