"""DoRA experts kept low-rank on a linear merge, wherever that is exact.

Why: PEFT's DoRA (``use_dora``) rescales each output row of W0 + s·B·A to a learned magnitude m,
so the expert's update is not s·B·A, and a stack that held it densely paid for K DoRA experts of
every adapted layer what K full fine-tunes cost. Yet the update is a row scaling of W0 plus a
low-rank term: with g = m / ‖W0 + s·B·A‖ per output row,

    W_i − W0 = (g_i − 1) ⊙ W0 + s_i (g_i ⊙ B_i) A_i,

so where the merged layer's weight is θ0 itself, each DoRA expert costs its factors and one number
per output row (:mod:`mergeopt.merging.lowrank` adds both in the forward pass).

Under ``model.shard: fsdp`` each rank computes g for its block of rows (θ0's rows are all it
reads) and the ranks all-gather the gains, one collective per expert: a gain is one number per
row, so every rank keeps them whole, beside its blocks of the factors.

Kept dense, as before, where that identity does not hold or cannot be used: a DoRA embedding or
GPT-2 Conv1D layer (their norms run over columns), the model's output layer (the chunked loss
reads its weight directly), any stack with dense experts (the layer's weight is then their merge,
not θ0), a layer another adapter updates densely (its own saved copy, say), and a layer
``model.exclude`` leaves out of the merge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from mergeopt.loading.lora_updates import DenseUpdate, LoraAdapter, LoraFactors
from mergeopt.loading.sharded_load import BaseSource
from mergeopt.merging.sharded_merge import block_range, padded
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
        if isinstance(module, torch.nn.Linear) and module is not output:
            targets.add(target)
    return targets


def _theta0_rows(
    param: torch.Tensor, name: str, shard: tuple[int, int] | None, base: BaseSource | None, device
) -> tuple[torch.Tensor, int, int]:
    """θ0's rows this process computes the gains of: all of them, or its block when sharded (read
    from ``base`` when the model is empty), with the block's (start, stop)."""
    if shard is None:
        return param.detach(), 0, param.shape[0]
    start, stop, _ = block_range(param.shape[0], *shard)
    rows = base.rows(name, start, stop, param, device) if param.is_meta else param.detach()[start:stop]
    return rows, start, stop


def _gathered(
    blocks: list[torch.Tensor], widths: list[int], shard: tuple[int, int] | None
) -> list[torch.Tensor]:
    """Each layer's whole gains (``widths``: its output rows) from every rank's blocks of them: one
    all-gather of this rank's blocks side by side, each padded to ⌈rows/N⌉ rows."""
    if shard is None or not blocks:
        return blocks
    per = [-(-w // shard[1]) for w in widths]
    mine = torch.cat([padded(b, p) for b, p in zip(blocks, per)])
    everyone = [torch.empty_like(mine) for _ in range(shard[1])]
    dist.all_gather(everyone, mine)
    whole, offset = [], 0
    for w, p in zip(widths, per):
        whole.append(torch.cat([e[offset : offset + p] for e in everyone])[:w])
        offset += p
    return whole


def split_dora(
    model: torch.nn.Module,
    adapters: Mapping[str, LoraAdapter],
    exclude: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    base: BaseSource | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, LoraAdapter], dict[str, dict[str, torch.Tensor]], dict[str, bool]]:
    """The adapters with their DoRA updates of :func:`low_rank_targets` turned into factors
    (A, g ⊙ B) and removed from their dense updates; each expert's gains {parameter: g − 1}
    (float32, one per output row); and whether any of those updates changes θ0 (an untrained
    DoRA adapter, B = 0 and m = ‖W0‖, does not). g is computed as the dense update computes it
    (:meth:`DenseUpdate.value`), one layer at a time beside θ0; ``shard`` (rank, world size): each
    rank computes its block of rows, ``base`` reads them where the model is empty."""
    targets = low_rank_targets(model, adapters, [re.compile(p) for p in exclude])
    params = dict(model.named_parameters())
    split, gains, changed = {}, {}, {}
    for name, adapter in adapters.items():
        mine = sorted(targets & adapter.dense.keys())
        factors, blocks = dict(adapter.factors), []
        for target in mine:
            update, lora = adapter.dense[target], adapter.dense[target].delta
            theta0, start, stop = _theta0_rows(params[target], target, shard, base, device)
            dtype = torch.promote_types(theta0.dtype, torch.float32)
            with torch.no_grad():  # s·B·A formed beside θ0 (on its GPU, if there), one layer at a time
                a = lora.a.to(device=theta0.device, dtype=dtype)
                b = lora.b[start:stop].to(device=theta0.device, dtype=dtype)
                norm = torch.linalg.vector_norm(theta0.to(dtype) + lora.scaling * (b @ a), dim=1)
                blocks.append(update.magnitude[start:stop].to(device=theta0.device, dtype=dtype) / norm)
        whole = _gathered(blocks, [params[t].shape[0] for t in mine], shard)
        for target, g in zip(mine, whole):
            lora = adapter.dense[target].delta
            factors[target] = LoraFactors(
                lora.a, g.view(-1, 1).to(lora.b.device) * lora.b.to(g.dtype), lora.scaling
            )
        dense = {t: u for t, u in adapter.dense.items() if t not in mine}
        split[name] = LoraAdapter(adapter.path, adapter.config, dict(sorted(factors.items())), dense)
        if mine:
            gains[name] = {t: (g - 1).float() for t, g in zip(mine, whole)}
        changed[name] = any(
            bool((g != 1).any()) or bool(adapter.dense[t].delta.b.any() and adapter.dense[t].delta.a.any())
            for t, g in zip(mine, whole)
        )
    return split, gains, changed
