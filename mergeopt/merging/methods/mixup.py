"""M³ mixup (Mixup Model Merge, arXiv 2502.15434) on top of any merge method.

M³ merges two models with interpolation weights (λ, 1 − λ), λ ~ Beta(α, α), instead of fixed ones.
Here the mixture w stays the search variable and the draw reweights it: the method receives
c(w) = w ⊙ λ / Σ (w ⊙ λ) with λ ~ Dirichlet(α · 1_K) (for K = 2, Beta(α, α), so at w = (½, ½) the
coefficients are exactly M³'s (λ, 1 − λ)). Why this form: c stays on the simplex (the stack's
anchor form needs Σ c = 1), a one-hot w stays one-hot (each expert is still a vertex), and c is
smooth in w, so gradients reach every weight. λ is drawn once per run from the recipe seed with
numpy's ``default_rng``, so a run is reproducible and the draw is documented in mixture.json.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_LAMBDA = 1e-12


def draw(alpha: float, num_experts: int, seed: int) -> np.ndarray:
    """λ on the simplex: ``default_rng(seed).beta(α, α)`` for two experts, ``.dirichlet`` otherwise."""
    rng = np.random.default_rng(seed)
    if num_experts == 2:
        first = rng.beta(alpha, alpha)
        lam = np.array([first, 1.0 - first])
    else:
        lam = rng.dirichlet(np.full(num_experts, alpha))
    # a very small α can draw an exact 0, which would make c(e_j) = 0/0: floor it (no effect otherwise)
    lam = np.maximum(lam, MIN_LAMBDA)
    return lam / lam.sum()


def coefficients(weights: torch.Tensor, lam: np.ndarray | torch.Tensor) -> torch.Tensor:
    """c(w) = w ⊙ λ / Σ (w ⊙ λ), differentiable in w."""
    scaled = weights * torch.as_tensor(lam, dtype=weights.dtype, device=weights.device)
    return scaled / scaled.sum()
