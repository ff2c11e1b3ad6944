"""Merge methods: one registry, keyed by the recipe's ``merge.method``, of (prepare, reference) pairs.

Why this shape: in every method here (task arithmetic, TIES, DARE) each mask — magnitude trim,
random drop, sign election, the count in the disjoint mean — depends on the task vectors
τ_i = θ_i − θ0 alone, never on the weights w. So every method is θ(w) = θ0 + λ Σ_i w_i τ'_i with
τ' = ``prepare(τ)`` computed once per parameter at build time; the stack stores τ' in anchor form
and one fast kernel, :func:`merge_linear`, merges (and differentiates) every method. Each
``reference`` computes the same merge directly, step by step as peft does, in plain differentiable
torch: it is the truth the stack is tested against. M³ mixup (:mod:`mergeopt.merging.methods.mixup`) sits
on top of any method: it only changes the coefficients handed to it.

Signatures (K experts, task vectors stacked on dim 0):
``prepare(task_vectors, **options) -> (K, *shape)`` and
``reference(base, task_vectors, weights, scale=1.0, **options) -> base.shape``, where ``options`` are
the recipe fields named in ``params`` plus ``generator`` (a ``torch.Generator``) for random methods.
``MergeFn`` is the fast kernel's signature ``(anchor, deltas, weights, out=None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergeopt.errors import UserError
from mergeopt.merging.methods import dare, linear, ties
from mergeopt.merging.methods.linear import merge_linear

MergeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    prepare: Callable[..., torch.Tensor]  # τ (K, *shape) -> τ' (K, *shape), from τ alone
    reference: Callable[..., torch.Tensor]  # (θ0, τ, w, scale, **options) -> θ0 + scale Σ w_i τ'_i
    params: tuple[str, ...] = ()  # the merge-section fields it reads, besides scale
    random: bool = False  # prepare and reference draw from a ``generator`` option

    def options(self, merge: Any) -> dict[str, Any]:
        """The keyword options of ``prepare``/``reference`` taken from a MergeSection (no generator)."""
        return {p: getattr(merge, p) for p in self.params}


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod("linear", linear.prepare, linear.reference),
    "ties": MergeMethod("ties", ties.prepare, ties.reference, ("density", "majority_sign")),
    "dare_linear": MergeMethod(
        "dare_linear", dare.prepare_linear, dare.reference_linear, ("density",), random=True
    ),
    "dare_ties": MergeMethod(
        "dare_ties", dare.prepare_ties, dare.reference_ties, ("density", "majority_sign"), random=True
    ),
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "MergeFn", "MergeMethod", "get_method", "merge_linear"]
