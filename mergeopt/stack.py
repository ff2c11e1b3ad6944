"""The expert stack: every expert's weights for each merged parameter, laid out for the linear merge.

The proxy is θ(w) = θ0 + Σ_i w_i τ_i with τ_i = θ_i − θ0 and w on the simplex. Because Σ_i w_i = 1,
this equals θ_1 + Σ_{i≥2} w_i (θ_i − θ_1): on the simplex θ0 drops out. So the stack holds, per
merged parameter, an *anchor* θ_1 (in the compute dtype, float32) and a (K−1, *shape) tensor of
differences θ_i − θ_1 (in the storage dtype; they are as small as task vectors, so bfloat16 keeps
them well). Compared with storing θ0 and K task vectors this saves one full copy of the model, and
the model's own parameter tensors, no longer needed for θ0, become the buffers the merge is written
into. Merging is one ``addmv`` per parameter and its gradient to w one ``mv``.

Parameters the recipe excludes (regexes over names) stay at θ0. Parameters equal in every expert
are not stacked: the model keeps that common value (θ0 when no expert changed it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mergeopt.checkpoints import Checkpoint
from mergeopt.errors import UserError
from mergeopt.methods import MergeFn, merge_linear

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class TaskVectorStack:
    expert_names: list[str]
    anchor: dict[str, torch.Tensor]  # θ_1 per merged parameter, compute dtype
    deltas: dict[str, torch.Tensor]  # (K−1, *shape): θ_i − θ_1 for i = 2..K, storage dtype
    targets: dict[str, torch.Tensor]  # the model's own tensors of the merged parameters
    excluded: list[str] = field(default_factory=list)  # kept at θ0 by the recipe
    unchanged: list[str] = field(default_factory=list)  # equal in every expert and in θ0
    shared: list[str] = field(default_factory=list)  # equal in every expert, different from θ0

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def num_stacked_parameters(self) -> int:
        return sum(t.numel() for t in self.anchor.values())

    def nbytes(self) -> int:
        tensors = [*self.anchor.values(), *self.deltas.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def merged(
        self,
        weights: torch.Tensor,
        method: MergeFn = merge_linear,
        out: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merged tensors of the stacked parameters at mixture w, for torch.func.functional_call.

        ``weights`` must lie on the simplex (the anchor form relies on Σ w = 1). With ``out`` (from
        :meth:`allocate_buffers`) the merge is written into those tensors instead of new ones.
        """
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        rest = weights[1:]  # w_1 is implied by the anchor: θ(w) = θ_1 + Σ_{i≥2} w_i (θ_i − θ_1)
        if out is None:
            return {name: method(self.anchor[name], delta, rest) for name, delta in self.deltas.items()}
        return {
            name: method(self.anchor[name], delta, rest, out=out[name]) for name, delta in self.deltas.items()
        }

    def allocate_buffers(self) -> dict[str, torch.Tensor]:
        """Tensors to merge into: the model's own parameter storage, whose θ0 the stack does not need.

        Reusing them costs no memory. After a merge into them the model itself holds θ(w) for the
        merged parameters; code that needs the base must reload it.
        """
        return {name: target.detach() for name, target in self.targets.items()}


def _read(expert: Checkpoint | Mapping[str, torch.Tensor], expert_name: str, name: str) -> torch.Tensor:
    if isinstance(expert, Checkpoint):
        if name not in expert.tensors:
            raise UserError(
                f"parameter {name} of the base model is not in expert {expert_name!r} ({expert.path})"
            )
        return expert.read(name)
    if name not in expert:
        raise UserError(f"parameter {name} of the base model is not in expert {expert_name!r}")
    return expert[name]


def _excluded(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def build_stack(
    model: torch.nn.Module,
    experts: Mapping[str, Checkpoint | Mapping[str, torch.Tensor]],
    exclude: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> TaskVectorStack:
    """Read each expert tensor lazily and stack anchor and differences on the parameter's device.

    An expert is a :class:`Checkpoint` (read tensor by tensor from safetensors) or an in-memory
    state dict (tests, benchmarks, notebooks). ``model`` holds θ0 (it was loaded from the base
    checkpoint); it is frozen here, so only the mixture logits ever require grad.
    """
    patterns = [re.compile(p) for p in exclude]
    names = list(experts)
    stack = TaskVectorStack(expert_names=names, anchor={}, deltas={}, targets={})
    params = list(model.named_parameters())
    for pname, param in tqdm(params, desc="stacking experts", unit="tensor", disable=not progress):
        param.requires_grad_(False)
        if _excluded(pname, patterns):
            stack.excluded.append(pname)
            continue
        compute = torch.promote_types(param.dtype, torch.float32)
        anchor = None
        # differences written row by row into one preallocated tensor: no K-long list of temporaries
        rows = torch.empty((len(names) - 1, *param.shape), dtype=dtype, device=param.device)
        differ = False
        for k, (ename, expert) in enumerate(experts.items()):
            value = _read(expert, ename, pname).to(device=param.device, dtype=compute)
            if value.shape != param.shape:
                raise UserError(
                    f"tensor {pname} has shape {list(param.shape)} in the base but {list(value.shape)} "
                    f"in expert {ename!r}"
                )
            if not torch.isfinite(value).all():
                raise UserError(f"tensor {pname} of expert {ename!r} contains NaN or Inf")
            if anchor is None:
                anchor = value
                continue
            value.sub_(anchor)
            differ = differ or bool(value.any())
            rows[k - 1].copy_(value)
            del value
        if not differ:  # one common value: no need to stack it
            if torch.equal(anchor, param.detach().to(compute)):
                stack.unchanged.append(pname)
            else:
                stack.shared.append(pname)
                param.data.copy_(anchor)
            continue
        stack.anchor[pname] = anchor
        stack.deltas[pname] = rows
        stack.targets[pname] = param
    if not stack.deltas:
        raise UserError(
            "the experts do not differ in any merged parameter (after exclusions): nothing to merge"
        )
    return stack
