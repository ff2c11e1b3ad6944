"""DoRA experts kept low-rank on a linear merge, wherever that is exact.

Why: PEFT's DoRA (``use_dora``) rescales each output row of W0 + s·B·A to a learned magnitude m,
so the expert's update is not s·B·A, and a stack that held it densely paid for K DoRA experts of
every adapted layer what K full fine-tunes cost. Yet the update is a row scaling of W0 plus a
low-rank term: with g = m / ‖W0 + s·B·A‖ per output row,

    W_i − W0 = (g_i − 1) ⊙ W0 + s_i (g_i ⊙ B_i) A_i,

so where the merged layer's weight is θ0 itself, each DoRA expert costs its factors and one number
per output row (:mod:`mergeopt.merging.lowrank` adds both in the forward pass).

Kept dense, as before, where that identity does not hold or cannot be used: a DoRA embedding or
GPT-2 Conv1D layer (their norms run over columns), the model's output layer (the chunked loss
reads its weight directly), any stack with dense experts (the layer's weight is then their merge,
not θ0), a sharded stack (the row norms span ranks), a layer another adapter updates densely
(its own saved copy, say), and a layer ``model.exclude`` leaves out of the merge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from mergeopt.loading.lora import DenseUpdate, LoraAdapter, LoraFactors
from mergeopt.merging.stacking import excluded


def is_row_dora(update: DenseUpdate) -> bool:
    """A DoRA update of a linear weight (out × in) with nothing else: the kind kept low-rank."""
    return (
        update.magnitude is not None
        and update.norm_dim == 1
        and isinstance(update.delta, LoraFactors)
        and update.start is None
        and update.rows is None
    )


def low_rank_targets(
    model: torch.nn.Module, adapters: Mapping[str, LoraAdapter], patterns: Sequence[re.Pattern]
) -> set[str]:
    """The parameters whose DoRA updates stay low-rank: every adapter that sets one densely does so
    by a row DoRA, and its module is a ``torch.nn.Linear`` other than the model's output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    updates: dict[str, list[DenseUpdate]] = {}
    for adapter in adapters.values():
        for target, update in adapter.dense.items():
            updates.setdefault(target, []).append(update)
    targets = set()
    for target, found in updates.items():
        if not all(is_row_dora(u) for u in found) or excluded(target, patterns):
            continue
        module = model.get_submodule(target.removesuffix(".weight"))
        if isinstance(module, torch.nn.Linear) and module is not output and not module.weight.is_meta:
            targets.add(target)
    return targets


def split_dora(
    model: torch.nn.Module, adapters: Mapping[str, LoraAdapter], exclude: Sequence[str] = ()
) -> tuple[dict[str, LoraAdapter], dict[str, dict[str, torch.Tensor]], dict[str, bool]]:
    """The adapters with their DoRA updates of :func:`low_rank_targets` turned into factors
    (A, g ⊙ B) and removed from their dense updates; each expert's gains {parameter: g − 1}
    (float32, one per output row); and whether any of those updates changes θ0 (an untrained
    DoRA adapter, B = 0 and m = ‖W0‖, does not). g is computed as the dense update computes it
    (:meth:`DenseUpdate.value`), one layer at a time beside θ0."""
    targets = low_rank_targets(model, adapters, [re.compile(p) for p in exclude])
    params = dict(model.named_parameters())
    split, gains, changed = {}, {}, {}
    for name, adapter in adapters.items():
        mine = sorted(targets & adapter.dense.keys())
        factors, expert_gains, differs = dict(adapter.factors), {}, False
        for target in mine:
            update = adapter.dense[target]
            theta0 = params[target].detach()
            dtype = torch.promote_types(theta0.dtype, torch.float32)
            lora = update.delta
            with torch.no_grad():  # s·B·A formed beside θ0 (on its GPU, if there), one layer at a time
                a, b = (f.to(device=theta0.device, dtype=dtype) for f in (lora.a, lora.b))
                delta = lora.scaling * (b @ a)
                norm = torch.linalg.vector_norm(theta0.to(dtype) + delta, dim=1)
                g = update.magnitude.to(device=theta0.device, dtype=dtype) / norm
            factors[target] = LoraFactors(
                lora.a, g.view(-1, 1).to(lora.b.device) * lora.b.to(dtype), lora.scaling
            )
            expert_gains[target] = (g - 1).float()
            differs = differs or bool((g != 1).any()) or bool(delta.any())
        dense = {t: u for t, u in adapter.dense.items() if t not in mine}
        split[name] = LoraAdapter(adapter.path, adapter.config, dict(sorted(factors.items())), dense)
        if expert_gains:
            gains[name] = expert_gains
        changed[name] = differs
    return split, gains, changed
