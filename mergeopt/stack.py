"""The task-vector stack: θ0 plus, per parameter, a (K, *shape) tensor of τ_i = θ_i − θ0.

Holding the experts as one stacked tensor per parameter turns "merge at weights w" into a single
contraction per parameter, which autograd differentiates to w at K·P cost. Only parameters that
some expert changed are stacked; excluded parameters (regexes over names) and parameters that are
equal in every expert stay at θ0 and are never touched by the merge.
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
    base: dict[str, torch.Tensor]  # θ0 of the stacked parameters (views of the model's own tensors)
    deltas: dict[str, torch.Tensor]  # name -> (K, *shape)
    excluded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def num_stacked_parameters(self) -> int:
        return sum(t[0].numel() for t in self.deltas.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deltas.values())

    def merged(self, weights: torch.Tensor, method: MergeFn = merge_linear) -> dict[str, torch.Tensor]:
        """Merged tensors of the stacked parameters, to pass to torch.func.functional_call."""
        if weights.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} weights, got shape {tuple(weights.shape)}")
        return {name: method(self.base[name], delta, weights) for name, delta in self.deltas.items()}


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
    """Read each expert tensor lazily, subtract θ0 (in float32) and stack on θ0's device.

    An expert is a :class:`Checkpoint` (read tensor by tensor from safetensors) or an in-memory
    state dict (tests, benchmarks, notebooks). ``model`` holds θ0 (it was loaded from the base checkpoint) and is frozen here: only the
    mixture logits ever require grad.
    """
    patterns = [re.compile(p) for p in exclude]
    names = list(experts)
    stack = TaskVectorStack(expert_names=names, base={}, deltas={})
    params = list(model.named_parameters())
    for pname, param in tqdm(params, desc="stacking task vectors", unit="tensor", disable=not progress):
        param.requires_grad_(False)
        if _excluded(pname, patterns):
            stack.excluded.append(pname)
            continue
        compute = torch.promote_types(param.dtype, torch.float32)
        theta0 = param.detach().to(compute)
        deltas = []
        for ename, expert in experts.items():
            value = _read(expert, ename, pname).to(device=param.device, dtype=compute)
            if value.shape != theta0.shape:
                raise UserError(
                    f"tensor {pname} has shape {list(theta0.shape)} in the base but {list(value.shape)} "
                    f"in expert {ename!r}"
                )
            if not torch.isfinite(value).all():
                raise UserError(f"tensor {pname} of expert {ename!r} contains NaN or Inf")
            deltas.append(value - theta0)
        if all(not d.any() for d in deltas):
            stack.unchanged.append(pname)
            continue
        stack.base[pname] = param.detach()
        stack.deltas[pname] = torch.stack(deltas).to(dtype)
        del deltas
    if not stack.deltas:
        raise UserError(
            "no parameter differs between the base and the experts (after exclusions): nothing to merge"
        )
    return stack
