"""TIES merging (Yadav et al. 2023): trim each task vector, elect a sign per entry, disjoint mean.

Why it fits the stack: the trim keeps each τ_i's top ``density`` fraction by magnitude, the sign is
elected from the *unweighted* trimmed vectors and the disjoint mean divides by the number of experts
that agree with it, so every mask comes from τ alone. Then Σ_i w_i τ_i m_i / n = Σ_i w_i τ'_i with
τ'_i = τ_i m_i / n, linear in w. This matches ``peft.utils.merge_utils.ties`` (the merged delta),
whose steps the helpers below reproduce one for one; with w on the simplex the disjoint mean shrinks
the delta, so a recipe may want ``scale`` > 1.
"""

from __future__ import annotations

from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]


def trim(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Each τ_i keeps its int(density · numel) largest-magnitude entries (as peft's ``prune``)."""
    if density >= 1:
        return task_vectors
    trimmed = torch.zeros_like(task_vectors)
    k = int(density * task_vectors[0].numel())
    for tau, out in zip(task_vectors, trimmed):
        kept = torch.topk(tau.abs().reshape(-1), k=k, largest=True).indices
        out.view(-1)[kept] = tau.reshape(-1)[kept]
    return trimmed


def elect_sign(task_vectors: torch.Tensor, majority_sign: MajoritySign) -> torch.Tensor:
    """Boolean (K, *shape) mask of entries whose sign agrees with the elected one (ties elect +)."""
    sign = task_vectors.sign()
    if majority_sign == "total":
        magnitude = task_vectors.sum(dim=0)
    elif majority_sign == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def agreeing(mask: torch.Tensor) -> torch.Tensor:
    """How many experts keep each entry, at least 1: the divisor of the disjoint mean."""
    return torch.clamp(mask.sum(dim=0), min=1.0)


def disjoint(task_vectors: torch.Tensor, majority_sign: MajoritySign) -> torch.Tensor:
    """τ'_i = τ_i m_i / n: the sign election and disjoint mean folded into the vectors."""
    mask = elect_sign(task_vectors, majority_sign)
    return task_vectors * mask / agreeing(mask)


def disjoint_reference(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    majority_sign: MajoritySign,
) -> torch.Tensor:
    """θ0 + scale · Σ_i w_i τ_i m_i / n in peft's order of operations; shared with dare_ties."""
    mask = elect_sign(task_vectors, majority_sign)
    weighted = task_vectors * weights.reshape(-1, *([1] * (task_vectors.dim() - 1)))
    return base + scale * ((weighted * mask).sum(dim=0) / agreeing(mask))


def prepare(task_vectors: torch.Tensor, density: float, majority_sign: MajoritySign) -> torch.Tensor:
    return disjoint(trim(task_vectors, density), majority_sign)


def reference(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    scale: float = 1.0,
    density: float = 0.5,
    majority_sign: MajoritySign = "total",
) -> torch.Tensor:
    return disjoint_reference(base, trim(task_vectors, density), weights, scale, majority_sign)
