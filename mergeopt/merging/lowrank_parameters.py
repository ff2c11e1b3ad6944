"""LoRA updates of whole parameters kept low-rank: a mixture of experts' fused expert weights.

Why: a LoRA of a mixture of experts' experts (PEFT's ``target_parameters``,
:mod:`mergeopt.loading.lora_parameters`) adapts one fused (experts, out, in) parameter per
projection, which is nearly all of the model. Stacked as dense rows, K such adapters cost K dense
copies of the experts: for Qwen3-30B-A3B in bfloat16, about 57 GiB each. Their factors cost a few
hundred MiB. The merge at w of such a parameter is

    W(w) = W0 + λ Σ_j c_j b_j a_j  per expert matrix,   c_j = w_owner(j) s_owner(j),

with a (E, R, in) and b (E, out, R) the experts' factors side by side (R = Σ_i r_i), the layout
of the parameter itself (GPT-OSS's (E, in, out) experts hold the transposes). The experts' kernels
(grouped_mm) read the whole parameter, so unlike a Linear layer's LoRA, which is added to the
layer's output (:mod:`mergeopt.merging.lowrank`), the update cannot be applied to activations: the
merged weight is formed when its module reads it, as the per-layer merge forms a dense stack's
(:mod:`mergeopt.merging.layer_merge`), one layer at a time, its float32 work a chunk of experts.
Its backward contracts ∂L/∂c_j = Σ_e Σ_{o,i} (∂L/∂W_e)[o, i] b_e[o, j] a_e[j, i] chunk by
chunk, so ∂L/∂W lives
only while its layer's backward runs; under :func:`~mergeopt.merging.layer_merge.recompute_merged`
autograd saves a recipe instead of the merged weight, so no merged copy of the experts is kept.

θ0 stays the model's own tensor (the parametrization's ``original``); the factors are held beside
it, on its device, as a Linear layer's LoRA factors are; the mixture arrives through the
``mergeopt_mix`` buffer that
``functional_call`` replaces, as everywhere (:func:`split_parameter_lora` picks the parameters).
Beside dense experts, whose weights differ there, the dense stack's own per-layer merge carries
the factors and adds their update to each chunk of the dense merge before it is rounded
(:func:`mergeopt.merging.layer_merge.merge_value`; on the simplex, Σ_i w_i θ_i with each LoRA
expert's dense view θ0, plus Σ_j c_j b_j a_j). Under ``model.shard: fsdp`` each rank keeps its
block of the experts (θ0's or the dense merge's, and the factors'), merges it and the ranks gather
the merged weight (:class:`mergeopt.merging.sharded_merge.ShardedLowRankMergedParameter`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from mergeopt.loading.lora_updates import DenseUpdate, LoraAdapter, LoraFactors
from mergeopt.merging.layer_merge import CHUNK, MIX_BUFFER, MergeRecipe, owners, tag_source


def is_parameter_lora(update: DenseUpdate) -> bool:
    """A dense update that is s·b@a alone, in the parameter's own layout (``target_parameters``)."""
    return (
        update.parameter
        and update.start is None
        and update.magnitude is None
        and update.rows is None
        and isinstance(update.delta, LoraFactors)
    )


def split_parameter_lora(
    adapters: Mapping[str, LoraAdapter], exclude: Sequence[str] = ()
) -> tuple[dict[str, LoraAdapter], list[str]]:
    """The adapters less the parameter updates kept low-rank, and those parameters: each one that
    every adapter setting it sets by a LoRA of the parameter alone, and that ``exclude`` keeps."""
    patterns = [re.compile(p) for p in exclude]
    updates: dict[str, list[DenseUpdate]] = {}
    for adapter in adapters.values():
        for target, update in adapter.dense.items():
            updates.setdefault(target, []).append(update)
    targets = sorted(
        t
        for t, found in updates.items()
        if all(map(is_parameter_lora, found)) and not any(p.search(t) for p in patterns)
    )
    split = {
        name: LoraAdapter(a.path, a.config, a.factors, {t: u for t, u in a.dense.items() if t not in targets})
        for name, a in adapters.items()
    }
    return split, targets


@dataclass
class ParameterFactors:
    """The experts' factors of one parameter: ΔW(c) = (b ⊙ c) @ a, batched over its experts, with
    c_j = λ w_owner(j) s_owner(j) (:meth:`coefficients`)."""

    a: torch.Tensor  # (E, R, last)
    b: torch.Tensor  # (E, first, R)
    owner: torch.Tensor  # (R,) long: the expert each rank column belongs to
    scaling: torch.Tensor  # (R,) float32: that expert's s_i
    shape: tuple[int, ...]  # the parameter's (2-D: E = 1)

    def coefficients(self, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """c_j = λ w_owner(j) s_owner(j), in w's precision (at least float32)."""
        dtype = torch.promote_types(weights.dtype, torch.float32)
        weights = weights.to(device=self.scaling.device, dtype=dtype)
        return scale * weights[self.owner] * self.scaling.to(dtype)

    def delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The dense update at ``coefficients`` in float32 (checks only)."""
        return ((self.b.float() * coefficients.float()) @ self.a.float()).reshape(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.owner, self.scaling))


def build_parameter_factors(
    expert_names: Sequence[str],
    adapters: Mapping[str, LoraAdapter],
    targets: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    device_of: Callable[[str], torch.device],
    dtype: torch.dtype,
) -> dict[str, ParameterFactors]:
    """Each target's factors over the adapters that set it, side by side along the rank."""
    index = {name: i for i, name in enumerate(expert_names)}
    found = {}
    for target in targets:
        parts = [(index[n], a.dense[target].delta) for n, a in adapters.items() if target in a.dense]
        device = device_of(target)
        a = torch.cat([_batched(f.a) for _, f in parts], dim=1).to(device=device, dtype=dtype)
        b = torch.cat([_batched(f.b) for _, f in parts], dim=2).to(device=device, dtype=dtype)
        owner = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in parts]).to(device)
        scaling = torch.cat([torch.full((f.rank,), f.scaling, dtype=torch.float32) for _, f in parts])
        found[target] = ParameterFactors(a, b, owner, scaling.to(device), tuple(shapes[target]))
    return found


def _batched(t: torch.Tensor) -> torch.Tensor:
    """A 2-D parameter's factor as one expert's."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def _expert_chunks(experts: int, matrix: int, rank: int) -> list[slice]:
    """Expert ranges whose float32 work (each expert's matrix and its factors) stays near CHUNK."""
    step = max(1, CHUNK // max(1, matrix + rank))
    return [slice(s, min(s + step, experts)) for s in range(0, experts, step)]


def merged_value(
    anchor: torch.Tensor, factors: ParameterFactors, coefficients: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """W0 + (b ⊙ c) @ a formed in float32 a chunk of experts at a time, returned in ``dtype``."""
    w0 = anchor.reshape(factors.a.shape[0], -1, factors.a.shape[-1])
    c = coefficients.detach().to(device=anchor.device, dtype=torch.float32)
    result = torch.empty(anchor.shape, dtype=dtype, device=anchor.device)  # not a view: it gets tagged
    out = result.view(w0.shape)
    for s in _expert_chunks(w0.shape[0], w0[0].numel(), factors.a.shape[1] * sum(w0.shape[1:])):
        b, a = factors.b[s].float() * c, factors.a[s].float()
        if dtype == torch.float32 and w0.dtype == torch.float32:  # formed in the result itself
            torch.baddbmm(w0[s], b, a, out=out[s])
        else:  # one float32 block: the update, θ0 added to it as it is read (no upcast copy of θ0)
            out[s].copy_(torch.bmm(b, a).add_(w0[s]))
    return result


def contract(grad: torch.Tensor, factors: ParameterFactors) -> torch.Tensor:
    """∂L/∂c_j = Σ_e Σ_{o,i} G_e[o, i] b_e[o, j] a_e[j, i], in float32, a chunk of experts at a time."""
    g = grad.reshape(factors.a.shape[0], -1, factors.a.shape[-1])
    total = torch.zeros(factors.a.shape[1], dtype=torch.float32, device=grad.device)
    for s in _expert_chunks(g.shape[0], g[0].numel(), factors.a.shape[1] * sum(g.shape[1:])):
        projected = torch.bmm(factors.b[s].float().transpose(1, 2), g[s].float())  # (e, R, last)
        total += (projected * factors.a[s].float()).sum(dim=(0, 2))
    return total


class _ParameterMerge(torch.autograd.Function):
    """W(c) = W0 + (b ⊙ c) @ a for one parameter; the backward returns only ∂L/∂c."""

    @staticmethod
    def forward(ctx, coefficients, anchor, factors, dtype):
        ctx.factors = factors  # held by the stack anyway: no saved-tensor copy
        ctx.coefficient_dtype = coefficients.dtype
        return merged_value(anchor, factors, coefficients, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return contract(grad, ctx.factors).to(ctx.coefficient_dtype), None, None, None


class LowRankMergedParameter(torch.nn.Module):
    """A parametrization ``θ0 -> W(w)`` of one parameter set by LoRA experts' factors alone."""

    forms_merge = True  # its value is the merge at the mixture in its buffer (layer_merge.make_permanent)

    def __init__(self, name: str, factors: ParameterFactors, scale: float, num_experts: int, compute_dtype):
        super().__init__()
        self.name = name
        self.scale = scale
        self.compute_dtype = compute_dtype
        self.factors = factors
        device = factors.scaling.device
        self.register_buffer(
            MIX_BUFFER, torch.zeros(num_experts, dtype=torch.float32, device=device), persistent=False
        )

    def coefficients(self) -> torch.Tensor:
        return self.factors.coefficients(getattr(self, MIX_BUFFER), self.scale)

    def value(self, anchor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """The merged weight at ``coefficients``, without autograd."""
        return merged_value(anchor, self.factors, coefficients, self.compute_dtype)

    def merge(self, anchor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """The merged weight, differentiable in ``coefficients`` (its backward contracts ∂L/∂c)."""
        return _ParameterMerge.apply(coefficients, anchor, self.factors, self.compute_dtype)

    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        c = self.coefficients()
        if not torch.is_grad_enabled() or not c.requires_grad:
            return self.value(anchor, c)
        merged = self.merge(anchor, c)
        tag_source(merged, MergeRecipe(self, anchor, c.detach().clone()))
        return merged


def attach_parameters(
    model: torch.nn.Module,
    factors: Mapping[str, ParameterFactors],
    scale: float,
    num_experts: int,
    compute_dtype: torch.dtype,
    theta0: Callable[[str], torch.Tensor],
) -> None:
    """Make each parameter of ``factors`` read its merge: θ0 (``theta0(name)``, the model's own
    tensor unless it is still on the meta device) stays as the parametrization's ``original``."""
    for name, f in factors.items():
        merge = LowRankMergedParameter(name, f, scale, num_experts, compute_dtype)
        original = torch.nn.Parameter(theta0(name), requires_grad=False)
        for module, attr in owners(model, name):
            module._parameters[attr] = original
            parametrize.register_parametrization(module, attr, merge, unsafe=True)
