"""Linear merge (task arithmetic on the simplex): θ(w) = θ0 + Σ_i w_i τ_i.

This is the proxy for a model trained on mixture w. Both directions are one BLAS call over the
stack: the forward is ``addmv(θ0, τᵀ, w)`` and the backward to w is ``τ · dL/dθ``, so a step costs
two passes over the K·P stack and nothing else. Arithmetic is in float32 (float64 for a float64
base) whatever the stack's storage dtype. Given ``out``, the merge is written into that
preallocated tensor instead of a fresh one: a fitting loop reuses one buffer per parameter rather
than allocating (and page-faulting) a full copy of the model every step. When the stack is stored
in a narrower dtype (bfloat16, float16) the upcast to float32 is done in column chunks of
``CHUNK`` elements, so the temporary is (K−1)·CHUNK·4 bytes instead of (K−1) float32 copies of
the parameter (6 GiB for Llama-3.1-8B's embedding with four experts).

The kernel merges every registered method, not just this one: the stack feeds it each method's
prepared task vectors in anchor form (see :mod:`mergeopt.merging.methods`). ``prepare`` and ``reference``
are this method's entries in that registry.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 24  # elements per column chunk when the stack's dtype must be upcast (64 MiB per row)


def _column_chunks(numel: int, same_dtype: bool) -> list[slice]:
    """One slice when no upcast is needed (a single BLAS call), else chunks of CHUNK columns."""
    if same_dtype:
        return [slice(0, numel)]
    return [slice(start, min(start + CHUNK, numel)) for start in range(0, numel, CHUNK)]


class _LinearMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, base, deltas, out):
        num_experts = deltas.shape[0]
        compute = out.dtype
        rows = deltas.reshape(num_experts, -1)
        flat_base, flat_out, w = base.reshape(-1), out.view(-1), weights.to(compute)
        for cols in _column_chunks(rows.shape[1], rows.dtype == compute):
            torch.addmv(flat_base[cols].to(compute), rows[:, cols].to(compute).t(), w, out=flat_out[cols])
        ctx.save_for_backward(deltas)
        ctx.weights_dtype = weights.dtype
        ctx.mark_dirty(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (deltas,) = ctx.saved_tensors
        rows = deltas.reshape(deltas.shape[0], -1)
        flat_grad = grad.reshape(-1)
        grad_weights = torch.zeros(rows.shape[0], dtype=grad.dtype, device=grad.device)
        for cols in _column_chunks(rows.shape[1], rows.dtype == grad.dtype):
            grad_weights += torch.mv(rows[:, cols].to(grad.dtype), flat_grad[cols])
        return grad_weights.to(ctx.weights_dtype), None, None, None


def merge_linear(
    base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    compute = torch.promote_types(base.dtype, torch.float32)
    if out is None:
        out = torch.empty(base.shape, dtype=compute, device=base.device)
    elif out.shape != base.shape or out.dtype != compute or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {compute} tensor of shape {tuple(base.shape)}")
    merged = _LinearMerge.apply(weights, base, deltas, out.detach())  # no history carried over
    return merged if merged.dtype == base.dtype else merged.to(base.dtype)


def prepare(task_vectors: torch.Tensor) -> torch.Tensor:
    """Task arithmetic uses the task vectors as they are."""
    return task_vectors


def reference(
    base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """θ0 + scale Σ_i w_i τ_i in plain torch (peft's ``task_arithmetic`` plus the base)."""
    shaped = weights.reshape(-1, *([1] * (task_vectors.dim() - 1)))
    return base + scale * (task_vectors * shaped).sum(dim=0)
