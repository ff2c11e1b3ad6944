"""Merge methods: pure functions from (θ0, stacked task vectors τ, weights w) to a merged tensor.

Every method has the signature ``merge(base, deltas, weights, out=None) -> tensor`` where ``base``
has the parameter's shape, ``deltas`` is the (K, *shape) stack of τ_i = θ_i − θ0, ``weights`` is
the K-vector w and ``out`` an optional preallocated result. Methods must stay differentiable in
``weights``: no ``.item()``, no masks built from w.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergeopt.errors import UserError
from mergeopt.methods.linear import merge_linear

MergeFn = Callable[..., torch.Tensor]

METHODS: dict[str, MergeFn] = {
    "linear": merge_linear,
}


def get_method(name: str) -> MergeFn:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
