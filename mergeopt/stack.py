"""The expert stack: every expert's weights for each merged parameter, laid out for the linear merge.

The proxy is θ(w) = θ0 + Σ_i w_i τ_i with τ_i = θ_i − θ0 and w on the simplex. Because Σ_i w_i = 1,
this equals θ_1 + Σ_{i≥2} w_i (θ_i − θ_1): on the simplex θ0 drops out. So the stack holds, per
merged parameter, an *anchor* θ_1 (in the compute dtype, float32) and a (K−1, *shape) tensor of
differences θ_i − θ_1 (in the storage dtype; they are as small as task vectors, so bfloat16 keeps
them well). Compared with storing θ0 and K task vectors this saves one full copy of the model, and
the model's own parameter tensors, no longer needed for θ0, become the buffers the merge is written
into. Merging is one ``addmv`` per parameter and its gradient to w one ``mv``.

Other merge methods (TIES, DARE, a scale λ ≠ 1) are θ0 + λ Σ_i w_i τ'_i with τ' = prepare(τ) built
from the task vectors alone (see :mod:`mergeopt.methods`). For them the stack reads θ0 from the
model, prepares τ' once per parameter and stores anchor θ0 + λ τ'_1 and differences λ (τ'_i − τ'_1):
the same anchor form, so the same kernel and buffers serve every method. M³ mixup only reweights
w, so the stack keeps its draw λ and applies it in :meth:`TaskVectorStack.merged`.

Parameters the recipe excludes (regexes over names) stay at θ0. Parameters whose merge does not
depend on w (equal in every expert, or equal after prepare) are not stacked: the model keeps that
common value (θ0 when no expert changed it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mergeopt.checkpoints import Checkpoint
from mergeopt.config import MergeSection
from mergeopt.errors import UserError
from mergeopt.lora import LoraAdapter
from mergeopt.lowrank import LowRankStack, build_lowrank_stack
from mergeopt.methods import MergeFn, MergeMethod, get_method, merge_linear, mixup
from mergeopt.methods.dare import parameter_generator

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class TaskVectorStack:
    expert_names: list[str]
    anchor: dict[str, torch.Tensor]  # θ_1 (θ0 + λ τ'_1) per merged parameter, compute dtype
    deltas: dict[str, torch.Tensor]  # (K−1, *shape): θ_i − θ_1 (λ (τ'_i − τ'_1)), storage dtype
    targets: dict[str, torch.Tensor]  # the model's own tensors of the merged parameters
    excluded: list[str] = field(default_factory=list)  # kept at θ0 by the recipe
    unchanged: list[str] = field(default_factory=list)  # merge equals θ0 at every w
    shared: list[str] = field(default_factory=list)  # merge is one value ≠ θ0 at every w
    mixup: torch.Tensor | None = None  # M³ draw λ (K,): the method gets c(w) = w⊙λ / Σ w⊙λ
    lowrank: LowRankStack | None = None  # LoRA experts kept as factors (linear merges)
    # the merge as mixture.json records it (see :func:`describe`)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "linear", "scale": 1.0})

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def num_stacked_parameters(self) -> int:
        return sum(t.numel() for t in self.anchor.values())

    def nbytes(self) -> int:
        tensors = [*self.anchor.values(), *self.deltas.values()]
        dense = sum(t.numel() * t.element_size() for t in tensors)
        return dense + (self.lowrank.nbytes() if self.lowrank is not None else 0)

    def merged(
        self,
        weights: torch.Tensor,
        method: MergeFn = merge_linear,
        out: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merged tensors of the stacked parameters at mixture w, for torch.func.functional_call.

        ``weights`` must lie on the simplex (the anchor form relies on Σ w = 1); with mixup they are
        reweighted by the stack's draw first. With ``out`` (from
        :meth:`allocate_buffers`) the merge is written into those tensors instead of new ones.
        """
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        if self.mixup is not None:
            weights = mixup.coefficients(weights, self.mixup)
        rest = weights[1:]  # w_1 is implied by the anchor: θ(w) = θ_1 + Σ_{i≥2} w_i (θ_i − θ_1)
        on_device = {rest.device: rest}  # a model spread over GPUs: one differentiable copy per device

        def rest_on(device: torch.device) -> torch.Tensor:
            if device not in on_device:
                on_device[device] = rest.to(device)
            return on_device[device]

        if out is None:
            merged = {
                name: method(self.anchor[name], delta, rest_on(delta.device))
                for name, delta in self.deltas.items()
            }
        else:
            merged = {
                name: method(self.anchor[name], delta, rest_on(delta.device), out=out[name])
                for name, delta in self.deltas.items()
            }
        if self.lowrank is not None:  # the LoRA experts' share, added in the forward pass
            merged.update(self.lowrank.params(weights, write_buffers=out is not None))
        return merged

    def allocate_buffers(self) -> dict[str, torch.Tensor]:
        """Tensors to merge into: the model's own parameter storage, whose θ0 the stack does not need.

        Reusing them costs no memory. After a merge into them the model itself holds θ(w) for the
        merged parameters; code that needs the base must reload it.
        """
        return {name: target.detach() for name, target in self.targets.items()}


def _read(
    expert: Checkpoint | Mapping[str, torch.Tensor], expert_name: str, name: str, like: torch.Tensor
) -> torch.Tensor:
    """One expert tensor, checked against the base's shape, on ``like``'s device and dtype."""
    if isinstance(expert, Checkpoint):
        if name not in expert.tensors:
            raise UserError(
                f"parameter {name} of the base model is not in expert {expert_name!r} ({expert.path})"
            )
        value = expert.read(name)
    elif name not in expert:
        raise UserError(f"parameter {name} of the base model is not in expert {expert_name!r}")
    else:
        value = expert[name]
    if value.shape != like.shape:
        raise UserError(
            f"tensor {name} has shape {list(like.shape)} in the base but {list(value.shape)} "
            f"in expert {expert_name!r}"
        )
    value = value.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(value).all():
        raise UserError(f"tensor {name} of expert {expert_name!r} contains NaN or Inf")
    return value


def _excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def _differences(
    base: torch.Tensor, experts: Mapping, name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Linear merge at scale 1: anchor θ_1 and rows θ_i − θ_1, without θ0."""
    anchor = None
    # differences written row by row into one preallocated tensor: no K-long list of temporaries
    rows = torch.empty((len(experts) - 1, *base.shape), dtype=dtype, device=base.device)
    differ = False
    for k, (ename, expert) in enumerate(experts.items()):
        value = _read(expert, ename, name, base)
        if anchor is None:
            anchor = value
            continue
        difference = value - anchor  # not in place: ``value`` may be the caller's own tensor
        differ = differ or bool(difference.any())
        rows[k - 1].copy_(difference)
        del value, difference
    return anchor, rows, differ


def _prepared(
    base: torch.Tensor,
    experts: Mapping,
    name: str,
    dtype: torch.dtype,
    method: MergeMethod,
    options: dict[str, Any],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Any other method: τ' = prepare(θ_i − θ0), anchor θ0 + λ τ'_1 and rows λ (τ'_i − τ'_1)."""
    tau = torch.empty((len(experts), *base.shape), dtype=base.dtype, device=base.device)
    for k, (ename, expert) in enumerate(experts.items()):
        torch.sub(_read(expert, ename, name, base), base, out=tau[k])
    prepared = method.prepare(tau, **options)
    del tau
    anchor = base + scale * prepared[0]
    rows = (prepared[1:] - prepared[0]).mul_(scale)
    return anchor, rows.to(dtype), bool(rows.any())


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


def build_stack(
    model: torch.nn.Module,
    experts: Mapping[str, Checkpoint | Mapping[str, torch.Tensor]],
    exclude: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    merge: MergeSection | None = None,
    seed: int = 0,
    allow_empty: bool = False,
) -> TaskVectorStack:
    """Read each expert tensor lazily and stack anchor and differences on the parameter's device.

    An expert is a :class:`Checkpoint` (read tensor by tensor from safetensors) or an in-memory
    state dict (tests, benchmarks, notebooks). ``model`` holds θ0 (it was loaded from the base
    checkpoint); it is frozen here, so only the mixture logits ever require grad. ``merge`` (the
    recipe's merge section; None: linear) picks the method; ``seed`` (the recipe's) seeds DARE's
    masks, per parameter from (seed, name), and the mixup draw. One parameter is processed at a
    time, so the temporaries are K copies of one tensor, never of the model.
    """
    merge = merge or MergeSection()
    method = get_method(merge.method)
    options = method.options(merge)
    anchor_form = method.name == "linear" and merge.scale == 1.0
    patterns = [re.compile(p) for p in exclude]
    names = list(experts)
    stack = TaskVectorStack(expert_names=names, anchor={}, deltas={}, targets={})
    stack.method = describe(merge, len(names), seed)
    if merge.mixup_alpha is not None:
        stack.mixup = torch.tensor(stack.method["mixup_lambda"], dtype=torch.float64)
    params = list(model.named_parameters())
    for pname, param in tqdm(params, desc="stacking experts", unit="tensor", disable=not progress):
        param.requires_grad_(False)
        if _excluded(pname, patterns):
            stack.excluded.append(pname)
            continue
        base = param.detach().to(torch.promote_types(param.dtype, torch.float32))  # θ0, read first
        if anchor_form:
            anchor, rows, differ = _differences(base, experts, pname, dtype)
        else:
            if method.random:
                options["generator"] = parameter_generator(seed, pname, param.device)
            anchor, rows, differ = _prepared(base, experts, pname, dtype, method, options, merge.scale)
        if not differ:  # the merge does not depend on w: no need to stack it
            if torch.equal(anchor, base):
                stack.unchanged.append(pname)
            else:
                stack.shared.append(pname)
                param.data.copy_(anchor)
            continue
        stack.anchor[pname] = anchor
        stack.deltas[pname] = rows
        stack.targets[pname] = param
    if not stack.deltas and not allow_empty:
        raise UserError(
            "the experts do not differ in any merged parameter (after exclusions): nothing to merge"
        )
    return stack


class _BaseView(Mapping):
    """A LoRA expert's dense weights on the low-rank path: θ0 everywhere (its update is low-rank).

    Values are copies: the model's parameters become merge buffers and are overwritten later.
    """

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._params[name].detach().clone()

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


class _DenseAdapterView(_BaseView):
    """A LoRA expert as dense weights θ0 + s·B·A, formed one parameter at a time (TIES/DARE need τ)."""

    def __init__(self, model: torch.nn.Module, adapter: LoraAdapter):
        super().__init__(model)
        self._adapter = adapter

    def __getitem__(self, name: str) -> torch.Tensor:
        value = super().__getitem__(name)
        factors = self._adapter.factors.get(name)
        if factors is not None:
            value += factors.delta(value.dtype).to(value.device)
        return value


def build_expert_stack(
    model: torch.nn.Module,
    names: Sequence[str],
    dense: Mapping[str, Checkpoint | Mapping[str, torch.Tensor]],
    adapters: Mapping[str, LoraAdapter],
    exclude: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    merge: MergeSection | None = None,
    seed: int = 0,
    log=print,
) -> TaskVectorStack:
    """The stack for any mix of dense experts and LoRA adapters, in the recipe's expert order.

    With a linear merge LoRA experts stay low-rank: their dense weights are θ0 (so the dense stack
    holds only what dense experts change) and their update λ Σ w_i s_i B_i A_i is added in the
    forward pass by :mod:`mergeopt.lowrank`. TIES and DARE need each expert's task vector, so there
    a LoRA expert is densified parameter by parameter (θ0 + s·B·A), costing what a dense expert costs.
    """
    merge = merge or MergeSection()
    lowrank_path = bool(adapters) and merge.method == "linear"
    if adapters and not lowrank_path:
        log(f"merge.method {merge.method} needs dense task vectors: LoRA experts are densified per parameter")
    views = {}
    for name in names:
        if name in dense:
            views[name] = dense[name]
        elif lowrank_path:
            views[name] = _BaseView(model)
        else:
            views[name] = _DenseAdapterView(model, adapters[name])
    stack = build_stack(model, views, exclude, dtype, progress, merge, seed, allow_empty=lowrank_path)
    if lowrank_path:
        patterns = [re.compile(p) for p in exclude]
        kept = {
            n: LoraAdapter(
                a.path, a.config, {t: f for t, f in a.factors.items() if not _excluded(t, patterns)}
            )
            for n, a in adapters.items()
        }
        params = dict(model.named_parameters())
        stack.lowrank = build_lowrank_stack(list(names), kept, lambda t: params[t].device, dtype, merge.scale)
        stack.lowrank.attach(model)
        if not stack.deltas and not stack.lowrank.modules:
            raise UserError(
                "the experts do not differ in any merged parameter (after exclusions): nothing to merge"
            )
    return stack
