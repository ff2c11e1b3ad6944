"""Hierarchical mixtures: experts grouped into domains, w_i = share of i's group × i's share within it.

A recipe names domains (``weights.groups: {code: [python, js], math: [gsm, algebra]}``); an expert
no group names is a group of its own, named after the expert. Any point of the simplex is a
hierarchical mixture (group share s_g = Σ_{i∈g} w_i, share within c_i = w_i / s_g), so the hierarchy
changes three things only, all here:

- the gradient strategy's parametrisation, both levels learnable:
  w_i = softmax(u)[g(i)] · softmax(v restricted to g(i))[i], with u one logit per group and v one
  per expert (z = [u, v], G + K numbers). A step on u moves whole domains at once, a step on v
  trades experts inside a domain without changing the domain's share. With every group a singleton
  the within-level is exactly 1, its gradient exactly 0 (so Adam never moves v), and u are the flat
  logits: the fit is the flat fit bit for bit (groups are ordered by their first expert, so u is in
  the experts' order);
- the Dirichlet draws (:func:`mergeopt.search.dirichlet.draw_mixtures`): a Dirichlet over the
  groups times a Dirichlet within each, so each domain gets the same prior mass however many
  experts it holds (a flat Dirichlet gives a domain of n of K experts a mean share n/K);
- what a run reports: mixture.json's ``groups`` (:meth:`Groups.record`), both levels recomputed
  from w by :meth:`Groups.shares`, which report.md and every export's header state
  (:func:`mergeopt.export.mixture_input.describe_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mergeopt.merging.weights import MIN_WEIGHT


@dataclass(frozen=True)
class Groups:
    """A partition of ``names`` (the experts, in the stack's order) into ``labels`` (the groups)."""

    names: tuple[str, ...]
    labels: tuple[str, ...]  # ordered by their first expert in ``names``
    index: tuple[int, ...]  # per expert: its group's position in ``labels``

    @classmethod
    def build(cls, names: Sequence[str], spec: Mapping[str, Sequence[str]]) -> Groups:
        """The recipe's groups, each expert they do not name a singleton named after it.

        The recipe schema has checked ``spec`` (known experts, each in one group, no empty group,
        no label that is another expert's name); a violation here is a bug, not input.
        """
        group_of = {expert: label for label, members in spec.items() for expert in members}
        assert set(group_of) <= set(names), "weights.groups names an unknown expert"
        labels: list[str] = []
        index = []
        for name in names:
            label = group_of.get(name, name)
            if label not in labels:
                labels.append(label)
            index.append(labels.index(label))
        return cls(tuple(names), tuple(labels), tuple(index))

    @property
    def members(self) -> dict[str, list[str]]:
        """Each group's experts, in the experts' order."""
        out: dict[str, list[str]] = {label: [] for label in self.labels}
        for name, g in zip(self.names, self.index):
            out[self.labels[g]].append(name)
        return out

    @property
    def size(self) -> int:
        """Logits of the two-level parametrisation: one per group, then one per expert."""
        return len(self.labels) + len(self.names)

    # -- the gradient strategy's parametrisation ------------------------------------------------
    def weights(self, z: torch.Tensor) -> torch.Tensor:
        """w = softmax(u)[g(i)] · softmax_g(v)[i] for z = [u, v]; differentiable in both levels."""
        n_groups = len(self.labels)
        u, v = z[:n_groups], z[n_groups:]
        idx = torch.tensor(self.index, device=z.device)
        # the within-softmax is invariant to a per-group offset: the max is only for stability
        peak = torch.full((n_groups,), -math.inf, dtype=z.dtype, device=z.device)
        peak = peak.scatter_reduce(0, idx, v.detach(), "amax")
        e = torch.exp(v - peak[idx])
        total = torch.zeros(n_groups, dtype=z.dtype, device=z.device).index_add(0, idx, e)
        return torch.softmax(u, dim=-1)[idx] * (e / total[idx])

    def initial_logits(self, w: torch.Tensor | None) -> torch.Tensor:
        """z = [u, v] with self.weights(z) = w (zero weights floored at MIN_WEIGHT), each level
        centred. None: z = 0, every group the same share and every expert the same share within its
        group (with singleton groups the flat fit's uniform start)."""
        if w is None:
            return torch.zeros(self.size, dtype=torch.float64)
        w = w.double()
        n_groups, idx = len(self.labels), torch.tensor(self.index)
        shares = torch.zeros(n_groups, dtype=torch.float64).index_add(0, idx, w)
        u = torch.log(shares.clamp_min(MIN_WEIGHT))
        within = torch.log((w / shares.clamp_min(MIN_WEIGHT)[idx]).clamp_min(MIN_WEIGHT))
        centre = torch.zeros(n_groups, dtype=torch.float64).index_add(0, idx, within)
        counts = torch.zeros(n_groups, dtype=torch.float64).index_add(0, idx, torch.ones_like(w))
        return torch.cat([u - u.mean(), within - (centre / counts)[idx]])

    def flat_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Per-expert logits with softmax = self.weights(z): u_g(i) + log softmax_g(v)[i]
        (mixture.json's ``logits``; with singleton groups exactly u, the flat fit's logits)."""
        n_groups = len(self.labels)
        u, v = z[:n_groups].double(), z[n_groups:].double()
        idx = torch.tensor(self.index, device=z.device)
        peak = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=z.device)
        peak = peak.scatter_reduce(0, idx, v, "amax")
        e = torch.exp(v - peak[idx])
        total = torch.zeros(n_groups, dtype=torch.float64, device=z.device).index_add(0, idx, e)
        return u[idx] + (v - peak[idx]) - torch.log(total)[idx]

    def restrict(self, positions: Sequence[int]) -> Groups:
        """The partition of the experts at ``positions`` (e.g. the free ones), groups left empty
        dropped; a constrained Dirichlet draw shares out the free mass by it."""
        names = [self.names[i] for i in positions]
        spec: dict[str, list[str]] = {}
        for i in positions:
            spec.setdefault(self.labels[self.index[i]], []).append(self.names[i])
        return Groups.build(names, {label: m for label, m in spec.items() if m != [label]})

    # -- both levels of a mixture -----------------------------------------------------------------
    def shares(self, w: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group shares s_g = Σ_{i∈g} w_i, shares within c_i = w_i / s_g(i)); c is NaN in a group
        of share 0, where no share within is defined."""
        w = np.asarray(w, dtype=np.float64)
        idx = np.asarray(self.index)
        s = np.zeros(len(self.labels))
        np.add.at(s, idx, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            within = np.where(s[idx] > 0, w / s[idx], np.nan)
        return s, within

    def record(self, w: Sequence[float] | np.ndarray, z: torch.Tensor | None = None) -> dict:
        """mixture.json's ``groups`` (:class:`mergeopt.run_files.MixtureGroup` per group): both
        levels of ``w``, and with the gradient strategy's ``z`` its two levels of logits."""
        s, within = self.shares(w)
        n_groups = len(self.labels)
        out = {}
        for g, (label, members) in enumerate(self.members.items()):
            entry: dict = {
                "share": float(s[g]),
                "within": {
                    n: (None if math.isnan(c) else float(c))
                    for n, c in zip(self.names, within)
                    if n in members
                },
            }
            if z is not None:
                entry["logit"] = float(z[g])
                entry["within_logits"] = {
                    n: float(z[n_groups + i]) for i, n in enumerate(self.names) if n in members
                }
            out[label] = entry
        return out


def groups_of(names: Sequence[str], spec: Mapping[str, Sequence[str]] | None) -> Groups | None:
    """The recipe's ``weights.groups`` over ``names``, or None without any (a flat mixture)."""
    return Groups.build(names, spec) if spec else None
