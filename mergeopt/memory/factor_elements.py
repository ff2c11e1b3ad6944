"""The LoRA experts' factors in the memory plan (:mod:`mergeopt.memory.rows`): the elements one rank
keeps of the stacked A and B, their copies in the compute dtype, and the low-rank activations a
checkpointed layer holds, from the adapters' header shapes
(:class:`~mergeopt.loading.lora_sizes.FactorSizes`). The rules are those of
:mod:`mergeopt.merging.lowrank` and :mod:`mergeopt.merging.sharded_merge`.
"""

from __future__ import annotations

from mergeopt.loading.lora_sizes import FactorSizes
from mergeopt.memory.layout import LAYER_INDEX
from mergeopt.memory.sizes import block_rows


def lora_modules(adapters: dict[str, FactorSizes]) -> dict[str, tuple[int, int, int]]:
    """(R, in, out) of each module the LoRA experts adapt, R = Σ of their ranks there: the stacked
    A is R × in, the stacked B out × R (:class:`mergeopt.merging.lowrank.LowRankFactors`)."""
    modules: dict[str, tuple[int, int, int]] = {}
    for a in adapters.values():
        for module, (r, inputs, outputs) in a.modules.items():
            total = modules.get(module, (0, inputs, outputs))[0]
            modules[module] = (total + r, inputs, outputs)
    return modules


def parameter_factor_elements(shape: tuple[int, ...], elements: int, r: int, shards: int) -> int:
    """Elements one rank keeps of an adapter's factors of a whole parameter (``elements`` in all, of
    rank r): a fused (experts, out, in) weight's block of ⌈E/N⌉ experts of both, a matrix's A
    whole (r × in) and its block of B's rows."""
    if shards == 1:
        return elements
    if len(shape) == 3:
        return block_rows(shape[0], shards) * r * (shape[1] + shape[2])
    return r * shape[1] + block_rows(shape[0], shards) * r


def by_layer(sizes: dict[str, int]) -> tuple[int, int]:
    """(the largest decoder layer's, the rest's) sum of per-module ``sizes`` (numbered modules are
    in a decoder layer; an adapted output layer or embedding is not)."""
    layers: dict[str, int] = {}
    outside = 0
    for module, size in sizes.items():
        if match := LAYER_INDEX.search(module):
            layers[match.group(1)] = layers.get(match.group(1), 0) + size
        else:
            outside += size
    return max(layers.values(), default=0), outside


def lowrank_by_layer(adapters: dict[str, FactorSizes], gain_rows: dict[str, int]) -> tuple[int, int]:
    """Per token, the low-rank activations (Σr, and the output widths of DoRA layers) of the
    largest decoder layer, which a checkpointed layer's recompute holds, and of the modules outside
    the decoder layers, which are held throughout."""
    return by_layer({m: r + gain_rows.get(m, 0) for m, (r, _, _) in lora_modules(adapters).items()})


def factor_copies(adapters: dict[str, FactorSizes]) -> tuple[int, int]:
    """Elements of the factors' copies in the compute dtype (a stack in another dtype casts A and B
    at each forward, and the backward keeps the copies): all of them, and the largest layer's plus
    those outside the layers (checkpointed)."""
    sizes = {m: r * (i + o) for m, (r, i, o) in lora_modules(adapters).items()}
    largest, outside = by_layer(sizes)
    return sum(sizes.values()), largest + outside


def factor_elements(adapters: dict[str, FactorSizes], shards: int) -> int:
    """Elements of the LoRA factors kept low-rank, on one rank: per module the stacked A and B
    (:func:`lora_modules`), each a block of ⌈rows/N⌉ rows when sharded."""
    if shards == 1:
        return sum(a.numel for a in adapters.values())
    # an adapter whose modules were not read (no header shapes): its elements split evenly
    rest = sum(block_rows(a.numel, shards) for a in adapters.values() if not a.modules)
    modules = lora_modules(adapters).values()
    return rest + sum(block_rows(r, shards) * i + block_rows(o, shards) * r for r, i, o in modules)
