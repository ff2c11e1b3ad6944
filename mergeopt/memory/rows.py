"""The memory model of a fit: the byte rows a recipe holds, per rank, from parameter shapes.

What a fit holds, in bytes (P parameters, S of them stacked, K experts; see :mod:`mergeopt.merging.stack`):

* for the whole run: the parameters that are not stacked in the compute dtype (c(P − S)); the
  stack's anchor (S, in ``model.stack_dtype``; the compute dtype for int8) and its K − 1
  differences (int8: one byte each plus a float32 scale per expert and row); θ0 of the stacked
  parameters is not kept, and no merged copy exists (each layer merges as it runs,
  :mod:`mergeopt.merging.layer_merge`); Adam keeps 4 float64 numbers per logit (32K);
* on top, one phase at a time (the plan takes the largest): stacking (temporaries of the largest
  tensor), a training micro-step of the gradient strategy (activations in the compute dtype, all
  layers' or, with activation checkpointing, their inputs and one layer's; the chunked loss; one
  layer's merge in flight), an evaluation batch (no grad).

Under torchrun (N ranks) the plan is per rank. With ``model.shard: fsdp``
(:mod:`mergeopt.merging.sharded_merge`) every matrix, stacked or not, is held as a block of ⌈R/N⌉ of its R
rows (anchor, differences, int8 scales, LoRA factors alike) and vectors whole; a layer gathers each
merged weight whole while it runs, and the backward reduce-scatters its gradient to the rank's
rows (:func:`~mergeopt.memory.merge_moments.merge_bytes`, :class:`~mergeopt.memory.sizes.Gathers`). The training micro-batch is split over the ranks
(:func:`~mergeopt.memory.ranks.check_shard_division`), each rank evaluates ``optim.eval_batch_size`` sequences per step.
The held rows are exact; the phases' gathers are checked, like the single-process phases, against
the live bytes of each rank of sharded steps (2 and 3 gloo processes, tests/test_plan.py).

Everything here is arithmetic on shapes, so it runs for a 16B model on a laptop; where the shapes
come from (safetensors headers or config.json) is :mod:`mergeopt.memory.dry_run`'s job, and what is
stacked, kept whole or kept low-rank :mod:`mergeopt.memory.layout`'s. Which parameters
are equal in every expert cannot be known without reading weights, so every parameter that
``model.exclude`` keeps counts as stacked: an upper bound. The phases are estimates written from
what this code and a Llama decoder keep alive, checked in tests/test_plan.py against the live
tensor bytes of real steps on small Llamas (see :func:`~mergeopt.memory.phases.training_bytes`, :func:`~mergeopt.memory.phases.evaluation_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mergeopt.config import Recipe
from mergeopt.loading.peft_format import PREFIX
from mergeopt.memory.factor_elements import (
    factor_copies,
    factor_elements,
    lora_modules,
    lowrank_by_layer,
    parameter_factor_elements,
)
from mergeopt.memory.layout import LAYER_INDEX, OUTPUT_LAYER, Layout, excluded, layout_of
from mergeopt.memory.merge_moments import anchor_itemsize
from mergeopt.memory.phases import (
    compute_itemsize,
    eval_itemsize,
    evaluation_bytes,
    stacking_bytes,
    training_batch,
    training_bytes,
)
from mergeopt.memory.sizes import (
    FLOAT32,
    DeviceMemory,
    Dims,
    Gathers,
    Inventory,
    MemoryPlan,
    Row,
    block_rows,
)
from mergeopt.merging.stack import DTYPES
from mergeopt.merging.stacking import STACK_BLOCK


def _largest_layer(names: Sequence[str], inventory: Inventory) -> int:
    """Elements of the stacked parameters of the largest decoder layer (numbered modules)."""
    layers: dict[str, int] = {}
    for name in names:
        match = LAYER_INDEX.search(name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), 0) + inventory.numel(name)
    return max(layers.values(), default=0)


def _output_layer_merged(stacked: Sequence[str], inventory: Inventory) -> bool:
    """Whether the output layer reads the merge: stacked itself, or tied to a stacked embedding."""
    if any(OUTPUT_LAYER.search(n) for n in inventory.shapes):
        return any(OUTPUT_LAYER.search(n) for n in stacked)
    return any("emb" in n or "wte" in n for n in stacked)


def _stacked_in_blocks(recipe: Recipe, inventory: Inventory, stacked: Sequence[str]) -> list[str]:
    """The matrices one process stacks a block of rows at a time (linear merge at scale 1, dense
    experts read from checkpoints: :func:`mergeopt.merging.stacking.in_blocks`)."""
    if recipe.merge.method != "linear" or recipe.merge.scale != 1.0 or inventory.adapters:
        return []
    if any(str(path).startswith("random://") for path in recipe.model.experts.values()):
        return []  # a random:// expert makes each tensor whole
    return [n for n in stacked if len(inventory.shapes[n]) >= 2 and inventory.numel(n) > STACK_BLOCK]


def _rows(inventory: Inventory, names: Sequence[str], shards: int = 1) -> int:
    """Rows of the int8 scales: every index of a tensor but the last (one for a vector; experts ×
    outputs for a mixture-of-experts' fused weight); sharded over ``shards`` ranks, those of a
    rank's block of ⌈R/N⌉ of its first dimension."""

    def rows(shape: tuple[int, ...]) -> int:
        if len(shape) < 2:
            return 1
        return block_rows(shape[0], shards) * math.prod(shape[1:-1])

    return sum(rows(inventory.shapes[n]) for n in names)


def _held_rows(
    recipe: Recipe,
    layout: Layout,
    compute: int,
    names: tuple[str, str],
    factor_bytes: int,
    world_size: int,
) -> tuple[Row, ...]:
    """What the run holds throughout, per rank: the parameters not stacked, the anchor, the
    differences (with int8 scales), the LoRA factors kept low-rank (``factor_bytes``: their A and B
    blocks) and Adam's state."""
    inventory, stacked, adapters, k = layout.inventory, layout.stacked, layout.adapters, layout.k
    dtype = recipe.model.stack_dtype
    compute_name, anchor_name = names  # the compute dtype's, and the anchor's and factors'
    s_local = sum(layout.local(n) for n in stacked)
    # the factors of whole parameters kept low-rank, and per rank column its expert and scaling;
    # sharded, a rank's block of them (mergeopt.merging.sharded_merge.shard_parameter_factors)
    parameter_factors = sum(
        parameter_factor_elements(inventory.shapes[name], elements, r, layout.shards)
        * DTYPES[anchor_name].itemsize
        + r * 12
        for a in adapters.values()
        for name, (elements, r) in a.parameters.items()
        if name in layout.low_params
    )
    # A and B in the stack's float dtype, plus per rank column its expert (int64) and scaling
    # (float32), and the DoRA experts' row gains
    factors = (
        factor_bytes
        + layout.rank_sum * (8 + 4)
        + sum(a.gain_bytes() for a in adapters.values())
        + parameter_factors
        if layout.lowrank
        else 0
    )
    scales = (k - 1) * _rows(inventory, stacked, layout.shards) * FLOAT32 if dtype == "int8" else 0
    differences = (k - 1) * s_local * DTYPES[dtype].itemsize + scales
    sharded, shards = layout.sharded, layout.shards
    rows = ""
    if sharded:
        rows = f", sharded: 1/{shards} of the rows per rank"
        rows += " (vectors whole)" if any(not layout.matrix(n) for n in stacked) else ""
    held = [
        Row(
            f"model parameters not stacked, {compute_name}"
            + (": vectors whole, matrices sharded" if sharded else ""),
            compute * sum(layout.local(n) for n in layout.unstacked),
        ),
    ]
    if stacked:  # LoRA experts alone stack nothing densely: no anchor and no difference rows
        held += [
            Row(f"stack anchor θ_1, {anchor_name}{rows}", anchor_itemsize(recipe, compute) * s_local),
            Row(
                f"stack differences, {k - 1} x {dtype}" + (" with per-row scales" if scales else "") + rows,
                differences,
            ),
        ]
    if layout.lowrank:
        held.append(
            Row(
                f"LoRA factors of {len(adapters)} expert(s), {anchor_name}, kept low-rank"
                + (f", sharded: 1/{shards} of the rows per rank" if sharded else ""),
                factors,
            )
        )
    held.append(
        Row(
            f"optimizer: Adam on {k} float64 logits" + (", whole on every rank" if world_size > 1 else ""),
            4 * 8 * k,
        )
    )
    return tuple(held)


def _gathers(layout: Layout, dims: Dims, biggest: str | None, merged_head: bool) -> Gathers:
    """What a sharded step gathers whole (:class:`~mergeopt.memory.sizes.Gathers`)."""
    inventory = layout.inventory
    block = layout.local(biggest) if biggest else 0
    # gathered whole while their module runs: matrices not stacked, and LoRA factors (A and B)
    gathered = {n: inventory.numel(n) for n in layout.unstacked if layout.matrix(n)}
    if layout.lowrank:
        gathered.update({m: r * (i + o) for m, (r, i, o) in lora_modules(layout.adapters).items()})
    in_layers = {n: size for n, size in gathered.items() if LAYER_INDEX.search(n)}
    layers: dict[str, int] = {}
    for n, size in in_layers.items():
        index = LAYER_INDEX.search(n).group(1)
        layers[index] = layers.get(index, 0) + size
    # gathering the output layer: the rank's merged block (when merged), the all-gather buffer
    # and, when the rows do not divide, a short block's padded copy
    shards = layout.shards
    head_block = block_rows(dims.vocab, shards) * dims.hidden
    head = head_block * (shards + merged_head + (dims.vocab % shards != 0))
    return Gathers(
        block=block,
        padded=block * shards if biggest and layout.matrix(biggest) else block,
        head=head,
        layer=max(layers.values(), default=0),
        unstacked=max(in_layers.values(), default=0),
        unstacked_any=max(gathered.values(), default=0),
    )


def _stacking_row(
    recipe: Recipe, layout: Layout, source: int, compute: int, factor_bytes: int, factor_itemsize: int
) -> Row:
    """Stacking's largest moment: the temporaries of the largest tensor (or of its block of rows),
    of a sharded rank's padded blocks, of the LoRA factors read whole, or of a DoRA layer's norms."""
    inventory, stacked, k = layout.inventory, layout.stacked, layout.k
    sharded, local, matrix = layout.sharded, layout.local, layout.matrix
    largest = max((inventory.numel(n) for n in stacked), default=0)
    if sharded and recipe.merge.method == "linear" and recipe.merge.scale == 1.0:
        # each rank reads and stacks its block of rows of every matrix alone (mergeopt.merging.stack)
        label = "stacking: temporaries of the largest tensor's block of rows"
        stacking_elements = max((local(n) for n in stacked), default=0)
    elif sharded:  # other merges prepare one whole tensor at a time and keep its block
        label = f"stacking: temporaries of the largest tensor ({recipe.merge.method}: prepared whole)"
        stacking_elements = largest
    else:
        label, stacking_elements = "stacking: temporaries of the largest tensor", largest
    blocked = [] if sharded else _stacked_in_blocks(recipe, inventory, stacked)
    if blocked:  # stacked a block of rows at a time; the rest whole
        stacking_elements = max((inventory.numel(n) for n in stacked if n not in blocked), default=0)
    stacking = stacking_bytes(recipe, k, stacking_elements, source, compute)
    for name in blocked:
        shape = inventory.shapes[name]
        per_index = math.prod(shape[1:])
        block = min(math.prod(shape), max(1, STACK_BLOCK // per_index) * per_index)
        in_blocks = stacking_bytes(
            recipe, k, math.prod(shape), inventory.source_bytes[name], compute, block=block
        )
        if in_blocks > stacking:
            stacking, label = in_blocks, "stacking: temporaries of the largest tensor, in blocks of rows"
    if sharded:  # blocks short of ⌈R/N⌉ rows are padded by copying them (measured on 3 gloo ranks)
        shards = layout.shards
        short = [local(n) for n in stacked if matrix(n) and inventory.shapes[n][0] % shards]
        if short and recipe.merge.method == "linear" and recipe.merge.scale == 1.0:
            stacking = max(stacking, stacking_bytes(recipe, k, max(short), source, compute, short=True))
        # a matrix model.exclude keeps at θ0: its padded block is copied once more into the one kept
        kept = [
            local(n)
            for n in layout.names
            if excluded(n, layout.patterns) and matrix(n) and inventory.shapes[n][0] % shards
        ]
        stacking = max(stacking, compute * max(kept, default=0))
    if sharded and layout.lowrank:  # the LoRA factors are read whole once, then cut to the rank's rows
        stacking += factor_elements(layout.adapters, 1) * factor_itemsize - factor_bytes
        label += "; LoRA factors whole"
    adapters = layout.adapters.values()
    dora_layers = [f"{m.removeprefix(PREFIX)}.weight" for a in adapters for m in a.gains]
    if dora_layers:  # a DoRA layer's row norms: θ0's rows read, then in float32, s·B·A and their sum
        dora = max(local(n) for n in dora_layers) * (compute + 3 * FLOAT32)
        if dora > stacking:
            label, stacking = (
                "stacking: the row norms of the largest DoRA layer (its rows of θ0 + s·B·A)",
                dora,
            )
    return Row(label, stacking)


def plan_rows(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> MemoryPlan:
    """Byte rows from the inventory, per rank; no suggestions (they re-plan with changed recipes)."""
    layout = layout_of(recipe, inventory, world_size)
    k, stacked, adapters, lowrank = layout.k, layout.stacked, layout.adapters, layout.lowrank
    names = layout.names
    dtype = recipe.model.stack_dtype
    compute = compute_itemsize(recipe, memory.device)
    dims = dims.on_device(memory.device)  # the attention kernels the device runs
    compute_name = next(n for n in ("float32", "bfloat16") if DTYPES[n].itemsize == compute)
    if recipe.model.compute_dtype == "float16":
        compute_name = "float16"
    anchor_name = compute_name if dtype == "int8" else dtype
    factor_itemsize = DTYPES[anchor_name].itemsize
    factor_bytes = factor_elements(adapters, layout.shards) * factor_itemsize if lowrank else 0
    held = _held_rows(recipe, layout, compute, (compute_name, anchor_name), factor_bytes, world_size)
    biggest = max(stacked, key=inventory.numel, default=None)
    source = inventory.source_bytes[biggest] if biggest else FLOAT32
    merged_head = _output_layer_merged(stacked, inventory)
    gathers = _gathers(layout, dims, biggest, merged_head) if layout.sharded else None
    phases = [_stacking_row(recipe, layout, source, compute, factor_bytes, factor_itemsize)]
    batch = f"evaluation batch {recipe.optim.eval_batch_size} x {recipe.data.max_length} tokens"
    batch += " per rank" if world_size > 1 else ""
    # what the per-layer merge forms: the stacked parameters and the whole parameters kept low-rank
    merged = list(dict.fromkeys([*stacked, *sorted(layout.low_params)]))
    largest_merged = max((inventory.numel(n) for n in merged), default=0)
    if recipe.search.strategy == "gradient":
        step = _StepInputs(
            layout, inventory, dims, compute, (compute_name, anchor_name), merged_head, gathers
        )
        row, micro = _training_row(recipe, step, merged, largest_merged, world_size)
        phases.append(row)
        batch = f"{micro}; {batch}"
    evaluate = eval_itemsize(recipe)
    evaluate_name = "float32" if recipe.model.eval_dtype == "auto" else recipe.model.eval_dtype
    widest = max((inventory.numel(n) for n in layout.unstacked), default=0)
    evaluation = evaluation_bytes(
        recipe, dims, largest_merged, k, compute, merged_head, evaluate, widest, gathers
    )
    phases.append(Row(f"evaluation batch, no grad, {evaluate_name}", evaluation))
    return MemoryPlan(
        memory,
        k,
        sum(inventory.numel(n) for n in names),
        len(names),
        sum(inventory.numel(n) for n in stacked),
        len(stacked),
        sum(excluded(n, layout.patterns) for n in names),
        held,
        tuple(phases),
        batch,
        world_size=world_size,
        shard=recipe.model.shard,
        adapters_only=layout.alone,
    )


@dataclass(frozen=True)
class _StepInputs:
    """What the training step's row is planned from, beside the recipe."""

    layout: Layout
    inventory: Inventory
    dims: Dims  # on the planned device
    compute: int  # bytes per element of the compute dtype
    dtype_names: tuple[str, str]  # the compute dtype's name and the anchor's (LoRA factors are held in it)
    merged_head: bool  # the output layer is stacked, so merged
    gathers: Gathers | None  # sharded: what a rank gathers whole while a layer runs


def _training_row(
    recipe: Recipe, step: _StepInputs, merged: list[str], largest_merged: int, world_size: int
) -> tuple[Row, str]:
    """The gradient strategy's micro-step (:func:`~mergeopt.memory.phases.training_bytes`) as a row,
    and the micro-batch it is planned for (each rank takes every N-th example:
    mergeopt.runtime.distributed). ``merged``: what the per-layer merge forms; ``largest_merged``:
    the elements of the largest of them."""
    layout, inventory = step.layout, step.inventory
    adapters, lowrank = layout.adapters, layout.lowrank
    compute_name, anchor_name = step.dtype_names
    gain_rows = {m: a.modules[m][2] for a in adapters.values() for m in a.gains}  # DoRA: out per layer
    train = training_batch(recipe)
    share = block_rows(train, world_size)
    planned = training_bytes(
        recipe,
        step.dims,
        share,
        largest_merged,
        layout.k,
        step.compute,
        _largest_layer(merged, inventory),
        step.merged_head,
        layout.rank_sum,
        step.gathers,
        sum(gain_rows.values()),
        # LoRA experts alone, nothing of the decoder layers stacked: no layer weight is merged
        frozen=layout.alone and not any(LAYER_INDEX.search(n) for n in merged),
        lowrank_by_layer=lowrank_by_layer(adapters, gain_rows) if lowrank else (0, 0),
        # sharded factors are gathered again for the backward, not kept
        factor_copies=factor_copies(adapters)
        if lowrank and not layout.sharded and anchor_name != compute_name
        else (0, 0),
        # the layers' merged weights formed from factors alone (fused experts' LoRA)
        from_factors=bool(layout.low_params) and not any(LAYER_INDEX.search(n) for n in layout.stacked),
    )
    how = "checkpointed" if recipe.optim.activation_checkpointing else "every activation kept"
    micro = f"micro-batch {train} x {recipe.data.max_length} tokens"
    if world_size > 1:
        micro += f" over {world_size} ranks, {share} per rank"
    return Row(f"training step, {compute_name}, {how}", planned), micro
