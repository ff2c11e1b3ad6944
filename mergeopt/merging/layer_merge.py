"""Per-layer merge: each stacked parameter is formed from the stack when its module reads it.

Merging the whole model before the forward costs a merged copy of the model, and its backward
ends holding the gradient of every stacked parameter at once (26 GiB in float32 at 8B). Here each
stacked parameter becomes a ``torch.nn.utils.parametrize`` parametrization of its own module: the
module keeps the anchor θ_1 as its ``original`` tensor, the parametrization holds the K − 1
differences (dense or int8 with per-row scales) and a buffer ``mergeopt_mix`` with the mixture w.
When the module reads its weight, :class:`LayerMerge` forms θ_1 + Σ_{i≥2} w_i (θ_i − θ_1) in
float32 and casts it to the compute dtype; its backward contracts ⟨∂L/∂W, δ_i⟩ into the K-vector
gradient at once, so ∂L/∂W lives only while its layer's backward runs.

The mixture enters through ``torch.func.functional_call``, which swaps the ``mergeopt_mix`` buffers
for the w being optimized (so autograd reaches w), exactly as LoRA experts' low-rank updates read
it (:mod:`mergeopt.merging.lowrank`). A plain ``model(...)`` call (generation, lm-eval) reads the values
last written with :func:`write_mixture`.

What autograd saves: a module's backward needs its weight (dX = dY·W), and keeping every layer's
merged W until the backward would be a merged copy of the model again. Inside
:func:`recompute_merged`, a saved-tensor hook stores a recipe (which parameter, which w) instead of
a merged tensor and merges it again when the backward unpacks it, one layer at a time, as FSDP
regathers a resharded layer. Under activation checkpointing (:mod:`mergeopt.memory.checkpointing`) the
decoder layers' own forward is recomputed, and the merge with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from mergeopt.merging.int8_rows import num_rows

MIX_BUFFER = "mergeopt_mix"
CHUNK = 1 << 24  # float32 elements of a (K − 1, rows, columns) working block: 64 MiB per expert row
SOURCE_ATTRIBUTE = "_mergeopt_merge_source"


# ----------------------------------------------------------------------------- the kernel


def _row_chunks(rows: int, columns: int, experts: int) -> Iterator[slice]:
    """Row ranges whose float32 working block of ``experts`` rows stays near CHUNK elements."""
    step = max(1, CHUNK // max(1, columns * max(1, experts)))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _factor_pieces(factors, start: int, stop: int):
    """(expert e, its rows [o0, o1), their offset in rows [start, stop)) of a whole parameter's
    LoRA factors (:class:`mergeopt.merging.lowrank_parameters.ParameterFactors`, b: (E, first, R))
    that rows [start, stop) of the parameter flattened to (E · first, last) cover."""
    first = factors.b.shape[1]
    for e in range(start // first, (stop - 1) // first + 1):
        o0, o1 = max(start - e * first, 0), min(stop - e * first, first)
        yield e, o0, o1, e * first + o0 - start


def add_factor_rows(target: torch.Tensor, factors, c: torch.Tensor, start: int, stop: int) -> None:
    """Add rows [start, stop) of the LoRA experts' update Σ_j c_j b_j a_j (a whole parameter's, in
    its own layout) to ``target`` (those rows, flattened to (rows, last), float32 at least)."""
    for e, o0, o1, at in _factor_pieces(factors, start, stop):
        b = factors.b[e, o0:o1].to(target.dtype) * c.to(target.dtype)
        target[at : at + o1 - o0].addmm_(b, factors.a[e].to(target.dtype))


def contract_factor_rows(grad_rows: torch.Tensor, factors, start: int, stop: int) -> torch.Tensor:
    """∂L/∂c_j over rows [start, stop) of ∂L/∂W: Σ b_j[o] (∂L/∂W[o] · a_j), (R,) in grad's dtype."""
    total = torch.zeros(factors.a.shape[1], dtype=grad_rows.dtype, device=grad_rows.device)
    for e, o0, o1, at in _factor_pieces(factors, start, stop):
        projected = grad_rows[at : at + o1 - o0] @ factors.a[e].to(grad_rows.dtype).t()  # (rows, R)
        total += (projected * factors.b[e, o0:o1].to(grad_rows.dtype)).sum(dim=0)
    return total


def merge_value(
    rest: torch.Tensor,
    anchor: torch.Tensor,
    deltas: torch.Tensor,
    scales: torch.Tensor | None,
    dtype,
    factors=None,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ_1 + Σ_{i≥2} w_i δ_i in float32 (or float64 for a float64 anchor), returned in ``dtype``.

    ``rest`` is (w_2 … w_K); ``scales`` (K − 1, rows) dequantises int8 ``deltas`` row by row. A
    stack already in the accumulation dtype is merged by one ``addmv``; a narrower one (bfloat16,
    int8) is accumulated one expert at a time by ``addcmul_``, which reads the narrow values and
    computes in float32 without an upcast copy. With a float32 result the merge is formed in the
    result itself; with a narrower one, in one float32 chunk of the parameter, whatever K is.
    ``factors`` and ``coefficients`` (c_j): LoRA experts of this whole parameter beside dense ones
    (their dense view is θ0 here), whose update Σ_j c_j b_j a_j is added to each chunk before it
    is rounded to ``dtype``.
    """
    acc = torch.promote_types(anchor.dtype, torch.float32)
    k1 = deltas.shape[0]
    rows = num_rows(anchor.shape)
    a = anchor.reshape(rows, -1)
    d = deltas.reshape(k1, rows, -1)
    w = rest.detach().to(device=anchor.device, dtype=acc)
    result = torch.empty(anchor.shape, dtype=dtype, device=anchor.device)  # not a view: it gets tagged
    out = result.view(rows, -1)
    same = deltas.dtype == acc and scales is None
    for r in _row_chunks(rows, a.shape[1], k1 if same else 1):
        view = out[r]
        target = view if dtype == acc else torch.empty(view.shape, dtype=acc, device=view.device)
        if same:
            torch.addmv(a[r].reshape(-1), d[:, r].reshape(k1, -1).t(), w, out=target.view(-1))
        else:
            target.copy_(a[r])
            for i in range(k1):
                coefficient = w[i] if scales is None else (w[i] * scales[i, r].to(acc))[:, None]
                target.addcmul_(d[i, r], coefficient)
        if factors is not None:
            add_factor_rows(target, factors, coefficients.detach().to(anchor.device), r.start, r.stop)
        if target is not view:
            view.copy_(target)
    return result


def contract(
    grad: torch.Tensor, deltas: torch.Tensor, scales: torch.Tensor | None, acc: torch.dtype, factors=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """⟨∂L/∂W, δ_i⟩ for each stored difference, accumulated in ``acc`` (float32 at least). A narrow
    difference is multiplied with the gradient in ``acc`` as it is read (one product per chunk).
    With ``factors`` (LoRA experts of this whole parameter), also ∂L/∂c_j from the same chunks."""
    k1 = deltas.shape[0]
    rows = num_rows(grad.shape)
    g = grad.reshape(rows, -1)
    d = deltas.reshape(k1, rows, -1)
    total = torch.zeros(k1, dtype=acc, device=grad.device)
    factor_total = None if factors is None else torch.zeros(factors.a.shape[1], dtype=acc, device=grad.device)
    same = deltas.dtype == acc and scales is None
    for r in _row_chunks(rows, g.shape[1], k1 if same else 1):
        gr = g[r].to(acc)
        if factor_total is not None:
            factor_total += contract_factor_rows(gr, factors, r.start, r.stop)
        if same:
            total += d[:, r].reshape(k1, -1) @ gr.reshape(-1)
            continue
        for i in range(k1):
            product = d[i, r] * gr  # promoted to acc
            if scales is None:
                total[i] += product.sum()
            else:
                total[i] += torch.dot(product.sum(dim=1), scales[i, r].to(acc))
            del product
    return total, factor_total


class LayerMerge(torch.autograd.Function):
    """W(w) = θ_1 + Σ_{i≥2} w_i δ_i (+ Σ_j c_j b_j a_j of LoRA experts' ``factors``) for one
    parameter; the backward returns only the K − 1 vector (and ∂L/∂c)."""

    @staticmethod
    def forward(ctx, rest, coefficients, anchor, deltas, scales, factors, dtype):
        ctx.deltas, ctx.scales, ctx.factors = deltas, scales, factors  # held by the stack anyway
        ctx.acc = torch.promote_types(anchor.dtype, torch.float32)
        ctx.rest_dtype = rest.dtype
        ctx.coefficient_dtype = None if coefficients is None else coefficients.dtype
        return merge_value(rest, anchor, deltas, scales, dtype, factors, coefficients)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad_rest, grad_c = contract(grad, ctx.deltas, ctx.scales, ctx.acc, ctx.factors)
        if grad_c is not None:
            grad_c = grad_c.to(ctx.coefficient_dtype)
        return grad_rest.to(ctx.rest_dtype), grad_c, None, None, None, None, None


# ----------------------------------------------------------------------------- the parametrization


class MergedParameter(torch.nn.Module):
    """A parametrization ``anchor -> W(w)``: the merged value of one stacked parameter.

    ``deltas`` and ``scales`` are non-persistent buffers (they move with the model and are never
    written to a checkpoint); ``mergeopt_mix`` holds the merge coefficients (w, or M³'s
    reweighted c(w)), replaced by functional_call.
    """

    forms_merge = True  # its value is the merge at the mixture in its buffer (see make_permanent)

    def __init__(
        self,
        name: str,
        deltas: torch.Tensor,
        scales: torch.Tensor | None,
        num_experts: int,
        compute_dtype: torch.dtype,
    ):
        super().__init__()
        self.name = name
        self.compute_dtype = compute_dtype
        self.register_buffer("deltas", deltas, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        mix = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float32, device=deltas.device)
        self.register_buffer(MIX_BUFFER, mix, persistent=False)

    # LoRA experts of this whole parameter beside the dense ones (a mixture of experts' fused
    # weight: mergeopt.merging.lowrank_parameters), their update added to the merge; and λ
    factors = None
    scale = 1.0

    def coefficients(self) -> torch.Tensor:
        """(w_2 … w_K) on this parameter's device (w_1 is implied by the anchor)."""
        return getattr(self, MIX_BUFFER).to(self.deltas.device)[1:]

    def factor_coefficients(self) -> torch.Tensor | None:
        """c_j = λ w_owner(j) s_owner(j) of the LoRA experts' factors (None without them)."""
        if self.factors is None:
            return None
        return self.factors.coefficients(getattr(self, MIX_BUFFER), self.scale)

    def value(self, anchor: torch.Tensor, rest: torch.Tensor, coefficients=None) -> torch.Tensor:
        """The merged weight at coefficients ``rest`` (and the factors' c), without autograd."""
        factors = self.factors if coefficients is not None else None
        return merge_value(rest, anchor, self.deltas, self.scales, self.compute_dtype, factors, coefficients)

    def merge(self, anchor: torch.Tensor, rest: torch.Tensor, coefficients=None) -> torch.Tensor:
        """The merged weight, differentiable in ``rest`` (its backward contracts ⟨∂L/∂W, δ_i⟩) and
        in the factors' c."""
        factors = self.factors if coefficients is not None else None
        return LayerMerge.apply(
            rest, coefficients, anchor, self.deltas, self.scales, factors, self.compute_dtype
        )

    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        rest, c = self.coefficients(), self.factor_coefficients()
        if not torch.is_grad_enabled() or not (rest.requires_grad or (c is not None and c.requires_grad)):
            return self.value(anchor, rest, c)
        merged = self.merge(anchor, rest, c)
        kept = None if c is None else c.detach().clone()
        tag_source(merged, MergeRecipe(self, anchor, rest.detach().clone(), kept))
        return merged


@dataclass(frozen=True)
class MergeRecipe:
    """How to form one merged tensor again, for the backward (see :func:`recompute_merged`): a
    parametrization's ``value(anchor, coefficients)`` without autograd (the dense merge's, or that
    of :mod:`mergeopt.merging.lowrank_parameters`)."""

    parametrization: torch.nn.Module
    anchor: torch.Tensor
    rest: torch.Tensor
    coefficients: torch.Tensor | None = None  # LoRA experts' c beside a dense merge's w

    def value(self) -> torch.Tensor:
        with torch.no_grad():
            if self.coefficients is None:
                return self.parametrization.value(self.anchor, self.rest)
            return self.parametrization.value(self.anchor, self.rest, self.coefficients)


@dataclass(frozen=True)
class _Recompute:
    source: MergeRecipe
    view: tuple | None  # (size, stride, storage offset) when a view of the merged tensor was saved


def tag_source(tensor: torch.Tensor, source) -> None:
    """Mark ``tensor`` as formed by ``source`` (anything with ``value()``), so autograd saves the
    recipe instead of the tensor. A tensor that is a whole-shape view of another (DTensor's
    ``full_tensor`` returns one) tags that root too: autograd saves views of the root (a
    transpose), and :func:`_pack` finds them through their ``_base``."""
    setattr(tensor, SOURCE_ATTRIBUTE, source)
    root = tensor._base
    if (
        root is not None
        and root.shape == tensor.shape
        and root.stride() == tensor.stride()
        and tensor.storage_offset() == root.storage_offset() == 0
    ):
        setattr(root, SOURCE_ATTRIBUTE, source)


def _pack(tensor: torch.Tensor):
    source = getattr(tensor, SOURCE_ATTRIBUTE, None)
    if source is not None:
        return _Recompute(source, None)
    base = tensor._base
    source = getattr(base, SOURCE_ATTRIBUTE, None) if base is not None else None
    if source is not None:
        return _Recompute(source, (tensor.size(), tensor.stride(), tensor.storage_offset()))
    return tensor


def _unpack(packed):
    if not isinstance(packed, _Recompute):
        return packed
    value = packed.source.value()
    return value if packed.view is None else value.as_strided(*packed.view)


@contextmanager
def recompute_merged() -> Iterator[None]:
    """Autograd saves a recipe for each merged weight instead of the tensor, and merges it again
    when the backward needs it: the forward never keeps a merged copy of the model."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


# ----------------------------------------------------------------------------- attaching


def owners(model: torch.nn.Module, name: str) -> list[tuple[torch.nn.Module, str]]:
    """Every (module, attribute) holding parameter ``name``: tied weights (an embedding shared with
    the output layer) have several, and each must read the merge."""
    target = model.get_parameter(name)
    found = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is target:
                found.append((module, attr))
        del module_name
    return found


def attach(
    model: torch.nn.Module,
    name: str,
    anchor: torch.Tensor,
    parametrization: torch.nn.Module,
) -> None:
    """Make parameter ``name`` (and every tie of it) read W(w); the model's θ0 tensor is dropped."""
    anchor_param = torch.nn.Parameter(anchor, requires_grad=False)
    for module, attr in owners(model, name):
        module._parameters[attr] = anchor_param  # the base's tensor for it goes away here
        parametrize.register_parametrization(module, attr, parametrization, unsafe=True)


def parameter_device(model: torch.nn.Module, name: str) -> torch.device:
    """The device of parameter ``name`` (its anchor's, when it reads the merge), without merging it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original.device
    return module._parameters[attr].device


def mix_buffer_names(model: torch.nn.Module) -> list[str]:
    """Every ``mergeopt_mix`` buffer of the model: the names functional_call gives w under."""
    return [n for n, _ in model.named_buffers(remove_duplicate=False) if n.rsplit(".", 1)[-1] == MIX_BUFFER]


def write_mixture(model: torch.nn.Module, weights: torch.Tensor) -> None:
    """Copy w into every mixture buffer, for plain ``model(...)`` calls (generation, lm-eval)."""
    with torch.no_grad():
        for name in mix_buffer_names(model):
            module_name, _, attr = name.rpartition(".")
            getattr(model.get_submodule(module_name), attr).copy_(weights.detach())


@contextmanager
def materialized() -> Iterator[None]:
    """Each merged weight formed once and reused until the block ends (``parametrize.cached``):
    for generation, which runs the model once per new token. It holds a merged copy of the model
    while it lasts, so the training step never uses it."""
    with parametrize.cached():
        yield


def make_permanent(model: torch.nn.Module) -> None:
    """Replace every merged parametrization (``forms_merge``: the per-layer merge's, and
    :mod:`mergeopt.merging.lowrank_parameters`') by its value at the mixture in its buffers, as a plain
    parameter (mergeopt.export.merge writes the model out after this). Ties stay ties: one tensor per
    merged parameter, however many modules hold it."""
    values: dict[int, torch.nn.Parameter] = {}
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            merge = module.parametrizations[attr][0]
            if not getattr(merge, "forms_merge", False):
                continue
            if id(merge) not in values:
                with torch.no_grad():
                    values[id(merge)] = torch.nn.Parameter(
                        getattr(module, attr).detach(), requires_grad=False
                    )
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            module._parameters[attr] = values[id(merge)]
