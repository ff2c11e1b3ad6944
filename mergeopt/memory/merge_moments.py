"""One stacked parameter's per-layer merge in flight, in bytes: formed, used, contracted.

The merge kernels (:mod:`mergeopt.merging.layer_merge`) form a layer's merged weight in working
blocks just before the module runs and contract ⟨∂L/∂W, δ_i⟩ in its backward; sharded, DTensor's
collectives gather the merged weight whole. These are the moments of that one parameter, which the
training step and the evaluation batch (:mod:`mergeopt.memory.phases`) place beside a layer's
activations; checked in tests/test_plan.py against the live tensor bytes of real steps, on one
process and on gloo ranks.
"""

from __future__ import annotations

from mergeopt.config import Recipe
from mergeopt.memory.sizes import FLOAT32, Gathers
from mergeopt.merging.stack import DTYPES


def anchor_itemsize(recipe: Recipe, compute: int) -> int:
    """The anchor is stored in the stack dtype; an int8 stack keeps it in the compute dtype."""
    return compute if recipe.model.stack_dtype == "int8" else DTYPES[recipe.model.stack_dtype].itemsize


def _blocks(recipe: Recipe, largest: int, compute: int) -> tuple[bool, int]:
    """Whether the merge kernel takes its one-``addmv`` form (a float32 stack), and the elements of
    its working block (a chunk of the parameter: :data:`mergeopt.merging.layer_merge.CHUNK` elements across
    the K − 1 differences for ``addmv``, per expert for the narrow form)."""
    from mergeopt.merging.layer_merge import CHUNK

    k1 = len(recipe.model.experts) - 1
    same = recipe.model.stack_dtype == "float32" and anchor_itemsize(recipe, compute) == FLOAT32
    return same, min(largest, CHUNK // max(1, k1) if same else CHUNK)


def _kernel_bytes(recipe: Recipe, largest: int, compute: int) -> int:
    """The merge kernel's temporaries: none when the result is float32 (it merges into the result),
    else one float32 block that is cast into it."""
    _, block = _blocks(recipe, largest, compute)
    return 0 if compute == FLOAT32 else FLOAT32 * block


def _contraction_bytes(recipe: Recipe, largest: int, compute: int, from_factors: bool = False) -> int:
    """⟨∂L/∂W, δ_i⟩'s temporaries: the gradient's block upcast to float32 (a narrower compute
    dtype) and, for narrow differences, their product with it. A weight merged from LoRA factors
    (``from_factors``, :mod:`mergeopt.merging.lowrank_parameters`) projects the upcast block onto
    the factors, whose products are rank-sized: the upcast alone."""
    from mergeopt.merging.layer_merge import CHUNK

    if from_factors:
        return FLOAT32 * min(largest, CHUNK) * (compute != FLOAT32)
    same, block = _blocks(recipe, largest, compute)
    return FLOAT32 * block * ((compute != FLOAT32) + (not same))


def merge_bytes(
    recipe: Recipe,
    num_experts: int,
    largest: int,
    compute: int,
    gathers: Gathers | None = None,
    from_factors: bool = False,
) -> int:
    """One parameter's per-layer merge in flight in a training step, at its largest moment: formed
    (its value and the kernel's temporaries), used (its value and its gradient, in the compute
    dtype, while the module's backward runs) or contracted (the gradient and the contraction's
    temporaries).

    Sharded (``gathers``, DTensor's collectives: :mod:`mergeopt.merging.sharded_merge`): the rank merges its
    block (the kernel's temporaries over the block); the all-gather fills a buffer of N blocks
    beside it, whose rows are the weight (a rank short of ⌈R/N⌉ rows pads a copy of its block
    first); the weight is used beside its gradient; the reduce-scatter leaves the rank its block of
    the gradient (with padding rows, from a padded copy of the whole gradient and of its last
    block); the contraction reads that block after the whole gradient is gone (measured on 2 and 3
    gloo ranks, tests/test_plan.py)."""
    del num_experts  # the kernel's temporaries do not grow with K
    if gathers is not None:
        block, full = gathers.block, gathers.padded
        short = block if full != largest else 0  # a rank's block padded to ⌈R/N⌉ rows by a copy
        return max(
            compute * block + _kernel_bytes(recipe, block, compute),
            compute * (block + full + short),
            compute * (full + largest),
            compute * (largest + block + (full + short if short else 0)),
            compute * block + _contraction_bytes(recipe, block, compute),
        )
    return max(
        compute * largest + _kernel_bytes(recipe, largest, compute),
        2 * compute * largest,
        compute * largest + _contraction_bytes(recipe, largest, compute, from_factors),
    )


def merge_evaluation_bytes(recipe: Recipe, largest: int, compute: int, gathers: Gathers | None = None) -> int:
    """One parameter merged without autograd: its value and the kernel's float32 temporaries;
    sharded, the rank's block merged, then gathered whole beside it (:func:`merge_bytes`)."""
    if gathers is not None:
        block, full = gathers.block, gathers.padded
        short = block if full != largest else 0
        return max(compute * block + _kernel_bytes(recipe, block, compute), compute * (block + full + short))
    return compute * largest + _kernel_bytes(recipe, largest, compute)
