"""Experts stored with fewer significant bits than the base, found from the safetensors headers.

A task vector θ_i − θ0 of a bfloat16 expert over a float32 base carries the base's rounding to
bfloat16 (about 2⁻⁹ of each weight) beside the fine-tune, which a short fine-tune may not exceed:
plan and fit warn before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol


class Checkpoint(Protocol):
    """What is read of a :class:`mergeopt.loading.checkpoints.Checkpoint`: its tensors' headers
    (each with ``dtype`` and ``shape``)."""

    tensors: Mapping[str, Any]


# significant bits of each float dtype, as safetensors headers and torch name them
MANTISSA_BITS = {
    **{"F64": 52, "float64": 52, "F32": 23, "float32": 23},
    **{"F16": 10, "float16": 10, "BF16": 7, "bfloat16": 7},
}


def weight_dtype(checkpoint: Checkpoint) -> str | None:
    """The float dtype that holds most of ``checkpoint``'s weights (None: none known, e.g. GGUF)."""
    elements: dict[str, int] = {}
    for meta in checkpoint.tensors.values():
        if meta.dtype in MANTISSA_BITS:
            elements[meta.dtype] = elements.get(meta.dtype, 0) + math.prod(meta.shape)
    return max(elements, key=elements.__getitem__) if elements else None


def precision_warning(base: Checkpoint, dense: Mapping[str, Checkpoint]) -> str | None:
    """A warning for experts stored with fewer significant bits than the base: θ_i − θ0 then holds
    the rounding of θ0 to the expert's dtype as well as the fine-tune (a float32 base and bfloat16
    experts: about 2⁻⁹ of each weight, where a short fine-tune moves it 1e-3 or less)."""
    kept = weight_dtype(base)
    if kept is None:
        return None
    lower = {}
    for name, expert in dense.items():
        dtype = weight_dtype(expert)
        if dtype is not None and MANTISSA_BITS[dtype] < MANTISSA_BITS[kept]:
            lower[name] = dtype
    if not lower:
        return None
    named = ", ".join(f"{name} ({dtype})" for name, dtype in lower.items())
    return (
        f"expert{'s' * (len(lower) > 1)} {named} stored with less precision than the base ({kept}): "
        "each task vector θ_i − θ0 then carries the base's rounding to that dtype, which for a short "
        "fine-tune can be as large as the fine-tune itself; save the experts in the base's dtype, or "
        "give a copy of the base saved in theirs"
    )
