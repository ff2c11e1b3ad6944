"""What a run scores, resolved once from the recipe: the one part of it that scoring code receives.

The command layer (``mergeopt fit``, ``mergeopt rank``, ``mergeopt train``) builds one
:class:`Objective` from its resolved recipe with :meth:`Objective.from_recipe` and hands it down to
loading, scoring, the zero-order search and the rank check, so none of them reads the recipe. It
holds the terms with the default applied (without any, the dev loss of ``data.target``), the dev
sets' names and data weights, the target, the normalisation of the utility and the evaluation
batch size; the set weights each consumer needs are derived here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mergeopt.config import ObjectiveTerm

if TYPE_CHECKING:
    from mergeopt.config import Recipe


@dataclass(frozen=True)
class Objective:
    """The objective of a run: its terms over the named dev sets, and how they are evaluated."""

    terms: tuple[ObjectiveTerm, ...]  # from_recipe applies the default loss term
    dev_names: tuple[str, ...]  # the dev sets, in the recipe's order
    dev_weights: tuple[float, ...]  # d_s: each set's weight in a loss over 'all' sets
    target: str  # data.target: 'all' or a dev set's name
    normalize: Literal["none", "experts"]  # objective.normalize
    batch_size: int  # optim.eval_batch_size: examples per evaluation batch

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Objective:
        """The recipe's objective; the only place its objective, data and batch-size keys are read."""
        terms = recipe.objective.terms or (ObjectiveTerm(kind="loss", dev=recipe.data.target),)
        return cls(
            terms=tuple(terms),
            dev_names=tuple(d.name for d in recipe.data.dev),
            dev_weights=tuple(d.weight for d in recipe.data.dev),
            target=recipe.data.target,
            normalize=recipe.objective.normalize,
            batch_size=recipe.optim.eval_batch_size,
        )

    @property
    def metric_terms(self) -> tuple[ObjectiveTerm, ...]:
        """The non-loss terms: scored on a model holding the merge, one ``score_<label>`` column each."""
        return tuple(t for t in self.terms if t.kind != "loss")

    @property
    def losses_only(self) -> bool:
        return all(t.kind == "loss" for t in self.terms)

    def data_weights(self) -> torch.Tensor:
        """d_s: each dev set's weight in a loss term over 'all' sets."""
        return torch.tensor(self.dev_weights, dtype=torch.float32)

    def loss_set_weights(self) -> torch.Tensor:
        """a_s such that Σ_s a_s L_s / Σ a_s is the objective, when every term is a loss.

        Without terms this is data.target's weighting (the data weights of the targeted sets). With
        loss terms, term j (weight u_j) puts u_j on its set, or u_j · d_s / Σ d over all sets for 'all',
        so the gradient strategy fits the same weighted macro-average the zero-order ones search.
        """
        d = self.data_weights()
        if not self.losses_only:
            raise ValueError("loss_set_weights needs an objective made of loss terms only")
        a = torch.zeros(len(self.dev_names), dtype=torch.float32)
        for term in self.terms:
            if term.dev == "all":
                a += term.weight * d / d.sum()
            else:
                a[self.dev_names.index(term.dev)] += term.weight
        return a

    def reported_set_weights(self) -> torch.Tensor:
        """The weights of the dev loss a run reports: the objective's own when it is made of losses;
        with metric terms, the data weights of the sets ``data.target`` names."""
        if self.losses_only:
            return self.loss_set_weights()
        return torch.tensor(
            [w if self.target in ("all", n) else 0.0 for n, w in zip(self.dev_names, self.dev_weights)],
            dtype=torch.float32,
        )
