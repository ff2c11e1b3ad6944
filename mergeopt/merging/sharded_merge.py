"""The expert stack sharded over the ranks of a torchrun job: each rank keeps 1/N of every matrix.

Why: under plain torchrun every rank holds the whole stack, so GPUs add speed but never memory;
four Llama-3.1-70B experts in bfloat16 are about 560 GB. Here each rank keeps a block of ⌈R/N⌉
rows of every matrix (anchor, differences, int8 scales; LoRA factors; matrices that are not
merged), the layout FSDP2 gives a parameter (DTensor ``Shard(0)``; stored zero-padded to ⌈R/N⌉
rows so every rank's block has one shape). The merge is row-wise, so a rank merges its own rows,
θ_1[r] + Σ_{i≥2} w_i δ_i[r], and the ranks all-gather the merged rows: one copy of the merged
weight crosses between ranks, not the K expert rows that gathering the stack itself, FSDP's way,
would move (FSDP2's ``fully_shard`` gathers parameters as they are stored and offers no hook to
gather a function of them). In the backward each rank holds ∂L/∂W for its share of the batch; a
reduce-scatter adds them up over the ranks and leaves each rank the rows it keeps, which it
contracts with its differences (:class:`mergeopt.merging.layer_merge.LayerMerge`) into its part of the
K-vector gradient. The all-reduce of that vector, which every torchrun fit makes already
(:mod:`mergeopt.runtime.distributed`), adds the parts.

The collectives are DTensor's: the merged block becomes a ``Shard(0)`` DTensor and
``full_tensor(grad_placements=[Partial()])`` all-gathers it; declaring the gradient ``Partial``
(each rank's is a partial sum over the batch) makes its backward a reduce-scatter. They run in
the same order on every rank, because every rank runs the same forward and backward, as under
FSDP; the backward's recomputation of a merged weight (:func:`mergeopt.merging.layer_merge.recompute_merged`)
gathers it again. Vectors (norm weights, biases) stay whole on every rank: they are a few
thousandths of the stack.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.utils import parametrize

from mergeopt.merging.layer_merge import MIX_BUFFER, MergedParameter, attach, tag_source
from mergeopt.merging.lowrank_parameters import LowRankMergedParameter, ParameterFactors

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# torch.distributed.tensor (DTensor) is imported where a sharded stack first gathers, not here:
# importing it costs about a second (sympy), which every command and torchrun rank would pay

# bytes this process has moved through the stack's collectives since the last reset: what a step
# costs in communication, measured against its minimum (one merged copy of each matrix per use)
TRAFFIC = {"gathered": 0, "reduce_scattered": 0}


def reset_traffic() -> None:
    for key in TRAFFIC:
        TRAFFIC[key] = 0


def block_range(rows: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, stop, m) of rank's block: rows [start, stop) of ``rows``, m = ⌈rows / size⌉ once padded."""
    per = math.ceil(rows / size)
    return min(rank * per, rows), min((rank + 1) * per, rows), per


def padded(tensor: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """``tensor`` with zero rows appended along ``dim`` up to ``rows`` (itself when it has them)."""
    missing = rows - tensor.shape[dim]
    if missing == 0:
        return tensor
    zeros = tensor.new_zeros((*tensor.shape[:dim], missing, *tensor.shape[dim + 1 :]))
    return torch.cat([tensor, zeros], dim=dim)


def shard_rows(tensor: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    """Rank's block of rows of ``tensor`` along ``dim`` (:func:`block_range`) as a new tensor,
    zero-padded at the end, so every rank's block has m rows (the collectives need equal blocks)."""
    start, stop, per = block_range(tensor.shape[dim], rank, size)
    return padded(tensor.narrow(dim, start, stop - start), per, dim).clone()


_MESHES: dict = {}


def _mesh(group, device: torch.device) -> DeviceMesh:
    """The one-dimensional mesh of ``group``'s ranks on this device type (made once)."""
    group = group or dist.group.WORLD  # a new object after each init_process_group
    key = (group, device.type)
    mesh = _MESHES.get(key)
    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = _MESHES[key] = DeviceMesh.from_group(group, device.type)
    return mesh


def gather_rows(local: torch.Tensor, rows: int, group=None) -> torch.Tensor:
    """The ranks' blocks of rows (each ``local`` zero-padded to ⌈rows/N⌉ rows) as the whole
    tensor of ``rows`` rows; differentiable: its backward reduce-scatters the whole gradient and
    hands each rank the rows it keeps (zero for the padding)."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    start, stop, per = block_range(rows, rank, size)
    shape = torch.Size((rows, *local.shape[1:]))
    block = DTensor.from_local(
        local[: stop - start],
        _mesh(group, local.device),
        [Shard(0)],
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )
    padded_bytes = per * size * local[0].numel() * local.element_size() if rows else 0
    TRAFFIC["gathered"] += padded_bytes
    if local.requires_grad:
        local.register_hook(_count_reduce_scatter(padded_bytes))
    return block.full_tensor(grad_placements=[Partial()])


def _count_reduce_scatter(nbytes: int):
    def count(_grad: torch.Tensor) -> None:
        TRAFFIC["reduce_scattered"] += nbytes

    return count


class ShardedMergedParameter(MergedParameter):
    """A :class:`MergedParameter` over this rank's rows: ``anchor`` (the parametrization's
    ``original``), ``deltas`` and ``scales`` hold the block; the value is the whole merged weight."""

    def __init__(self, name, deltas, scales, num_experts, compute_dtype, shape, group=None):
        super().__init__(name, deltas, scales, num_experts, compute_dtype)
        self.shape = tuple(shape)
        self.group = group

    def value(self, anchor: torch.Tensor, rest: torch.Tensor, coefficients=None) -> torch.Tensor:
        return gather_rows(super().value(anchor, rest, coefficients), self.shape[0], self.group)

    def merge(self, anchor: torch.Tensor, rest: torch.Tensor, coefficients=None) -> torch.Tensor:
        """This rank's merged rows (their backward contracts ⟨∂L/∂W, δ_i⟩ over them), gathered."""
        return gather_rows(super().merge(anchor, rest, coefficients), self.shape[0], self.group)


class ShardedLowRankMergedParameter(LowRankMergedParameter):
    """A :class:`~mergeopt.merging.lowrank_parameters.LowRankMergedParameter` over this rank's
    block of a whole parameter's rows (a fused weight's experts): θ0's block is the ``original``,
    the factors hold the block's; the value is the whole merged weight, gathered. The backward
    reduce-scatters ∂L/∂W, and the rank contracts its block into its part of ∂L/∂c."""

    def __init__(self, name, factors, scale, num_experts, compute_dtype, shape, group=None):
        super().__init__(name, factors, scale, num_experts, compute_dtype)
        self.shape = tuple(shape)
        self.group = group

    def value(self, anchor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        return gather_rows(super().value(anchor, coefficients), self.shape[0], self.group)

    def merge(self, anchor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        return gather_rows(super().merge(anchor, coefficients), self.shape[0], self.group)


def shard_parameter_factors(factors: ParameterFactors, rank: int, size: int) -> ParameterFactors:
    """This rank's block of a whole parameter's factors, as its rows are sharded: a fused
    (experts, out, in) weight's by expert (both factors), a matrix's by output row (B's rows; A,
    (R × in), stays whole)."""
    if len(factors.shape) == 3:
        a, b = shard_rows(factors.a, rank, size), shard_rows(factors.b, rank, size)
    else:
        a, b = factors.a, shard_rows(factors.b, rank, size, dim=1)
    return ParameterFactors(a, b, factors.owner, factors.scaling, factors.shape)


def shard_parameter_lora(model: torch.nn.Module, lowrank, compute_dtype, group=None, names=None) -> None:
    """Turn each whole parameter the LoRA experts adapt (``lowrank.parameters``, or those of
    ``names``), which the sharded stacking kept as θ0's block of rows (:class:`ShardedWeight`: the
    experts' dense view of it is θ0), into the merge of that block and this rank's block of the
    factors, gathered."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    for name, whole in list(lowrank.parameters.items()):
        if names is not None and name not in names:
            continue
        factors = shard_parameter_factors(whole, rank, size)
        module_name, _, attr = name.rpartition(".")
        plist = model.get_submodule(module_name).parametrizations[attr]
        if not isinstance(plist[0], ShardedWeight):
            raise TypeError(f"{name} is not a block of θ0's rows ({type(plist[0]).__name__})")
        k = len(lowrank.expert_names)
        plist[0] = ShardedLowRankMergedParameter(
            name, factors, lowrank.scale, k, compute_dtype, whole.shape, group
        )
        lowrank.parameters[name] = factors


class ShardedWeight(torch.nn.Module):
    """A parametrization ``block -> W`` for a matrix that is not merged (θ0 kept by
    ``model.exclude``, or one value every expert shares): the rank keeps its block of rows and the
    ranks gather the whole matrix when its module reads it, as FSDP2 does for a frozen parameter.
    The gathered weight is read in ``compute_dtype`` (``model.eval_dtype`` widens it for
    evaluations, :mod:`mergeopt.merging.eval_dtype`); the backward gathers it again rather than keep it
    (:func:`mergeopt.merging.layer_merge.recompute_merged`)."""

    def __init__(self, name: str, shape, compute_dtype: torch.dtype, group=None):
        super().__init__()
        self.name = name
        self.shape = tuple(shape)
        self.compute_dtype = compute_dtype
        self.group = group

    def value(self, block: torch.Tensor) -> torch.Tensor:
        return gather_rows(block, self.shape[0], self.group).to(self.compute_dtype)

    def forward(self, block: torch.Tensor) -> torch.Tensor:
        whole = self.value(block)
        if torch.is_grad_enabled():
            tag_source(whole, _Regather(self, block))
        return whole


class _Regather:
    """How :func:`mergeopt.merging.layer_merge.recompute_merged` forms an unmerged sharded weight again."""

    def __init__(self, parametrization: ShardedWeight, block: torch.Tensor):
        self.parametrization, self.block = parametrization, block

    def value(self) -> torch.Tensor:
        with torch.no_grad():
            return self.parametrization.value(self.block)


class _GatherAgain:
    """The same for a LoRA factor: gather the ranks' blocks again."""

    def __init__(self, block: torch.Tensor, rows: int, dtype: torch.dtype, group=None):
        self.block, self.rows, self.dtype, self.group = block, rows, dtype, group

    def value(self) -> torch.Tensor:
        return gather_rows(self.block, self.rows, self.group).to(self.dtype)


def gathered_for_backward(block: torch.Tensor, rows: int, dtype: torch.dtype, group=None) -> torch.Tensor:
    """The whole tensor of the ranks' ``block``s in ``dtype``; under autograd it carries a recipe
    to gather it again, so the backward does not keep it (a frozen factor, like FSDP's reshard)."""
    again = _GatherAgain(block, rows, dtype, group)
    whole = again.value()
    if torch.is_grad_enabled():
        tag_source(whole, again)
    return whole


def shard_lowrank(lowrank, rank: int, size: int) -> None:
    """Keep this rank's block of rows of every LoRA factor: A's rank rows and B's output rows.
    The factors are read whole once (they are small: Σ r_i (in + out) per module) and cut here."""
    for factors in lowrank.modules.values():  # DoRA's gains (one per output row) stay whole
        factors.whole_rows = (factors.a.shape[0], factors.b.shape[0])
        factors.a = shard_rows(factors.a, rank, size)
        factors.b = shard_rows(factors.b, rank, size)


def keep_block(
    model: torch.nn.Module, name: str, block: torch.Tensor, shape, compute_dtype, group=None
) -> None:
    """Make matrix ``name`` (every tie of it) this rank's ``block`` of its rows, gathered when read."""
    attach(model, name, block, ShardedWeight(name, shape, compute_dtype, group))


def shard_stack(model: torch.nn.Module, stack, group=None) -> None:
    """Keep this rank's rows of every stacked matrix of ``stack`` (attached to ``model``) and free
    the rest: anchors, differences and int8 scales become blocks, and each parameter's merge
    gathers the merged rows. Vectors stay whole."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    merges = {}
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            merge = plist[0]
            if isinstance(merge, MergedParameter) and not isinstance(merge, ShardedMergedParameter):
                merges.setdefault(id(merge), (merge, []))[1].append((module, attr))
    for merge, places in merges.values():
        anchor = places[0][0].parametrizations[places[0][1]].original
        if anchor.dim() < 2:
            continue
        block = torch.nn.Parameter(shard_rows(anchor.detach(), rank, size), requires_grad=False)
        deltas = shard_rows(merge.deltas, rank, size, dim=1)
        scales = (
            _shard_scales(merge.scales, anchor.shape[0], rank, size) if merge.scales is not None else None
        )
        sharded = ShardedMergedParameter(
            merge.name, deltas, scales, merge.deltas.shape[0] + 1, merge.compute_dtype, anchor.shape, group
        )
        getattr(sharded, MIX_BUFFER).copy_(getattr(merge, MIX_BUFFER))
        for module, attr in places:
            plist = module.parametrizations[attr]
            plist[0] = sharded
            plist.original = block
        stack.anchor[merge.name] = block
        stack.deltas[merge.name] = deltas
        if scales is not None:
            stack.scales[merge.name] = scales


def _shard_scales(scales: torch.Tensor, rows: int, rank: int, size: int) -> torch.Tensor:
    """Rank's int8 scales, (K − 1, rows of its block): a matrix is sharded along its first
    dimension, and a tensor of more than two (a mixture-of-experts' fused weight) has one scale
    per (expert, output channel), so the scales are sharded as that first dimension is."""
    per_row = scales.reshape(scales.shape[0], rows, -1)
    return shard_rows(per_row, rank, size, dim=1).reshape(scales.shape[0], -1)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` reads weights gathered from the ranks: then every rank must run each of
    its forward passes (generation keeps the ranks in step, ``synced_gpus``)."""
    sharded = (ShardedMergedParameter, ShardedWeight, ShardedLowRankMergedParameter)
    return any(isinstance(m, sharded) for m in model.modules())
