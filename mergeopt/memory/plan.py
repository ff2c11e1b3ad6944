"""The plan of a fit's memory (:func:`plan_memory`): the byte rows of :mod:`mergeopt.memory.rows`
for the recipe, and, when it does not fit the device, the knobs that help, each re-planned with
the recipe it changes rather than guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace

import yaml

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.memory.layout import excluded
from mergeopt.memory.ranks import check_world_size
from mergeopt.memory.rows import plan_rows
from mergeopt.memory.sizes import (
    EMBEDDING_PATTERNS,
    DeviceMemory,
    Dims,
    Inventory,
    MemoryPlan,
)


def plan_memory(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> MemoryPlan:
    """The plan for ``recipe`` with these shapes on this device, per rank of ``world_size`` (a
    torchrun job's processes), with suggestions if it does not fit."""
    check_world_size(recipe, world_size)
    plan = plan_rows(recipe, inventory, dims, memory, world_size)
    if plan.fits is not False:
        return plan
    saved, combined, enough = suggest(recipe, inventory, dims, memory, world_size)
    sharded = ranks_to_fit(recipe, inventory, dims, memory, world_size)
    return replace(plan, suggestions=tuple(saved), combined_peak=combined, enough=enough, sharded_fit=sharded)


RANK_COUNTS = (2, 4, 8, 16, 32, 64)  # GPUs per job worth naming: a node's, then whole nodes of 8


def ranks_to_fit(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> tuple[int, int] | None:
    """(ranks, peak per rank): the fewest of :data:`RANK_COUNTS` (above ``world_size`` when the
    recipe is sharded already) over which ``model.shard=fsdp`` fits the recipe as written on GPUs of this memory, re-planned per rank;
    None on a CPU (processes on one machine share its memory), under ``model.device_map``, for a
    device of unknown memory, or when none up to 64 does. The knobs shrink what one GPU holds;
    this is the other answer, more GPUs, which the knobs cannot give."""
    if memory.free is None or recipe.model.device_map is not None or not memory.device.startswith("cuda"):
        return None
    sharded = _with(recipe, [("model.shard=fsdp", "model", {"shard": "fsdp"})])
    # sharded already: only more ranks than the job has help; not yet: the fewest that hold it
    # sharded may be fewer than the job has
    fewest = world_size + 1 if recipe.model.shard == "fsdp" else 2
    for ranks in RANK_COUNTS:
        if ranks < fewest or not _runs(sharded, ranks):
            continue
        peak = plan_rows(sharded, inventory, dims, memory, ranks).peak
        if peak <= memory.free:
            return ranks, peak
    return None


Knob = tuple[str, str, dict]  # (the override to type, recipe section, changed fields)


def _with(recipe: Recipe, knobs: Sequence[Knob]) -> Recipe:
    """A copy of the recipe with the knobs applied (frozen models: copied, not re-validated)."""
    for _, section, changes in knobs:
        recipe = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=changes)})
    return recipe


def _halvings(size: int) -> list[int]:
    out = []
    while size > 1:
        size //= 2
        out.append(size)
    return out


def _knob_groups(recipe: Recipe, inventory: Inventory, world_size: int = 1) -> list[list[Knob]]:
    """The knobs worth trying; each group goes from its mildest setting to its strongest."""
    groups: list[list[Knob]] = []
    if world_size > 1 and recipe.model.shard == "none" and recipe.model.device_map is None:
        groups.append([("model.shard=fsdp", "model", {"shard": "fsdp"})])
    narrower = {"float32": ["bfloat16", "int8"], "bfloat16": ["int8"], "float16": ["int8"]}
    groups.append(
        [
            (f"model.stack_dtype={d}", "model", {"stack_dtype": d})
            for d in narrower.get(recipe.model.stack_dtype, [])
        ]
    )
    if recipe.search.strategy == "gradient" and not recipe.optim.activation_checkpointing:
        groups.append([("optim.activation_checkpointing=true", "optim", {"activation_checkpointing": True})])
    patterns = [re.compile(p) for p in recipe.model.exclude]
    stacked = [n for n in inventory.shapes if not excluded(n, patterns)]
    embeddings = [p for p in EMBEDDING_PATTERNS if any(re.search(p, n) for n in stacked)]
    if embeddings:
        exclude = (*recipe.model.exclude, *embeddings)
        groups.append([(f"model.exclude={_flow_list(exclude)}", "model", {"exclude": exclude})])
    optim = recipe.optim
    if recipe.search.strategy == "gradient":
        examples = optim.batch_size * optim.grad_accum  # per optimizer step: kept (rounded up)
        groups.append(
            [
                (
                    f"optim.batch_size={b} optim.grad_accum={-(-examples // b)}",
                    "optim",
                    {"batch_size": b, "grad_accum": -(-examples // b)},
                )
                for b in _halvings(optim.batch_size)
            ]
        )
    groups.append(
        [
            (f"optim.eval_batch_size={b}", "optim", {"eval_batch_size": b})
            for b in _halvings(optim.eval_batch_size)
        ]
    )
    if recipe.data.max_length >= 256:  # shorter examples change what is fitted: one halving at most
        length = recipe.data.max_length // 2
        groups.append([(f"data.max_length={length}", "data", {"max_length": length})])
    return [g for g in groups if g]


def _flow_list(items: Sequence[str]) -> str:
    """``items`` as a YAML flow sequence without spaces, the value of a ``key=value`` override.

    A suggestion is meant to be typed as printed, and an exclusion pattern is a regex: one that a
    plain flow item would not give back (``layers\\.3[01]\\.``, ``a,b``, ``true``) is double-quoted,
    in JSON's quoting, which YAML reads as the same string.
    """

    def item(text: str) -> str:
        try:
            plain = yaml.safe_load(f"[{text}]") == [text]
        except yaml.YAMLError:
            plain = False
        return text if plain else json.dumps(text)

    return "[" + ",".join(item(t) for t in items) + "]"


def _runs(recipe: Recipe, world_size: int) -> bool:
    """Whether the recipe can run on ``world_size`` ranks (a sharded micro-batch splits evenly)."""
    try:
        check_world_size(recipe, world_size)
    except UserError:
        return False
    return True


def suggest(
    recipe: Recipe, inventory: Inventory, dims: Dims, memory: DeviceMemory, world_size: int = 1
) -> tuple[list[tuple[str, int]], int, int | None]:
    """Knobs that lower the peak with the bytes each saves (re-planned, not guessed), best first,
    the peak with all of them applied, and how many of the first make it fit together when fewer
    than all do (None otherwise): another knob may save nothing once one is applied (int8 makes a
    MoE fit, and a halved max_length would change what is fitted for no memory).

    From each group the mildest setting that makes the recipe fit on its own is chosen, else the
    strongest: a batch is halved only as far as needed. Settings the ranks could not run (a
    sharded micro-batch that does not split evenly) are not offered.
    """

    def peak(knobs: Sequence[Knob]) -> int:
        return plan_rows(_with(recipe, knobs), inventory, dims, memory, world_size).peak

    now, chosen = peak(()), []
    for group in _knob_groups(recipe, inventory, world_size):
        group = [k for k in group if _runs(_with(recipe, [*chosen, k]), world_size)]  # and together
        if not group:
            continue
        knob = next((k for k in group if peak([k]) <= memory.free), group[-1])
        if peak([knob]) < now:
            chosen.append(knob)
    alone = sorted(((k, peak([k])) for k in chosen), key=lambda kp: kp[1])  # best first, as listed
    ranked = [k for k, _ in alone]
    saved = [(k[0], now - p) for k, p in alone]
    combined = peak(chosen)
    if combined > memory.free:
        return saved, combined, None
    enough = next(n for n in range(1, len(ranked) + 1) if peak(ranked[:n]) <= memory.free)
    return saved, combined, (enough if enough < len(ranked) else None)
