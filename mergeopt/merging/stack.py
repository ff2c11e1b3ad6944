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
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mergeopt.config import MergeSection
from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import Checkpoint
from mergeopt.loading.lora import LoraAdapter
from mergeopt.loading.sharded_load import BaseSource, fill
from mergeopt.merging.layer_merge import (
    MergedParameter,
    attach,
    dequantize_rows,
    materialized,
    merge_value,
    mix_buffer_names,
    parameter_device,
    quantize_rows,
    write_mixture,
)
from mergeopt.merging.lowrank import LowRankStack, build_lowrank_stack
from mergeopt.merging.methods import MergeFn, MergeMethod, get_method, merge_linear, mixup
from mergeopt.merging.methods.dare import parameter_generator
from mergeopt.merging.sameness import Sameness, check_lowrank_adapters
from mergeopt.merging.sharded_merge import ShardedMergedParameter, block_range, keep_block, padded
from mergeopt.runtime.resume import check_interrupt_alone

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

    def coefficients(self, weights: torch.Tensor) -> torch.Tensor:
        """w as the merge uses it: reweighted by the mixup draw when there is one."""
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        return mixup.coefficients(weights, self.mixup) if self.mixup is not None else weights

    def merged_tensor(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """One stacked parameter at w (not differentiable): θ_1 + Σ_{i≥2} c_i δ_i, in float32."""
        rest = self.coefficients(weights)[1:]
        anchor = self.anchor[name]
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        return merge_value(rest, anchor, self.deltas[name], self.scales.get(name), dtype)

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


def _read(
    expert: Checkpoint | Mapping[str, torch.Tensor],
    expert_name: str,
    name: str,
    like: torch.Tensor,
    rows: tuple[int, int, torch.Size] | None = None,
) -> torch.Tensor:
    """One expert tensor, checked against the base's shape, on ``like``'s device and dtype.

    ``rows`` (start, stop, the base's whole shape): only rows [start, stop) of it, and from a
    checkpoint only those bytes are read (a sharded stack's block).
    """
    whole = like.shape if rows is None else rows[2]
    if isinstance(expert, Checkpoint):
        if name not in expert.tensors:
            raise UserError(
                f"parameter {name} of the base model is not in expert {expert_name!r} ({expert.path})"
            )
        shape = torch.Size(expert.tensors[name].shape)
        if shape == whole:
            value = expert.read(name) if rows is None else expert.read_rows(name, rows[0], rows[1])
        else:
            value = torch.empty(shape, device="meta")
    elif name not in expert:
        raise UserError(f"parameter {name} of the base model is not in expert {expert_name!r}")
    else:
        value = expert[name]
        shape = value.shape
        if rows is not None and shape == whole:
            value = value[rows[0] : rows[1]]
    if shape != whole:
        raise UserError(
            f"tensor {name} has shape {list(whole)} in the base but {list(shape)} in expert {expert_name!r}"
        )
    value = value.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(value).all():
        raise UserError(f"tensor {name} of expert {expert_name!r} contains NaN or Inf")
    return value


def _excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def _differences(
    base: torch.Tensor, experts: Mapping, name: str, dtype: torch.dtype, block=None, sameness=None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Linear merge at scale 1: anchor θ_1 and rows θ_i − θ_1, without θ0 (``block``: rows of a
    sharded stack, see :func:`_read`); ``sameness`` sees each value and the rows."""
    anchor = None
    # differences written row by row into one preallocated tensor: no K-long list of temporaries
    rows = torch.empty((len(experts) - 1, *base.shape), dtype=dtype, device=base.device)
    differ = False
    for k, (ename, expert) in enumerate(experts.items()):
        value = _read(expert, ename, name, base, block)
        if sameness is not None and sameness.base_candidate(k):
            sameness.see_value(k, value, base)
        if anchor is None:
            anchor = value
            continue
        difference = value - anchor  # not in place: ``value`` may be the caller's own tensor
        differ = differ or bool(difference.any())
        rows[k - 1].copy_(difference)
        del value, difference
    if sameness is not None:
        sameness.see_differences(rows)
    return anchor, rows, differ


def _prepared(
    base: torch.Tensor,
    experts: Mapping,
    name: str,
    dtype: torch.dtype,
    method: MergeMethod,
    options: dict[str, Any],
    scale: float,
    sameness=None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Any other method: τ' = prepare(θ_i − θ0), anchor θ0 + λ τ'_1 and rows λ (τ'_i − τ'_1);
    ``sameness`` sees the task vectors before they are prepared."""
    tau = torch.empty((len(experts), *base.shape), dtype=base.dtype, device=base.device)
    for k, (ename, expert) in enumerate(experts.items()):
        torch.sub(_read(expert, ename, name, base), base, out=tau[k])
    if sameness is not None:
        sameness.see_task_vectors(tau)
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
    compute_dtype: torch.dtype | None = None,
    shard: tuple[int, int] | None = None,
    base: BaseSource | None = None,
    device: torch.device | None = None,
    not_compared: Sequence[str] = (),
) -> TaskVectorStack:
    """Read each expert tensor lazily, stack anchor and differences on the parameter's device, and
    make the model's parameter read the merge (its θ0 tensor is dropped).

    An expert equal to the base, or two equal experts, are refused once every tensor is read
    (:mod:`mergeopt.merging.sameness`; ``not_compared``: experts left out of that check).

    ``shard`` (rank, world size): every matrix is kept as this rank's block of rows
    (:mod:`mergeopt.merging.sharded_merge`), stacked or not; vectors stay whole. With a linear merge at
    scale 1 each block is read alone from each expert; other methods prepare one whole tensor at a
    time and keep its block. Every rank must call this together, since whether a parameter differs
    at all is agreed across the ranks. ``base`` gives θ0 of the parameters that are still on the
    meta device (:mod:`mergeopt.loading.sharded_load`: no rank loads the base whole), made on ``device``.

    An expert is a :class:`Checkpoint` (read tensor by tensor from safetensors) or an in-memory
    state dict (tests, benchmarks, notebooks). ``model`` holds θ0 (it was loaded from the base
    checkpoint); it is frozen here, so only the mixture logits ever require grad. ``dtype`` stores
    the differences (``torch.int8``: quantised per row); ``compute_dtype`` (default: the model's
    own) is what merged weights are formed in. ``merge`` (the recipe's merge section; None: linear)
    picks the method; ``seed`` (the recipe's) seeds DARE's masks, per parameter from (seed, name),
    and the mixup draw. One parameter is processed at a time, so the temporaries are K float32
    copies of one tensor, never of the model.
    """
    merge = merge or MergeSection()
    method = get_method(merge.method)
    options = method.options(merge)
    anchor_form = method.name == "linear" and merge.scale == 1.0
    patterns = [re.compile(p) for p in exclude]
    names = list(experts)
    if compute_dtype is None:
        compute_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    anchor_dtype = anchor_dtype_for(dtype, compute_dtype)
    rows_dtype = torch.float32 if dtype == torch.int8 else dtype
    stack = TaskVectorStack(
        expert_names=names, anchor={}, deltas={}, model=model, compute_dtype=compute_dtype
    )
    stack.method = describe(merge, len(names), seed)
    stack.shard = shard
    if merge.mixup_alpha is not None:
        stack.mixup = torch.tensor(stack.method["mixup_lambda"], dtype=torch.float64)
    sameness = Sameness(names, not_compared)
    collective = None  # a sharded stack: where its ranks combine what they found equal
    parameter_names = [n for n, _ in model.named_parameters()]  # names only: θ0 is freed as we go
    for pname in tqdm(parameter_names, desc="stacking experts", unit="tensor", disable=not progress):
        check_interrupt_alone("stacking the experts")  # minutes on a large model: stop within a tensor
        param = model.get_parameter(pname)
        param.requires_grad_(False)
        where = device if param.is_meta else param.device
        blocks = shard is not None and param.dim() >= 2  # this rank keeps a block of its rows
        if _excluded(pname, patterns):
            stack.excluded.append(pname)
            if blocks:
                _keep_theta0_block(stack, model, pname, param, shard, base, where)
            elif param.is_meta:
                fill(model, pname, base.whole(pname, param, where))
            continue
        if blocks and anchor_form:
            collective = where
            _stack_block(
                stack,
                model,
                pname,
                param,
                experts,
                shard,
                dtype,
                rows_dtype,
                anchor_dtype,
                base,
                where,
                sameness,
            )
            continue
        theta0 = base.whole(pname, param, where) if param.is_meta else param.detach()
        theta0 = theta0.to(torch.promote_types(param.dtype, torch.float32))  # θ0, read first
        if anchor_form:
            anchor, rows, differ = _differences(theta0, experts, pname, rows_dtype, sameness=sameness)
        else:
            if method.random:
                options["generator"] = parameter_generator(seed, pname)
            anchor, rows, differ = _prepared(
                theta0, experts, pname, rows_dtype, method, options, merge.scale, sameness
            )
        if blocks:  # prepared whole (TIES, DARE, a scale): every rank the same; keep this rank's rows
            _keep_prepared_block(
                stack, model, pname, param, theta0, anchor, rows, differ, shard, dtype, anchor_dtype
            )
            continue
        if not differ:  # the merge does not depend on w: no need to stack it
            unchanged = torch.equal(anchor, theta0)
            (stack.unchanged if unchanged else stack.shared).append(pname)
            if param.is_meta:  # a sharded load: the vector is made here, whole
                fill(model, pname, anchor.to(param.dtype))
            elif not unchanged:
                param.data.copy_(anchor)
            continue
        del param, theta0
        anchor, rows, scales = _store(stack, pname, anchor, rows, dtype, anchor_dtype)
        merge_module = MergedParameter(pname, rows, scales, len(names), compute_dtype)
        attach(model, pname, anchor, merge_module)
    if not stack.deltas and not allow_empty:
        raise UserError(
            "the experts do not differ in any merged parameter (after exclusions): nothing to merge"
        )
    sameness.check(collective)
    return stack


def _store(stack: TaskVectorStack, pname: str, anchor, rows, dtype, anchor_dtype):
    """Record one parameter's anchor (in its storage dtype) and differences (int8: quantised per
    row) in the stack; returns them as stored, with the scales (None unless int8)."""
    scales = None
    if dtype == torch.int8:
        rows, scales = quantize_rows(rows)
        stack.scales[pname] = scales
    stack.anchor[pname] = anchor = anchor.to(anchor_dtype)
    stack.deltas[pname] = rows
    return anchor, rows, scales


def _stack_block(
    stack: TaskVectorStack,
    model: torch.nn.Module,
    pname: str,
    param: torch.nn.Parameter,
    experts: Mapping,
    shard: tuple[int, int],
    dtype: torch.dtype,
    rows_dtype: torch.dtype,
    anchor_dtype: torch.dtype,
    base: BaseSource | None,
    device: torch.device,
    sameness: Sameness | None = None,
) -> None:
    """One matrix of a sharded stack (linear merge at scale 1): this rank's block of ⌈R/N⌉ rows
    (zero-padded), θ0's and each expert's read alone."""
    total = param.shape[0]
    start, stop, per = block_range(total, *shard)
    theta0 = base.rows(pname, start, stop, param, device) if param.is_meta else param.detach()[start:stop]
    theta0 = theta0.to(torch.promote_types(param.dtype, torch.float32))
    anchor, rows, differ = _differences(
        theta0, experts, pname, rows_dtype, (start, stop, param.shape), sameness
    )
    flags = torch.tensor([float(differ), float(not torch.equal(anchor, theta0))], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the ranks agree on what this parameter is
    if not flags[0]:  # every expert equal here: not stacked, θ0 or the one shared value
        (stack.shared if flags[1] else stack.unchanged).append(pname)
        keep_block(model, pname, padded(anchor.to(param.dtype), per), param.shape, stack.compute_dtype)
        return
    del theta0
    anchor, rows = padded(anchor, per), padded(rows, per, dim=1)
    block, rows, scales = _store(stack, pname, anchor, rows, dtype, anchor_dtype)
    merge = ShardedMergedParameter(
        pname, rows, scales, len(stack.expert_names), stack.compute_dtype, param.shape
    )
    del param  # the caller's reference to θ0 is the last; attach drops the model's
    attach(model, pname, block, merge)


def _keep_prepared_block(
    stack, model, pname, param, theta0, anchor, rows, differ, shard, dtype, anchor_dtype
):
    """A matrix merged by another method (prepared whole, the same on every rank): this rank's
    block of the anchor and of the differences, or of the unmerged value."""
    start, stop, per = block_range(param.shape[0], *shard)
    if not differ:
        (stack.unchanged if torch.equal(anchor, theta0) else stack.shared).append(pname)
        keep_block(
            model,
            pname,
            padded(anchor[start:stop].to(param.dtype), per).clone(),
            param.shape,
            stack.compute_dtype,
        )
        return
    anchor = padded(anchor[start:stop], per).clone()
    rows = padded(rows[:, start:stop], per, dim=1).clone()
    block, rows, scales = _store(stack, pname, anchor, rows, dtype, anchor_dtype)
    merge = ShardedMergedParameter(
        pname, rows, scales, len(stack.expert_names), stack.compute_dtype, param.shape
    )
    attach(model, pname, block, merge)


def _keep_theta0_block(stack, model, pname, param, shard, base, device) -> None:
    """An excluded matrix under sharding: this rank's block of θ0's rows, gathered when read."""
    start, stop, per = block_range(param.shape[0], *shard)
    theta0 = base.rows(pname, start, stop, param, device) if param.is_meta else param.detach()[start:stop]
    keep_block(model, pname, padded(theta0.to(param.dtype), per).clone(), param.shape, stack.compute_dtype)


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
    adapter sets densely (:class:`mergeopt.loading.lora.DenseUpdate`). ``changed`` collects the
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
    if base_expert is not None:
        if base_expert in names:
            raise UserError(f"expert name {base_expert!r} is reserved for the base model: rename the expert")
        names = [*names, base_expert]
        dense = {**dense, base_expert: _BaseView(model, base, device)}
    lowrank_path = bool(adapters) and merge.method == "linear"
    if adapters and not lowrank_path:
        log(f"merge.method {merge.method} needs dense task vectors: LoRA experts are densified per parameter")
    views = {}
    for name in names:
        if name in dense:
            views[name] = dense[name]
        elif lowrank_path:
            views[name] = _AdapterDenseUpdatesView(model, adapters[name], base, device)
        else:
            views[name] = _DenseAdapterView(model, adapters[name], base, device)
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
    if base_expert is not None:  # the recipe's merge, as its experts alone describe and draw it
        stack.method = describe(merge, len(recipe_names), seed)
        if stack.mixup is not None:  # c(w) unchanged while the base's weight is 0; c(e_base) = e_base
            stack.mixup = torch.tensor([*stack.method["mixup_lambda"], 1.0], dtype=torch.float64)
    if lowrank_path:
        patterns = [re.compile(p) for p in exclude]
        kept = {
            n: LoraAdapter(
                a.path,
                a.config,
                {t: f for t, f in a.factors.items() if not _excluded(t, patterns)},
                {t: u for t, u in a.dense.items() if not _excluded(t, patterns)},
            )
            for n, a in adapters.items()
        }
        # the dense stack did not compare them (their view is θ0 but for their dense updates)
        check_lowrank_adapters(kept, {n: bool(views[n].changed) for n in adapters})
        factors_dtype = anchor_dtype_for(dtype, stack.compute_dtype)  # int8 is for dense differences only
        stack.lowrank = build_lowrank_stack(
            list(names), kept, lambda t: parameter_device(model, t), factors_dtype, merge.scale
        )
        stack.lowrank.attach(model)
        if not stack.deltas and not stack.lowrank.modules:
            raise UserError(
                "the experts do not differ in any merged parameter (after exclusions): nothing to merge"
            )
    return stack
