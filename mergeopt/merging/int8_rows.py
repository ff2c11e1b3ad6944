"""The int8 stack's rows: differences stored as int8 with one absmax scale per expert and row.

Task vectors span a value range about ten times narrower than the weights, so one scale per
output channel keeps the merged proxy close to the float stack at a quarter of float32's bytes
(TVQ, arXiv 2503.06921; benchmarks/precision.py measures what it costs the proxy's ranking and
the fitted w). The per-layer merge (:mod:`mergeopt.merging.layer_merge`) dequantises a layer's
rows on the fly; the stack's other readers use :func:`dequantize_rows`.
"""

from __future__ import annotations

import math

import torch


def quantize_rows(deltas: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one absmax scale per (expert, row): ``deltas ≈ q · scale[..., None]``.

    Rows are every index of each expert's tensor but the last (output channels of a Linear weight,
    tokens of an embedding, (expert, output channel) of a mixture-of-experts' fused weight); a 1-D
    tensor is one row. Task vectors span a narrow range, so a
    per-row scale keeps the merge close (TVQ, arXiv 2503.06921); mergeopt measures it. ``levels``
    is the largest |q|: 127 for int8; 7 gives 4-bit values (benchmarks/precision.py measures what
    an int4 stack would cost with them).
    """
    rows = deltas.reshape(deltas.shape[0], num_rows(deltas.shape[1:]), -1).float()
    scale = rows.abs().amax(dim=2) / float(levels)
    q = torch.round(rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(
        -levels, levels
    )
    return q.to(torch.int8).reshape(deltas.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = q.reshape(q.shape[0], scale.shape[1], -1).float() * scale[..., None]
    return rows.reshape(q.shape)


def num_rows(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows of a tensor as the merge and the int8 scales see it: every index but the last (a
    Linear weight's output channels; a mixture-of-experts' fused (experts, out, in) weight has
    experts × out of them, not one per expert); a vector is one row."""
    return math.prod(shape[:-1]) if len(shape) >= 2 else 1
