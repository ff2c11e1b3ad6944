"""What a recipe's stack is made of, from parameter shapes alone: which parameters are stacked,
which stay whole at θ0, which LoRA factors stay low-rank, and over how many ranks the matrices are
split. The memory rows (:mod:`mergeopt.memory.rows`) are counted over it; the rules are those of
the stack itself (:func:`mergeopt.merging.stacking.build_stack`,
:func:`mergeopt.merging.lowrank_parameters.split_parameter_lora`, :mod:`mergeopt.merging.dora`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mergeopt.config import Recipe
from mergeopt.loading.lora_sizes import FactorSizes, low_rank_dora
from mergeopt.loading.peft_format import PREFIX
from mergeopt.memory.sizes import Inventory, local_numel


def excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)  # as build_stack: re.search over the name


OUTPUT_LAYER = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
LAYER_INDEX = re.compile(r"\.(\d+)\.")  # a decoder layer's number in a parameter's name


def dora_kept_low_rank(recipe: Recipe, adapters: dict[str, FactorSizes]) -> set[str]:
    """The weights whose DoRA updates the fit keeps low-rank (:mod:`mergeopt.merging.dora`): with a
    linear merge of LoRA experts alone, where no adapter sets the weight otherwise, but for the
    output layer and what ``model.exclude`` leaves out. Sharded, their gains stay whole."""
    if recipe.merge.method != "linear" or len(adapters) < len(recipe.model.experts):
        return set()
    patterns = [re.compile(p) for p in recipe.model.exclude]
    return low_rank_dora(adapters, lambda t: not excluded(t, patterns) and not OUTPUT_LAYER.search(t))


def parameters_kept_low_rank(
    recipe: Recipe, adapters: dict[str, FactorSizes], patterns: Sequence[re.Pattern]
) -> set[str]:
    """The whole parameters whose LoRA updates the fit keeps low-rank
    (:func:`mergeopt.merging.lowrank_parameters.split_parameter_lora`): with a linear merge, each
    parameter every adapter setting it sets by a LoRA of the parameter alone, and
    ``model.exclude`` keeps (beside dense experts, their factors come on top of its dense rows)."""
    if recipe.merge.method != "linear":
        return set()
    setting: dict[str, list[bool]] = {}
    for a in adapters.values():
        for name in a.dense:
            setting.setdefault(name, []).append(name in a.parameters)
    return {n for n, found in setting.items() if all(found) and not excluded(n, patterns)}


def not_excluded(sizes: FactorSizes, patterns: Sequence[re.Pattern]) -> FactorSizes:
    """An adapter's low-rank modules less those ``model.exclude`` leaves out of the merge (as the
    stack leaves out their factors: e.g. ``embed_tokens`` in the 8B recipe)."""
    modules = {
        m: v for m, v in sizes.modules.items() if not excluded(f"{m.removeprefix(PREFIX)}.weight", patterns)
    }
    return sizes if len(modules) == len(sizes.modules) else sizes.keeping(modules)


@dataclass(frozen=True)
class Layout:
    """What a recipe stacks, what stays whole, which LoRA factors stay low-rank and over how many
    ranks the matrices are split: what every row of the plan is counted over."""

    inventory: Inventory
    k: int
    shards: int  # ranks the matrices are split over (model.shard: fsdp), else 1
    patterns: list[re.Pattern]
    adapters: dict[str, FactorSizes]
    lowrank: bool  # adapters stay factors (mergeopt.merging.stack)
    alone: bool  # every expert's dense weights are θ0 but for its dense updates
    low_params: set[str]  # LoRA of whole parameters (fused experts) kept as factors
    stacked: list[str]
    unstacked: list[str]

    @property
    def names(self) -> list[str]:
        return list(self.inventory.shapes)

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    @property
    def rank_sum(self) -> int:
        return sum(a.rank_sum for a in self.adapters.values()) if self.lowrank else 0

    def local(self, name: str) -> int:
        """Elements this rank keeps of a parameter."""
        return local_numel(self.inventory.shapes[name], self.shards)

    def matrix(self, name: str) -> bool:
        return len(self.inventory.shapes[name]) >= 2


def layout_of(recipe: Recipe, inventory: Inventory, world_size: int) -> Layout:
    """The layout of a recipe's stack over ``world_size`` ranks, from the inventory alone."""
    k = len(recipe.model.experts)
    patterns = [re.compile(p) for p in recipe.model.exclude]
    names = list(inventory.shapes)
    adapters = {name: not_excluded(sizes, patterns) for name, sizes in inventory.adapters.items()}
    lowrank = bool(adapters) and recipe.merge.method == "linear"
    alone = lowrank and len(adapters) == k
    dora = dora_kept_low_rank(recipe, adapters)
    adapters = {name: sizes.with_dora(dora) for name, sizes in adapters.items()}
    # LoRA of whole parameters (fused experts) kept as factors, merged as their layer reads them
    low_params = parameters_kept_low_rank(recipe, adapters, patterns)
    if alone:
        updated = {n for a in adapters.values() for n in a.dense} - low_params
        stacked = [n for n in names if n in updated and not excluded(n, patterns)]
    else:
        stacked = [n for n in names if not excluded(n, patterns)]
    kept = set(stacked)
    return Layout(
        inventory,
        k,
        world_size if recipe.model.shard == "fsdp" else 1,
        patterns,
        adapters,
        lowrank,
        alone,
        low_params,
        stacked,
        [n for n in names if n not in kept],
    )
