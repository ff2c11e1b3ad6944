"""Simplex parametrisation of the mixture: w = softmax(z / T) over K experts.

Free logits z make every gradient step land on the simplex (no projection, no clipping), and the
temperature T sets how sharply a logit change moves w. ``logits_for`` inverts the map so a run can
start from any given mixture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

MIN_WEIGHT = 1e-8  # a zero in an initial mixture becomes this, so log() stays finite


def weights_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def logits_for(weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits z with softmax(z / T) == weights (up to the MIN_WEIGHT floor); z is centred to mean 0."""
    z = temperature * torch.log(weights.clamp_min(MIN_WEIGHT))
    return z - z.mean()


def initial_logits(
    names: Sequence[str], init: Mapping[str, float] | None, temperature: float = 1.0
) -> torch.Tensor:
    """Uniform start (z = 0) unless the recipe gives a starting mixture."""
    if init is None:
        return torch.zeros(len(names), dtype=torch.float64)
    w = torch.tensor([float(init[name]) for name in names], dtype=torch.float64)
    return logits_for(w / w.sum(), temperature)


def as_mapping(names: Sequence[str], weights: torch.Tensor) -> dict[str, float]:
    return {name: float(v) for name, v in zip(names, weights.detach().double().cpu().tolist())}
