"""Simplex parametrisation of the mixture: w = softmax(z) over K experts.

Free logits z make every gradient step land on the simplex (no projection, no clipping).
``logits_for`` inverts the map so a run can start from any given mixture. There is no temperature:
under Adam, softmax(z / T) with learning rate η is the same fit as softmax(z) with η / T, so a
temperature would be a second name for ``optim.lr``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

MIN_WEIGHT = 1e-8  # a zero in an initial mixture becomes this, so log() stays finite


def weights_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def logits_for(weights: torch.Tensor) -> torch.Tensor:
    """Logits z with softmax(z) == weights (up to the MIN_WEIGHT floor); z is centred to mean 0."""
    z = torch.log(weights.clamp_min(MIN_WEIGHT))
    return z - z.mean()


def logits_of(weights: np.ndarray) -> np.ndarray:
    """:func:`logits_for` on a NumPy array: where CMA-ES and SPSA start on their logits."""
    return logits_for(torch.as_tensor(np.asarray(weights, dtype=np.float64))).numpy()


def start_weights(names: Sequence[str], init: Mapping[str, float] | None) -> np.ndarray:
    """The mixture every strategy starts from: ``weights.init`` normalised, else uniform."""
    if init is None:
        return np.full(len(names), 1.0 / len(names))
    w = np.array([float(init[name]) for name in names], dtype=np.float64)
    return w / w.sum()


def initial_logits(names: Sequence[str], init: Mapping[str, float] | None) -> torch.Tensor:
    """Uniform start (z = 0) unless the recipe gives a starting mixture."""
    if init is None:
        return torch.zeros(len(names), dtype=torch.float64)
    return logits_for(torch.from_numpy(start_weights(names, init)))


def as_mapping(names: Sequence[str], weights: torch.Tensor) -> dict[str, float]:
    return {name: float(v) for name, v in zip(names, weights.detach().double().cpu().tolist())}
