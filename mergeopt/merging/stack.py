"""The expert stack: every expert's weights for each merged parameter, laid out for the linear merge.

The proxy is θ(w) = θ0 + Σ_i w_i τ_i with τ_i = θ_i − θ0 and w on the simplex. Because Σ_i w_i = 1,
this equals θ_1 + Σ_{i≥2} w_i (θ_i − θ_1): on the simplex θ0 drops out. So the stack holds, per
merged parameter, an *anchor* θ_1 (in ``model.stack_dtype``; bfloat16 or the compute dtype for an
int8 stack) and a (K−1, *shape) tensor of differences θ_i − θ_1 (float, or int8 with one scale
per expert and row: they are as small as task vectors). Compared with storing θ0 and K task
vectors this saves one full copy of the model, and θ0 itself is dropped: each stacked parameter
of the model becomes a merge-aware parametrization (:mod:`mergeopt.merging.layer_merge`) whose value is
formed from anchor and differences when its module runs, so no merged copy of the model exists.

Other merge methods (TIES, DARE, a scale λ ≠ 1) are θ0 + λ Σ_i w_i τ'_i with τ' = prepare(τ) built
from the task vectors alone (see :mod:`mergeopt.merging.methods`). For them the stack reads θ0 from the
model, prepares τ' once per parameter and stores anchor θ0 + λ τ'_1 and differences λ (τ'_i − τ'_1):
the same anchor form, so the same kernel serves every method. M³ mixup only reweights w, so the
stack keeps its draw λ and each merged parameter applies it.

Parameters the recipe excludes (regexes over names) stay at θ0. Parameters whose merge does not
depend on w (equal in every expert, or equal after prepare) are not stacked: the model keeps that
common value (θ0 when no expert changed it).

The stack is built by :func:`mergeopt.merging.stacking.build_stack` (dense experts) and
:func:`mergeopt.merging.mixed_experts.build_expert_stack` (dense experts and LoRA adapters together).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeopt.config import MergeSection
from mergeopt.merging.int8_rows import dequantize_rows
from mergeopt.merging.layer_merge import (
    materialized,
    merge_value,
    mix_buffer_names,
    write_mixture,
)
from mergeopt.merging.lowrank import LowRankStack
from mergeopt.merging.methods import MergeFn, get_method, merge_linear, mixup

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int8": torch.int8,
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """``model.compute_dtype``: 'auto' is bfloat16 on a GPU that has it, float32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def eval_dtype_for(name: str) -> torch.dtype:
    """``model.eval_dtype``: 'auto' is float32 on every device (see :mod:`mergeopt.merging.eval_dtype`)."""
    return torch.float32 if name == "auto" else DTYPES[name]


def anchor_dtype_for(stack_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The anchor is stored in the stack's dtype; an int8 stack keeps it in the compute dtype (an
    anchor is a whole weight, not a small difference: int8 would move the proxy itself)."""
    return compute_dtype if stack_dtype == torch.int8 else stack_dtype


@dataclass
class TaskVectorStack:
    expert_names: list[str]
    anchor: dict[str, torch.Tensor]  # θ_1 (θ0 + λ τ'_1) per merged parameter, in the anchor dtype
    deltas: dict[str, torch.Tensor]  # (K−1, *shape): θ_i − θ_1 (λ (τ'_i − τ'_1)), storage dtype
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # int8 stacks: (K−1, rows) float32
    excluded: list[str] = field(default_factory=list)  # kept at θ0 by the recipe
    unchanged: list[str] = field(default_factory=list)  # merge equals θ0 at every w
    shared: list[str] = field(default_factory=list)  # merge is one value ≠ θ0 at every w
    mixup: torch.Tensor | None = None  # M³ draw λ (K,): the method gets c(w) = w⊙λ / Σ w⊙λ
    lowrank: LowRankStack | None = None  # LoRA experts kept as factors (linear merges)
    # the merge as mixture.json records it (see :func:`describe`)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "linear", "scale": 1.0})
    model: torch.nn.Module | None = None  # the model whose stacked parameters read the merge
    compute_dtype: torch.dtype = torch.float32  # the dtype merged weights are formed in
    eval_dtype: torch.dtype | None = None  # loss evaluations' dtype (None: the compute dtype)
    shard: tuple[int, int] | None = None  # (rank, world size) when each rank keeps 1/N of every matrix

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def num_stacked_parameters(self) -> int:
        return sum(t.numel() for t in self.anchor.values())

    def nbytes(self) -> int:
        tensors = [*self.anchor.values(), *self.deltas.values(), *self.scales.values()]
        dense = sum(t.numel() * t.element_size() for t in tensors)
        return dense + (self.lowrank.nbytes() if self.lowrank is not None else 0)

    def layout(self) -> dict[str, int]:
        """How many tensors went where, independent of dtype and of how many ranks share them:
        mixture.json's record of what a fit stacked, which a later merge compares with its own."""
        lowrank = self.lowrank
        return {
            "tensors": len(self.deltas),
            "excluded": len(self.excluded),
            "unchanged": len(self.unchanged),
            "shared": len(self.shared),
            "lowrank_modules": len(lowrank.modules) if lowrank is not None else 0,
            # LoRA of whole parameters (a mixture of experts' fused expert weights) kept low-rank
            "lowrank_parameters": len(lowrank.parameters) if lowrank is not None else 0,
        }

    def record(self, stack_dtype: str) -> dict:
        """mixture.json's ``stack``: what was stacked, how much of it, in which dtypes. Every command
        that writes a mixture.json (fit, calibrate's pick and proposals) records it, so
        ``mergeopt merge`` can tell a recipe whose experts stack otherwise."""
        layout = self.layout()
        return {
            "tensors": layout.pop("tensors"),
            "parameters": self.num_stacked_parameters(),
            "bytes": self.nbytes(),
            **layout,
            "dtypes": {  # storage, fit steps, loss evaluations (mergeopt.merging.eval_dtype)
                "stack": stack_dtype,
                "compute": str(self.compute_dtype).removeprefix("torch."),
                "evaluation": str(self.eval_dtype or self.compute_dtype).removeprefix("torch."),
            },
        }

    def coefficients(self, weights: torch.Tensor) -> torch.Tensor:
        """w as the merge uses it: reweighted by the mixup draw when there is one."""
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        return mixup.coefficients(weights, self.mixup) if self.mixup is not None else weights

    def _factors(self, name: str):
        """LoRA experts' factors of stacked parameter ``name`` beside the dense experts, or None."""
        return None if self.lowrank is None else self.lowrank.parameters.get(name)

    def merged_tensor(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """One stacked parameter at w (not differentiable): θ_1 + Σ_{i≥2} c_i δ_i, in float32 (with
        the LoRA experts' update of a whole parameter, where they have one)."""
        weights = self.coefficients(weights)
        anchor = self.anchor[name]
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        factors = self._factors(name)
        c = None if factors is None else factors.coefficients(weights, self.lowrank.scale)
        return merge_value(weights[1:], anchor, self.deltas[name], self.scales.get(name), dtype, factors, c)

    def merged(self, weights: torch.Tensor, method: MergeFn = merge_linear) -> dict[str, torch.Tensor]:
        """The whole model's merged tensors at w, for ``torch.func.functional_call``: the reference
        path the per-layer merge is tested against (a merged copy of every stacked parameter).

        ``weights`` must lie on the simplex (the anchor form relies on Σ w = 1). Keys are the
        parameters' own names, which override their parametrizations in functional_call; the
        LoRA experts' share enters through their mixture buffers.
        """
        weights = self.coefficients(weights)
        rest = weights[1:]
        on_device = {rest.device: rest}  # a model spread over GPUs: one differentiable copy per device

        def rest_on(device: torch.device) -> torch.Tensor:
            if device not in on_device:
                on_device[device] = rest.to(device)
            return on_device[device]

        merged = {}
        for name, delta in self.deltas.items():
            scales = self.scales.get(name)
            if scales is not None:
                delta = dequantize_rows(delta, scales)
            anchor = self.anchor[name]
            value = method(
                anchor.to(torch.promote_types(anchor.dtype, torch.float32)), delta, rest_on(delta.device)
            )
            factors = self._factors(name)
            if factors is not None:  # LoRA experts of this whole parameter beside the dense ones
                c = factors.coefficients(weights.to(factors.scaling.device), self.lowrank.scale)
                value = value + factors.delta(c).to(value)
            merged[name] = value.to(self.compute_dtype)
        if self.lowrank is not None:  # the LoRA experts' share, added in the forward pass
            merged.update(self.lowrank.params(weights))
        return merged

    def mix_params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{mixture buffer name: w} for functional_call: the per-layer merge (and LoRA experts)
        read w from these buffers, so autograd reaches w through every merged module."""
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        coefficients = self.coefficients(weights)
        return {name: coefficients for name in mix_buffer_names(self.model)}

    @contextmanager
    def at(self, weights: torch.Tensor) -> Iterator[torch.nn.Module]:
        """The model as the merge at w for plain ``model(...)`` calls (generation, metrics, lm-eval):
        the mixture written into its buffers and each merged weight formed once for the block
        (a merged copy of the stacked parameters while it lasts). A sharded stack forms (gathers)
        each weight at every read instead: its ranks cannot hold a merged copy of the model.

        "The model at w" exists only inside this block: on leaving it the mixture buffers are set
        to NaN, so code that calls the model afterwards gets NaN, not whatever was merged last."""
        self.write_mixture(weights)
        try:
            if self.shard is not None:
                yield self.model
            else:
                with materialized():
                    yield self.model
        finally:
            self.forget_mixture()

    def forget_mixture(self) -> None:
        """No mixture: NaN in every mixture buffer, until the next :meth:`at` or :meth:`write_mixture`."""
        write_mixture(self.model, torch.full((self.num_experts,), math.nan))

    def write_mixture(self, weights: torch.Tensor) -> None:
        """Set the model's mixture buffers to w for plain ``model(...)`` calls (metrics, lm-eval)."""
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        write_mixture(self.model, self.coefficients(weights.double()).float())


def describe(merge: MergeSection, num_experts: int, seed: int) -> dict[str, Any]:
    """The merge as mixture.json records it: method, its options, and the seed and draw if random."""
    method = get_method(merge.method)
    info: dict[str, Any] = {"name": method.name, "scale": merge.scale, **method.options(merge)}
    if merge.mixup_alpha is not None:
        info["mixup_alpha"] = merge.mixup_alpha
        info["mixup_lambda"] = mixup.draw(merge.mixup_alpha, num_experts, seed).tolist()
    if method.random or merge.mixup_alpha is not None:
        info["seed"] = seed
    return info
