"""Dense experts and LoRA adapters in one stack (:func:`build_expert_stack`), in the recipe's order.

With a linear merge a LoRA expert stays low-rank: the dense stack sees it as θ0 but for what its
adapter sets densely, and its factors go to :mod:`mergeopt.merging.lowrank` (its DoRA layers too,
where :mod:`mergeopt.merging.dora` can keep them low-rank). TIES and DARE need
task vectors, so there an adapter is densified parameter by parameter. ``mergeopt diagnose``
stacks the base itself as one more expert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mergeopt.config import MergeSection
from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import Checkpoint
from mergeopt.loading.lora_updates import LoraAdapter
from mergeopt.loading.sharded_load import BaseSource
from mergeopt.merging.dora import split_dora
from mergeopt.merging.layer_merge import (
    parameter_device,
)
from mergeopt.merging.lowrank import build_lowrank_stack
from mergeopt.merging.lowrank_parameters import (
    attach_parameters,
    build_parameter_factors,
    split_parameter_lora,
)
from mergeopt.merging.sameness import check_lowrank_adapters, nothing_to_merge
from mergeopt.merging.sharded_merge import shard_parameter_factors, shard_parameter_lora
from mergeopt.merging.stack import TaskVectorStack, anchor_dtype_for, describe
from mergeopt.merging.stacking import build_stack, excluded


class _BaseView(Mapping):
    """A LoRA expert's dense weights on the low-rank path: θ0 everywhere (its update is low-rank).

    Values are copies: the model's parameters become merge buffers and are overwritten later. A
    parameter still on the meta device (a sharded load) is read from ``base`` onto ``device``.
    """

    def __init__(
        self, model: torch.nn.Module, base: BaseSource | None = None, device: torch.device | None = None
    ):
        self._params = dict(model.named_parameters())
        self._base, self._device = base, device

    def __getitem__(self, name: str) -> torch.Tensor:
        param = self._params[name]
        if param.is_meta:
            return self._base.whole(name, param, self._device)
        return param.detach().clone()

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


class _DenseAdapterView(_BaseView):
    """A LoRA expert as dense weights θ0 + s·B·A (and its dense updates: DoRA, embeddings, copies),
    formed one parameter at a time (TIES/DARE need τ)."""

    def __init__(self, model: torch.nn.Module, adapter: LoraAdapter, base=None, device=None):
        super().__init__(model, base, device)
        self._adapter = adapter

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._adapter.expert_value(name, super().__getitem__(name))


class _AdapterDenseUpdatesView(_BaseView):
    """A LoRA expert kept low-rank, as the dense stack sees it: θ0, but for the parameters its
    adapter sets densely (:class:`mergeopt.loading.lora_updates.DenseUpdate`). ``changed`` collects the
    parameters where that differs from θ0 (the sameness check's view of them)."""

    def __init__(self, model: torch.nn.Module, adapter: LoraAdapter, base=None, device=None):
        super().__init__(model, base, device)
        self._adapter = adapter
        self.changed: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        theta0 = super().__getitem__(name)
        update = self._adapter.dense.get(name)
        if update is None:
            return theta0
        value = update.value(theta0)
        if not torch.equal(value, theta0):
            self.changed.add(name)
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
    compute_dtype: torch.dtype | None = None,
    shard: tuple[int, int] | None = None,
    base: BaseSource | None = None,
    device: torch.device | None = None,
    base_expert: str | None = None,
) -> TaskVectorStack:
    """The stack for any mix of dense experts and LoRA adapters, in the recipe's expert order.

    With a linear merge LoRA experts stay low-rank: their dense weights are θ0 (so the dense stack
    holds only what dense experts change) and their update λ Σ w_i s_i B_i A_i is added in the
    forward pass by :mod:`mergeopt.merging.lowrank`. TIES and DARE need each expert's task vector, so there
    a LoRA expert is densified parameter by parameter (θ0 + s·B·A), costing what a dense expert costs.

    ``base_expert`` (``mergeopt diagnose``): θ0 itself is stacked as one more expert of that name,
    last, so the merge at its one-hot is the base model and τ_i = δ_i − δ_base is read back from the
    stack. Last, so every other expert's rows, DARE draws and mixup coefficients are the ones the
    stack without it has; its task vector is zero, which TIES's trim, sign election and disjoint
    mean ignore. Its view keeps the model's θ0 tensors alive until the stack is built (one more
    copy of the model while stacking).
    """
    merge = merge or MergeSection()
    recipe_names = list(names)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # before any is stacked
    if base_expert is not None:
        if base_expert in names:
            raise UserError(f"expert name {base_expert!r} is reserved for the base model: rename the expert")
        names = [*names, base_expert]
        dense = {**dense, base_expert: _BaseView(model, base, device)}
    lowrank_path = bool(adapters) and merge.method == "linear"
    if adapters and not lowrank_path:
        log(f"merge.method {merge.method} needs dense task vectors: LoRA experts are densified per parameter")
    low = _LowRank(adapters)
    if lowrank_path:
        low = _LowRank.split(model, adapters, bool(dense), exclude, shard, base, device, base_expert, log)
    views = _expert_views(model, names, dense, adapters, low, lowrank_path, base, device)
    stack = build_stack(
        model,
        views,
        exclude,
        dtype,
        progress,
        merge,
        seed,
        allow_empty=lowrank_path,
        compute_dtype=compute_dtype,
        shard=shard,
        base=base,
        device=device,
        # their dense view is θ0 itself; a low-rank adapter is compared by its factors, below
        not_compared=[*(adapters if lowrank_path else ()), *([base_expert] if base_expert else ())],
    )
    if base_expert is not None:
        _describe_without_base(stack, merge, len(recipe_names), seed)
    if lowrank_path:
        # the dense stack did not compare them (their view is θ0 but for their dense updates); the
        # adapters as read are compared, DoRA updates included
        changed = {
            n: bool(views[n].changed)
            or low.dora_changed.get(n, False)
            or _changes_any(adapters[n], low.parameter_targets)
            for n in adapters
        }
        low.attach(model, stack, list(names), adapters, changed, exclude, dtype, merge.scale, shapes)
        if low.parameter_targets:
            _merge_parameter_factors(model, stack, merge.scale, shard, _BaseView(model, base, device))
        if not stack.deltas and not stack.lowrank.modules and not stack.lowrank.parameters:
            raise nothing_to_merge(list(names), bool(stack.shared))
    return stack


def _expert_views(
    model: torch.nn.Module,
    names: Sequence[str],
    dense: Mapping[str, Checkpoint | Mapping[str, torch.Tensor]],
    adapters: Mapping[str, LoraAdapter],
    low: _LowRank,
    lowrank_path: bool,
    base: BaseSource | None,
    device: torch.device | None,
) -> dict[str, Mapping[str, torch.Tensor]]:
    """Each expert's weights as the dense stack reads them, in ``names``' order: a dense expert's
    own; a LoRA expert's dense updates over θ0 on the low-rank path, else θ0 + s·B·A."""
    views = {}
    for name in names:
        if name in dense:
            views[name] = dense[name]
        elif lowrank_path:
            views[name] = _AdapterDenseUpdatesView(model, low.adapters[name], base, device)
        else:
            views[name] = _DenseAdapterView(model, adapters[name], base, device)
    return views


def _describe_without_base(stack: TaskVectorStack, merge: MergeSection, num_experts: int, seed: int) -> None:
    """The recipe's merge as its experts alone describe and draw it (``mergeopt diagnose`` stacked
    the base as one more expert): c(w) is unchanged while the base's weight is 0, c(e_base) = e_base."""
    stack.method = describe(merge, num_experts, seed)
    if stack.mixup is not None:
        stack.mixup = torch.tensor([*stack.method["mixup_lambda"], 1.0], dtype=torch.float64)


@dataclass
class _LowRank:
    """What of the LoRA experts stays low-rank on the linear path: the adapters the dense stack and
    the low-rank stack read (``adapters``: DoRA layers that can stay low-rank and adapted parameters
    taken out), DoRA's row gains by expert, which experts' DoRA layers differ from θ0, and the
    parameters the adapters adapt whole (``target_parameters``), merged from their factors."""

    adapters: Mapping[str, LoraAdapter]
    gains: dict = field(default_factory=dict)
    dora_changed: dict[str, bool] = field(default_factory=dict)
    parameter_targets: list[str] = field(default_factory=list)

    @classmethod
    def split(
        cls,
        model: torch.nn.Module,
        adapters: Mapping[str, LoraAdapter],
        any_dense: bool,
        exclude: Sequence[str],
        shard: tuple[int, int] | None,
        base: BaseSource | None,
        device: torch.device | None,
        base_expert: str | None,
        log,
    ) -> _LowRank:
        low = cls(adapters)
        # DoRA updates of linear layers stay low-rank where the layer's merged weight is θ0 itself
        if not any_dense:
            low.adapters, low.gains, low.dora_changed = split_dora(
                model, adapters, exclude, shard, base, device
            )
            if low.gains:
                kept_low = sorted({t for g in low.gains.values() for t in g})
                log(
                    f"DoRA: {len(kept_low)} layer(s) of the LoRA experts stay low-rank (factors and row gains)"
                )
        if base_expert is None:  # (diagnose reads task vectors from dense rows)
            low.adapters, low.parameter_targets = split_parameter_lora(low.adapters, exclude)
            if low.parameter_targets:
                log(
                    f"{len(low.parameter_targets)} parameter(s) the LoRA experts adapt whole (target_parameters: "
                    "fused expert weights, routers) stay low-rank, merged as their layer reads them"
                )
        return low

    def attach(
        self,
        model: torch.nn.Module,
        stack: TaskVectorStack,
        names: list[str],
        adapters: Mapping[str, LoraAdapter],
        changed: Mapping[str, bool],
        exclude: Sequence[str],
        dtype: torch.dtype,
        scale: float,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        """Check the adapters differ (``changed``: by their dense updates), then hand the factors
        outside ``exclude`` to the stack: modules merged in the forward pass
        (:mod:`mergeopt.merging.lowrank`), parameters merged as their layer reads them."""
        patterns = [re.compile(p) for p in exclude]

        def kept(a: LoraAdapter) -> LoraAdapter:
            return LoraAdapter(
                a.path,
                a.config,
                {t: f for t, f in a.factors.items() if not excluded(t, patterns)},
                {t: u for t, u in a.dense.items() if not excluded(t, patterns)},
            )

        as_read = {n: kept(a) for n, a in adapters.items()}  # the adapters as read, less exclusions
        check_lowrank_adapters(as_read, changed)
        factors_dtype = anchor_dtype_for(dtype, stack.compute_dtype)  # int8 is for dense differences only
        stack.lowrank = build_lowrank_stack(
            names,
            {n: kept(a) for n, a in self.adapters.items()},
            lambda t: parameter_device(model, t),
            factors_dtype,
            scale,
            self.gains,
        )
        stack.lowrank.attach(model)
        if self.parameter_targets:
            stack.lowrank.parameters = build_parameter_factors(
                names,
                as_read,
                self.parameter_targets,
                {t: shapes[t] for t in self.parameter_targets},
                lambda t: parameter_device(model, t),
                factors_dtype,
            )


def _changes_any(adapter: LoraAdapter, targets: Sequence[str]) -> bool:
    """Whether the adapter's LoRA of any of these parameters is nonzero (the stacking pass no longer
    sees them: they stay low-rank)."""
    return any(
        (f := adapter.dense[t].delta).scaling != 0 and bool(f.a.any()) and bool(f.b.any())
        for t in targets
        if t in adapter.dense
    )


def _merge_parameter_factors(model, stack: TaskVectorStack, scale: float, shard, theta0: Mapping) -> None:
    """Make each whole parameter the LoRA experts adapt (``stack.lowrank.parameters``) read their
    update: added to the dense experts' merge where they differ there (the per-layer merge's own
    parametrization carries the factors; sharded, this rank's block of them), else merged from θ0
    and the factors alone (:mod:`mergeopt.merging.lowrank_parameters`)."""
    lowrank = stack.lowrank
    alone = {}
    for name, factors in list(lowrank.parameters.items()):
        if name not in stack.deltas:  # every dense view is θ0 here: unchanged, or θ0's block
            alone[name] = factors
            continue
        if shard is not None:
            factors = lowrank.parameters[name] = shard_parameter_factors(factors, *shard)
        module_name, _, attr = name.rpartition(".")
        merge = model.get_submodule(module_name).parametrizations[attr][0]
        merge.factors, merge.scale = factors, scale
    if shard is None:
        attach_parameters(
            model,
            alone,
            scale,
            len(stack.expert_names),
            stack.compute_dtype,
            lambda t: theta0[t] if model.get_parameter(t).is_meta else model.get_parameter(t).detach(),
        )
    else:  # the sharded stacking kept θ0's block of each
        shard_parameter_lora(model, lowrank, stack.compute_dtype, names=alone)
    # the dense view saw θ0 in every expert there; they are merged from the factors
    stack.unchanged = [n for n in stack.unchanged if n not in lowrank.parameters]
