"""Loss evaluations in a wider dtype than the fit's steps (``model.eval_dtype``, float32 by default).

Why: a bfloat16 weight keeps 8 significant bits, and a task vector moves most weights by a few
units in that last place (a bfloat16 fine-tune changes them by about that much). So a merged weight
θ_1 + Σ w_i δ_i rounded to bfloat16 is off by about as much as the task vectors move it, and the
rounding changes with w like noise. On the SmolLM2 world (benchmarks/results/precision.md) the
bfloat16 held-out losses at the fit's steps 20 and 25 were 0.0019 and 0.0042 above float32's, which
undid a real gain of 0.0023 and moved early stopping's pick: the fitted w landed 0.038 from
float32's in L1. The gradient steps tolerate that noise (at the same step the two runs' w are
within 0.009); the choices made from evaluations do not.

:func:`evaluating_in` runs the model with every weight read in ``dtype`` for as long as it lasts:
the per-layer merge forms its weights in that dtype (it computes in float32 anyway), and every
other floating parameter is cast when its module reads it (a parametrization, removed on exit). So
no wide copy of the model is ever held: beside the usual evaluation batch, one module's weight in
the wide dtype at a time. LoRA experts' low-rank updates follow the activations' dtype by
themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.utils import parametrize

from mergeopt.merging.layer_merge import MergedParameter
from mergeopt.merging.lowrank_parameters import LowRankMergedParameter
from mergeopt.merging.sharded_merge import ShardedWeight

# parametrizations that form a weight in their own ``compute_dtype``: the merge (of a dense stack, or
# of LoRA experts' factors of a whole parameter), and a sharded matrix that is not merged (gathered
# from the ranks' rows)
FORMED = (MergedParameter, LowRankMergedParameter, ShardedWeight)


class CastTo(torch.nn.Module):
    """A parametrization that hands the module its weight in ``dtype`` (a copy for each read)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.to(self.dtype)


def _narrower_parameters(model: torch.nn.Module, dtype: torch.dtype) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of every plain floating parameter not in ``dtype`` (tied ones once per owner).

    A parametrized tensor's ``original`` (the per-layer merge's anchor) is left alone: the merge
    itself forms that weight in ``dtype``.
    """
    found = []
    for module in model.modules():
        if isinstance(module, (parametrize.ParametrizationList, *FORMED)):
            continue
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                found.append((module, name))
    return found


@contextmanager
def evaluating_in(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Every weight of ``model`` is read in ``dtype`` inside the block (no-grad evaluations).

    Nothing changes when ``dtype`` is None or already the model's: the CPU's float32 runs never pay
    for it. On exit the model is as it was: the same parameter objects (tied ones still tied), the
    merge's dtype restored.
    """
    merges = [m for m in model.modules() if isinstance(m, FORMED)]
    casts = _narrower_parameters(model, dtype) if dtype is not None else []
    if dtype is None or (not casts and all(m.compute_dtype == dtype for m in merges)):
        yield
        return
    saved = [(m, m.compute_dtype) for m in merges]
    registered: list[tuple[torch.nn.Module, str]] = []
    try:
        for m in merges:
            m.compute_dtype = dtype
        for module, name in casts:
            parametrize.register_parametrization(module, name, CastTo(dtype), unsafe=True)
            registered.append((module, name))
        yield
    finally:
        for module, name in registered:  # in order: each is put back last, so the order returns
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for m, compute in saved:
            m.compute_dtype = compute
