"""Building the stack (:func:`build_stack`): each expert read tensor by tensor into anchor and differences.

One parameter is processed at a time, so the temporaries are K float32 copies of one tensor, never
of the model: each expert tensor is read lazily from safetensors (or from an in-memory state dict),
checked against the base, and either stacked (the parameter becomes a merge-aware
parametrization), kept as the one value every expert agrees on, or left at θ0 when the recipe
excludes it. Under ``model.shard: fsdp`` each rank reads and keeps only its block of rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mergeopt.config import MergeSection
from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import Checkpoint
from mergeopt.loading.sharded_load import BaseSource, fill
from mergeopt.merging.differences import linear_differences, prepared_differences
from mergeopt.merging.int8_rows import num_rows, quantize_rows
from mergeopt.merging.layer_merge import MergedParameter, attach
from mergeopt.merging.methods import get_method
from mergeopt.merging.methods.dare import parameter_generator
from mergeopt.merging.sameness import Sameness, nothing_to_merge
from mergeopt.merging.sharded_merge import ShardedMergedParameter, block_range, keep_block, padded
from mergeopt.merging.stack import TaskVectorStack, anchor_dtype_for, describe
from mergeopt.runtime.interrupts import check_interrupt_alone


def excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def check_density(merge: MergeSection, sizes: dict[str, int]) -> None:
    """A TIES or DARE density that keeps less than one entry of even the largest merged tensor
    (TIES keeps int(density · n) of n, DARE each with probability density) trims every task vector
    to nothing: one line naming merge.density, before any expert tensor is read, instead of the sameness
    check blaming the experts once all of them are."""
    if merge.method == "linear" or merge.density >= 1 or not sizes:
        return
    largest = max(sizes, key=sizes.get)
    if merge.density * sizes[largest] < 1:
        raise UserError(
            f"merge.density={merge.density:g} keeps less than one entry of even the largest merged tensor "
            f"({largest}, {sizes[largest]:,} entries): every task vector would be trimmed to nothing; "
            "raise merge.density"
        )


def fused_experts(model: torch.nn.Module, name: str, param: torch.Tensor) -> bool:
    """Whether parameter ``name`` is a mixture of experts' fused (experts, out, in) weight: 3-D, of
    a module transformers runs as fused experts (its experts-implementation attributes,
    ``has_gate`` and ``is_transposed``)."""
    module = model.get_submodule(name.rpartition(".")[0])
    return param.dim() == 3 and hasattr(module, "has_gate") and hasattr(module, "is_transposed")


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
    names = list(experts)
    if compute_dtype is None:
        compute_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    stack = TaskVectorStack(
        expert_names=names, anchor={}, deltas={}, model=model, compute_dtype=compute_dtype
    )
    stack.method = describe(merge, len(names), seed)
    stack.shard = shard
    if merge.mixup_alpha is not None:
        stack.mixup = torch.tensor(stack.method["mixup_lambda"], dtype=torch.float64)
    stacking = _Stacking(
        stack, experts, merge, seed, dtype, shard, base, device, Sameness(names, not_compared)
    )
    patterns = [re.compile(p) for p in exclude]
    check_density(merge, {n: p.numel() for n, p in model.named_parameters() if not excluded(n, patterns)})
    parameter_names = [n for n, _ in model.named_parameters()]  # names only: θ0 is freed as we go
    for pname in tqdm(parameter_names, desc="stacking experts", unit="tensor", disable=not progress):
        check_interrupt_alone("stacking the experts")  # minutes on a large model: stop within a tensor
        stacking.parameter(pname, excluded(pname, patterns))
    if not stack.deltas and not allow_empty:
        raise nothing_to_merge(names, bool(stack.shared))
    stacking.sameness.check(stacking.collective)
    return stack


class _Stacking:
    """One :func:`build_stack` pass: what every parameter is stacked with (the experts, the merge
    method and its options, the storage dtypes, this rank's shard, where θ0 comes from), the
    sameness check that sees every value, and where a sharded stack's ranks combine what they found
    equal (``collective``: set by the first block stacked)."""

    def __init__(
        self,
        stack: TaskVectorStack,
        experts: Mapping,
        merge: MergeSection,
        seed: int,
        dtype: torch.dtype,
        shard: tuple[int, int] | None,
        base: BaseSource | None,
        device: torch.device | None,
        sameness: Sameness,
    ):
        self.stack, self.model, self.experts, self.merge, self.seed = stack, stack.model, experts, merge, seed
        self.method = get_method(merge.method)
        self.options = self.method.options(merge)
        self.anchor_form = self.method.name == "linear" and merge.scale == 1.0  # θ_1 and θ_i − θ_1
        self.dtype = dtype  # the differences as stored (int8: quantised per row, formed in float32)
        self.rows_dtype = torch.float32 if dtype == torch.int8 else dtype
        self.anchor_dtype = anchor_dtype_for(dtype, stack.compute_dtype)
        self.shard, self.base, self.device, self.sameness = shard, base, device, sameness
        self.collective: torch.device | None = None

    def parameter(self, pname: str, is_excluded: bool) -> None:
        """Stack one parameter, keep the one value every expert agrees on, or leave it at θ0."""
        param = self.model.get_parameter(pname)
        param.requires_grad_(False)
        where = self.device if param.is_meta else param.device
        blocks = self.shard is not None and param.dim() >= 2  # this rank keeps a block of its rows
        if is_excluded:
            self.stack.excluded.append(pname)
            if blocks:
                _keep_theta0_block(self, pname, param, where)
            elif param.is_meta:
                fill(self.model, pname, self.base.whole(pname, param, where))
            return
        if blocks and self.anchor_form:
            self.collective = where
            _stack_block(self, pname, param, where)
            return
        if self.anchor_form and in_blocks(param, self.experts):
            _stack_in_blocks(self, pname, param)
            return
        theta0 = self.base.whole(pname, param, where) if param.is_meta else param.detach()
        theta0 = theta0.to(torch.promote_types(param.dtype, torch.float32))  # θ0, read first
        anchor, rows, differ = self._merged_rows(pname, param, theta0)
        if blocks:  # prepared whole (TIES, DARE, a scale): every rank the same; keep this rank's rows
            _keep_prepared_block(self, pname, param, theta0, anchor, rows, differ)
            return
        if not differ:  # the merge does not depend on w: no need to stack it
            unchanged = torch.equal(anchor, theta0)
            (self.stack.unchanged if unchanged else self.stack.shared).append(pname)
            if param.is_meta:  # a sharded load: the vector is made here, whole
                fill(self.model, pname, anchor.to(param.dtype))
            elif not unchanged:
                param.data.copy_(anchor)
            return
        del param, theta0  # the last references to θ0: the stacked rows replace it
        anchor, rows, scales = self.store(pname, anchor, rows)
        merge_module = MergedParameter(
            pname, rows, scales, len(self.stack.expert_names), self.stack.compute_dtype
        )
        attach(self.model, pname, anchor, merge_module)

    def _merged_rows(
        self, pname: str, param: torch.Tensor, theta0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(anchor, differences, whether they differ) of one whole tensor, by the merge method."""
        if self.anchor_form:
            return linear_differences(theta0, self.experts, pname, self.rows_dtype, sameness=self.sameness)
        if self.method.random:
            self.options["generator"] = parameter_generator(self.seed, pname)
        return prepared_differences(
            theta0,
            self.experts,
            pname,
            self.rows_dtype,
            self.method,
            self.options,
            self.merge.scale,
            self.sameness,
            per_expert=fused_experts(self.model, pname, param),
        )

    def store(self, pname: str, anchor: torch.Tensor, rows: torch.Tensor):
        """Record one parameter's anchor (in its storage dtype) and differences (int8: quantised per
        row) in the stack; returns them as stored, with the scales (None unless int8)."""
        scales = None
        if self.dtype == torch.int8:
            rows, scales = quantize_rows(rows)
            self.stack.scales[pname] = scales
        self.stack.anchor[pname] = anchor = anchor.to(self.anchor_dtype)
        self.stack.deltas[pname] = rows
        return anchor, rows, scales


# a matrix of more elements than this (a mixture of experts' fused weight, an untied vocabulary)
# is stacked in blocks of rows of at most about this many elements, its float32 temporaries with them
STACK_BLOCK = 1 << 26


def in_blocks(param: torch.Tensor, experts: Mapping) -> bool:
    """Whether ``param`` is stacked in blocks of rows (linear merge at scale 1, one process): a
    matrix of more than :data:`STACK_BLOCK` elements whose experts can hand over rows (checkpoints,
    read by rows, or tensors in memory; a ``random://`` expert makes its tensor whole each time)."""
    return (
        param.dim() >= 2
        and param.numel() > STACK_BLOCK
        and all(isinstance(e, (Checkpoint, dict)) for e in experts.values())
    )


def _stack_in_blocks(s: _Stacking, pname: str, param: torch.nn.Parameter) -> None:
    """One large matrix of a whole stack (:func:`in_blocks`), a block of rows at a time: θ0's and
    each expert's rows read alone, their differences written into the stacked tensors (int8:
    quantised per row as they come, the same scales as a whole tensor's) and the anchor kept in
    the wider of its storage dtype and the parameter's (exact for a value every expert shares).
    The same stack as :func:`linear_differences` on the whole tensor, with the float32 temporaries of
    one block."""
    stack, model = s.stack, s.model
    total, where = param.shape[0], param.device
    step = max(1, STACK_BLOCK // max(1, param.numel() // total))
    held = torch.promote_types(s.anchor_dtype, param.dtype)
    anchor = torch.empty(param.shape, dtype=held, device=where)
    rows = torch.empty((len(stack.expert_names) - 1, *param.shape), dtype=s.dtype, device=where)
    scales = (
        torch.empty((rows.shape[0], num_rows(param.shape)), device=where) if s.dtype == torch.int8 else None
    )
    per_index = num_rows(param.shape) // total  # scale rows per index of the first dimension
    differ, unchanged = False, True
    for start in range(0, total, step):
        stop = min(total, start + step)
        theta0 = (
            s.base.rows(pname, start, stop, param, where) if param.is_meta else param.detach()[start:stop]
        )
        theta0 = theta0.to(torch.promote_types(param.dtype, torch.float32))
        block_anchor, block_rows, block_differ = linear_differences(
            theta0, s.experts, pname, s.rows_dtype, (start, stop, param.shape), s.sameness
        )
        differ = differ or block_differ
        unchanged = unchanged and torch.equal(block_anchor, theta0)
        anchor[start:stop] = block_anchor
        if scales is not None:
            block_rows, block_scales = quantize_rows(block_rows)
            scales[:, start * per_index : stop * per_index] = block_scales
        rows[:, start:stop] = block_rows
        del theta0, block_anchor, block_rows
    if not differ:  # the merge does not depend on w: not stacked
        (stack.unchanged if unchanged else stack.shared).append(pname)
        if param.is_meta:
            fill(model, pname, anchor.to(param.dtype))
        elif not unchanged:
            param.data.copy_(anchor)
        return
    del param
    stack.anchor[pname] = anchor = anchor.to(s.anchor_dtype)
    stack.deltas[pname] = rows
    if scales is not None:
        stack.scales[pname] = scales
    merge = MergedParameter(pname, rows, scales, len(stack.expert_names), stack.compute_dtype)
    attach(model, pname, anchor, merge)


def _stack_block(s: _Stacking, pname: str, param: torch.nn.Parameter, device: torch.device) -> None:
    """One matrix of a sharded stack (linear merge at scale 1): this rank's block of ⌈R/N⌉ rows
    (zero-padded), θ0's and each expert's read alone."""
    stack = s.stack
    start, stop, per = block_range(param.shape[0], *s.shard)
    theta0 = s.base.rows(pname, start, stop, param, device) if param.is_meta else param.detach()[start:stop]
    theta0 = theta0.to(torch.promote_types(param.dtype, torch.float32))
    anchor, rows, differ = linear_differences(
        theta0, s.experts, pname, s.rows_dtype, (start, stop, param.shape), s.sameness
    )
    flags = torch.tensor([float(differ), float(not torch.equal(anchor, theta0))], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the ranks agree on what this parameter is
    if not flags[0]:  # every expert equal here: not stacked, θ0 or the one shared value
        (stack.shared if flags[1] else stack.unchanged).append(pname)
        keep_block(s.model, pname, padded(anchor.to(param.dtype), per), param.shape, stack.compute_dtype)
        return
    del theta0
    anchor, rows = padded(anchor, per), padded(rows, per, dim=1)
    block, rows, scales = s.store(pname, anchor, rows)
    merge = ShardedMergedParameter(
        pname, rows, scales, len(stack.expert_names), stack.compute_dtype, param.shape
    )
    del param  # the caller's reference to θ0 is the last; attach drops the model's
    attach(s.model, pname, block, merge)


def _keep_prepared_block(s: _Stacking, pname, param, theta0, anchor, rows, differ) -> None:
    """A matrix merged by another method (prepared whole, the same on every rank): this rank's
    block of the anchor and of the differences, or of the unmerged value."""
    stack = s.stack
    start, stop, per = block_range(param.shape[0], *s.shard)
    if not differ:
        (stack.unchanged if torch.equal(anchor, theta0) else stack.shared).append(pname)
        keep_block(
            s.model,
            pname,
            padded(anchor[start:stop].to(param.dtype), per).clone(),
            param.shape,
            stack.compute_dtype,
        )
        return
    anchor = padded(anchor[start:stop], per).clone()
    rows = padded(rows[:, start:stop], per, dim=1).clone()
    block, rows, scales = s.store(pname, anchor, rows)
    merge = ShardedMergedParameter(
        pname, rows, scales, len(stack.expert_names), stack.compute_dtype, param.shape
    )
    attach(s.model, pname, block, merge)


def _keep_theta0_block(s: _Stacking, pname: str, param: torch.nn.Parameter, device) -> None:
    """An excluded matrix under sharding: this rank's block of θ0's rows, gathered when read."""
    start, stop, per = block_range(param.shape[0], *s.shard)
    theta0 = s.base.rows(pname, start, stop, param, device) if param.is_meta else param.detach()[start:stop]
    keep_block(
        s.model, pname, padded(theta0.to(param.dtype), per).clone(), param.shape, s.stack.compute_dtype
    )
