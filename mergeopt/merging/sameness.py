"""Experts that add nothing to a mixture: one equal to the base, or two equal to each other.

Both are refused, not warned about. An expert equal to the base (a zero task vector: an untrained
adapter, the base's own directory named as an expert) has no domain behind it, so the weight the
fit gives it is no data share: it only scales the other task vectors down. Two equal experts (one
directory under two names, or identical tensors) make the mixture unidentifiable: any split of their
total weight merges to the same model, so the reported shares are arbitrary. Either way the
mixture.json would look like a finding and mean nothing.

The check rides on the stacking pass (:func:`mergeopt.merging.stacking.build_stack`), which reads every
merged tensor of every expert anyway: a candidate is dropped at its first difference, so after the
first tensor or two there is usually nothing left to compare. Under a sharded stack each rank sees a
block of rows and the ranks combine their findings once, at the end. Parameters the recipe excludes
are not compared ("equal in every merged parameter").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from mergeopt.errors import UserError
from mergeopt.loading.lora_updates import LoraAdapter


class Sameness:
    """Which experts are still equal to the base, and which pairs still equal each other."""

    def __init__(self, names: Sequence[str], skip: Sequence[str] = ()):
        """``skip``: experts not compared (LoRA experts kept low-rank, whose dense view is the base;
        ``mergeopt diagnose``'s stacked base)."""
        self.names = list(names)
        k = len(self.names)
        self.base = torch.tensor([n not in skip for n in self.names])
        self.pair = torch.ones(k, k, dtype=torch.bool).triu(1) & self.base[:, None] & self.base[None, :]

    def base_candidate(self, i: int) -> bool:
        return bool(self.base[i])

    def see_value(self, i: int, value: torch.Tensor, theta0: torch.Tensor) -> None:
        """Expert i's value of one tensor (or block) against θ0's."""
        if self.base[i] and not torch.equal(value, theta0):
            self.base[i] = False

    def see_differences(self, rows: torch.Tensor) -> None:
        """One tensor's rows θ_k − θ_1 (k ≥ 2): expert k equals expert 1 where its row is zero."""
        for i, j in self.pair.nonzero().tolist():
            same = not rows[j - 1].any() if i == 0 else torch.equal(rows[i - 1], rows[j - 1])
            if not same:
                self.pair[i, j] = False

    def see_task_vectors(self, tau: torch.Tensor) -> None:
        """One tensor's task vectors θ_k − θ0, all K of them."""
        for i in self.base.nonzero().flatten().tolist():
            if tau[i].any():
                self.base[i] = False
        for i, j in self.pair.nonzero().tolist():
            if not torch.equal(tau[i], tau[j]):
                self.pair[i, j] = False

    def check(self, device: torch.device | None = None) -> None:
        """Refuse an expert equal to the base or two equal experts, naming them. ``device``: a sharded
        stack's collective device; the ranks combine their blocks' findings there first."""
        if device is not None:  # equal only where every rank's block is equal
            flags = torch.cat([self.base.flatten(), self.pair.flatten()]).int().to(device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            flags = flags.cpu().bool()
            self.base, self.pair = flags[: len(self.names)], flags[len(self.names) :].view_as(self.pair)
        for i in self.base.nonzero().flatten().tolist():
            raise equal_to_base(self.names[i])
        for i, j in self.pair.nonzero().tolist():
            raise identical(self.names[i], self.names[j])


def equal_to_base(name: str) -> UserError:
    return UserError(
        f"expert {name!r} equals the base model in every merged parameter (a zero task vector: an "
        "untrained adapter, or the base itself?): it has no data to weigh; remove it or point it at "
        "its trained checkpoint"
    )


def identical(first: str, second: str) -> UserError:
    return UserError(
        f"experts {first!r} and {second!r} are identical in every merged parameter (one checkpoint "
        "under two names?): any split of their weight merges to the same model; keep one of them"
    )


def nothing_to_merge(names: Sequence[str], shared: bool) -> UserError:
    """No merged parameter differs between the experts. ``shared``: some differ from the base, so the
    experts are all one model (named, as :func:`identical` names two); else they are all the base
    where the recipe lets them be merged."""
    if shared:
        if len(names) == 2:
            return identical(names[0], names[1])
        return UserError(
            f"the experts {', '.join(map(repr, names))} are identical in every merged parameter (one "
            "checkpoint under several names?): every mixture merges to the same model; keep one of them"
        )
    return UserError(
        f"the experts {', '.join(map(repr, names))} do not differ from the base in any merged parameter "
        "(after model.exclude): nothing to merge"
    )


def check_lowrank_adapters(
    adapters: Mapping[str, LoraAdapter], dense_changed: Mapping[str, bool] | None = None
) -> None:
    """The same refusals for LoRA experts kept low-rank, from their factors (small): an adapter whose
    every update s·B·A is zero (B is zero-initialised: an adapter saved before training) and whose
    dense updates (DoRA, embeddings, its own copies) leave θ0 as it was (``dense_changed``: whether
    any of them changed a merged parameter, as the stacking pass saw it), or two adapters with the
    same factors and the same dense updates."""
    dense_changed = dense_changed or {}
    seen: list[str] = []
    for name, adapter in adapters.items():
        lowrank = any(f.scaling != 0 and f.b.any() and f.a.any() for f in adapter.factors.values())
        if not lowrank and not dense_changed.get(name, False):
            raise equal_to_base(name)
        for other in seen:
            if _same_factors(adapters[other], adapter):
                raise identical(other, name)
        seen.append(name)


def _same_factors(a: LoraAdapter, b: LoraAdapter) -> bool:
    if a.factors.keys() != b.factors.keys() or a.dense.keys() != b.dense.keys():
        return False
    same_dense = all(
        len(x := a.dense[t].tensors()) == len(y := b.dense[t].tensors())
        and all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y))
        for t in a.dense
    )
    return same_dense and all(
        f.scaling == g.scaling
        and f.a.shape == g.a.shape
        and f.b.shape == g.b.shape
        and torch.equal(f.a, g.a)
        and torch.equal(f.b, g.b)
        for f, g in ((a.factors[t], b.factors[t]) for t in a.factors)
    )
