"""Linear merge (task arithmetic on the simplex): θ(w) = θ0 + Σ_i w_i τ_i.

This is the proxy for a model trained on mixture w. The weighted sum is one tensordot, so its
backward pass to w is a single contraction of the incoming gradient with the stack, K·P work.
Arithmetic is in float32 (float64 for a float64 base) whatever the stack's storage dtype.
"""

from __future__ import annotations

import torch


def merge_linear(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(base.dtype, torch.float32)
    update = torch.tensordot(weights.to(compute), deltas.to(compute), dims=1)
    return base + update.to(base.dtype)
