"""One parameter's anchor and differences, from the experts' tensors (:func:`linear_differences`,
:func:`prepared_differences`).

The stacking pass (:mod:`mergeopt.merging.stacking`) decides what each parameter becomes; this module
only forms its rows: each expert tensor read lazily (from a safetensors checkpoint, a block of its
rows under a sharded stack, or an in-memory state dict), checked against the base, and written into
one preallocated tensor, so the temporaries are K copies of one tensor, never of the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import Checkpoint
from mergeopt.merging.methods import MergeMethod


def read_expert_tensor(
    expert: Checkpoint | Mapping[str, torch.Tensor],
    expert_name: str,
    name: str,
    like: torch.Tensor,
    rows: tuple[int, int, torch.Size] | None = None,
) -> torch.Tensor:
    """One expert tensor, checked against the base's shape, on ``like``'s device and dtype.

    ``rows`` (start, stop, the base's whole shape): only rows [start, stop) of it, and from a
    checkpoint only those bytes are read (a sharded stack's block).
    """
    whole = like.shape if rows is None else rows[2]
    if isinstance(expert, Checkpoint):
        if name not in expert.tensors:
            raise UserError(
                f"parameter {name} of the base model is not in expert {expert_name!r} ({expert.path})"
            )
        shape = torch.Size(expert.tensors[name].shape)
        if shape == whole:
            value = expert.read(name) if rows is None else expert.read_rows(name, rows[0], rows[1])
        else:
            value = torch.empty(shape, device="meta")
    elif name not in expert:
        raise UserError(f"parameter {name} of the base model is not in expert {expert_name!r}")
    else:
        value = expert[name]
        shape = value.shape
        if rows is not None and shape == whole:
            value = value[rows[0] : rows[1]]
    if shape != whole:
        raise UserError(
            f"tensor {name} has shape {list(whole)} in the base but {list(shape)} in expert {expert_name!r}"
        )
    value = value.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(value).all():
        raise UserError(f"tensor {name} of expert {expert_name!r} contains NaN or Inf")
    return value


def linear_differences(
    base: torch.Tensor, experts: Mapping, name: str, dtype: torch.dtype, block=None, sameness=None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Linear merge at scale 1: anchor θ_1 and rows θ_i − θ_1, without θ0 (``block``: rows of a
    sharded stack, see :func:`read_expert_tensor`); ``sameness`` sees each value and the rows.

    Anchored at the first expert, θ(w) = θ_1 + Σ_{i>1} w_i (θ_i − θ_1) on the simplex, so the stack
    holds K tensors per parameter and θ0 is never kept beside them."""
    anchor = None
    # differences written row by row into one preallocated tensor: no K-long list of temporaries
    rows = torch.empty((len(experts) - 1, *base.shape), dtype=dtype, device=base.device)
    differ = False
    for k, (ename, expert) in enumerate(experts.items()):
        value = read_expert_tensor(expert, ename, name, base, block)
        if sameness is not None and sameness.base_candidate(k):
            sameness.see_value(k, value, base)
        if anchor is None:
            anchor = value
            continue
        difference = value - anchor  # not in place: ``value`` may be the caller's own tensor
        differ = differ or bool(difference.any())
        rows[k - 1].copy_(difference)
        del value, difference
    if sameness is not None:
        sameness.see_differences(rows)
    return anchor, rows, differ


def prepared_differences(
    base: torch.Tensor,
    experts: Mapping,
    name: str,
    dtype: torch.dtype,
    method: MergeMethod,
    options: dict[str, Any],
    scale: float,
    sameness=None,
    per_expert: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Any other method: τ' = prepare(θ_i − θ0), anchor θ0 + λ τ'_1 and rows λ (τ'_i − τ'_1);
    ``sameness`` sees the task vectors before they are prepared. ``per_expert``: a mixture of
    experts' fused (experts, out, in) weight, prepared one expert's matrix at a time, as PEFT and
    mergekit prepare the per-expert tensors its checkpoints store (TIES trims each on its own)."""
    tau = torch.empty((len(experts), *base.shape), dtype=base.dtype, device=base.device)
    for k, (ename, expert) in enumerate(experts.items()):
        torch.sub(read_expert_tensor(expert, ename, name, base), base, out=tau[k])
    if sameness is not None:
        sameness.see_task_vectors(tau)
    if per_expert:
        prepared = torch.stack([method.prepare(tau[:, e], **options) for e in range(tau.shape[1])], dim=1)
    else:
        prepared = method.prepare(tau, **options)
    del tau
    anchor = base + scale * prepared[0]
    rows = (prepared[1:] - prepared[0]).mul_(scale)
    return anchor, rows.to(dtype), bool(rows.any())
