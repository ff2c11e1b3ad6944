"""mixture.json: the recommended mixture, the constraints it meets and the evidence for it.

Written last by ``mergeopt fit``; read by ``mergeopt merge``, ``mergeopt export``, the report and the
analysis notebook. Its validators check what every reader relies on: the weights lie on the simplex
inside the constraints' box, and a hierarchical mixture's two levels agree with the weights.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.simplex import SIMPLEX_TOLERANCE, mixture_problem, snap_roundoff
from mergeopt.run_files.base import RunFile


class MixtureConstraints(BaseModel):
    """The constraints a fit's mixture meets (the recipe's weights.bounds, pinned and max_epochs).

    ``lower`` and ``upper`` are the box they make, what every reader checks the weights (and an
    export its shares) against; the rest says where each limit came from.
    """

    model_config = ConfigDict(extra="forbid")

    lower: dict[str, float] = Field(description="Each expert's least weight (its bound or pin).")
    upper: dict[str, float] = Field(
        description="Each expert's greatest weight: the least of its bound, pin and repetition cap."
    )
    upper_from: dict[str, str] = Field(
        description="What set each upper limit: bound, pinned, cap, or '' (none: 1)."
    )
    bounds: dict[str, list[float]] = Field(description="weights.bounds as the recipe gave them.")
    pinned: dict[str, float] = Field(description="weights.pinned as the recipe gave them.")
    max_epochs: float | None = Field(default=None, description="weights.max_epochs: the repetition cap R.")
    token_budget: int | None = Field(
        default=None, description="weights.token_budget: the budget B in tokens."
    )
    tokens: dict[str, int] | None = Field(
        default=None, description="Training tokens T_i of each source (given or counted); cap R·T_i/B."
    )
    sample_budget: int | None = Field(
        default=None, description="weights.sample_budget: the budget S in samples (weights.unit: samples)."
    )
    samples: dict[str, int] | None = Field(
        default=None, description="Training samples N_i of each source (given or counted); cap R·N_i/S."
    )

    @model_validator(mode="after")
    def _one_unit(self) -> MixtureConstraints:
        counted = [k for k in ("token_budget", "tokens", "sample_budget", "samples") if getattr(self, k)]
        if {"token_budget", "tokens"} & set(counted) and {"sample_budget", "samples"} & set(counted):
            raise ValueError(f"a repetition cap counts tokens or samples, not both ({', '.join(counted)})")
        return self

    @property
    def cap_unit(self) -> str:
        """What the repetition cap counts: samples where the fit recorded a sample budget, else tokens."""
        return "samples" if self.sample_budget is not None else "tokens"

    def source_sizes(self) -> dict[str, int]:
        """Each source's size as the fit recorded it, in the cap's unit (empty without a cap)."""
        return dict((self.samples if self.cap_unit == "samples" else self.tokens) or {})

    def feasible_set(self) -> FeasibleSet:
        names = tuple(self.lower)
        return FeasibleSet(
            names,
            tuple(self.lower[n] for n in names),
            tuple(self.upper[n] for n in names),
            tuple(self.upper_from.get(n, "") for n in names),
        )


class MixtureGroup(BaseModel):
    """One group of a hierarchical mixture (``weights.groups``): its share and its experts' shares within it.

    Both levels are recomputed from the weights (share = the sum of its experts' weights, share
    within = weight / share), so w_i = share × within_i; readers check that they agree with the weights.
    """

    model_config = ConfigDict(extra="forbid")

    share: float = Field(description="The group's share of the mixture: the sum of its experts' weights.")
    within: dict[str, float | None] = Field(
        description="Each of the group's experts: its share within the group (weight / share); null "
        "when the group's share is 0, where none is defined."
    )
    logit: float | None = Field(
        default=None,
        description="Gradient strategy without bounds, pins or caps: the fitted group logit (under "
        "constraints the fit steps on the experts' logits, mixture.json's logits).",
    )
    within_logits: dict[str, float] | None = Field(
        default=None,
        description="Gradient strategy without bounds, pins or caps: the fitted logits within the "
        "group, per expert.",
    )


class MixtureFile(RunFile):
    """mixture.json: the recommended mixture and the evidence for it, written last by ``mergeopt fit``."""

    FILE: ClassVar[str] = "mixture.json"

    status: str = Field(description="'complete' once the fit has finished (written last).")
    # strict: a weight written as a string ("0.5") or a boolean is a malformed file, not a number
    weights: dict[str, StrictFloat] = Field(
        description="The recommended mixture {expert: w}, on the simplex."
    )
    unit: Literal["tokens", "samples"] | None = Field(
        default=None,
        description="weights.unit: what each weight is a share of, training tokens or samples; "
        "mergeopt export reads the weights in it. Absent in files from before it was recorded, which "
        "export reads as tokens.",
    )
    constraints: MixtureConstraints | None = Field(
        default=None, description="The constraints the weights meet; absent when the recipe set none."
    )
    groups: dict[str, MixtureGroup] | None = Field(
        default=None,
        description="A hierarchical mixture (weights.groups): each group's share and its experts' shares "
        "within it (experts no group named are groups of their own); absent for a flat mixture.",
    )
    target: str | None = Field(default=None, description="data.target: the dev set(s) the loss targets.")
    dev_loss: float | None = Field(default=None, description="Target dev loss of the merge at the weights.")
    heldout_loss: float | None = Field(default=None, description="The same on the held-out parts.")
    uniform_dev_loss: float | None = None
    uniform_heldout_loss: float | None = None
    expert_dev_loss: dict[str, float | None] | None = Field(
        default=None, description="Each expert alone (w one-hot)."
    )
    expert_heldout_loss: dict[str, float | None] | None = None
    per_set_dev_loss: dict[str, dict[str, float | None]] | None = Field(
        default=None, description="Per dev set: the fitted mixture, the uniform one and each expert."
    )
    strategy: str | None = Field(default=None, description="search.strategy.")
    search: dict[str, Any] | None = Field(
        default=None, description="What the search did (strategy-specific)."
    )
    method: dict[str, Any] | None = Field(
        default=None, description="The merge and its options (seed and mixup draw when random)."
    )
    objective: dict[str, Any] | None = Field(
        default=None, description="The terms, their normalisation and (zero-order) the scores."
    )
    seed: int | None = None
    device: str | None = None
    processes: int | None = Field(default=None, description="torchrun processes (1 without torchrun).")
    shard: str | None = Field(default=None, description="model.shard: none, or fsdp.")
    stack: dict[str, Any] | None = Field(
        default=None,
        description=(
            "What was stacked: tensors, parameters and bytes, layout counts and dtypes. With shard "
            "fsdp, parameters and bytes are one rank's share (rank 0's: its block of every matrix, "
            "padded to ceil(rows / processes), and every vector whole), as the plan's per-rank rows."
        ),
    )
    worlds: dict[str, str] | None = Field(
        default=None, description="Built-in worlds used: name -> cache dir."
    )
    mergeopt_version: str | None = None
    logits: dict[str, float] | None = Field(
        default=None, description="Gradient strategy: the fitted logits z."
    )
    rank: dict[str, Any] | None = Field(
        default=None, description="With rank.grid: the rank check against trained mixtures."
    )
    calibration: dict[str, Any] | None = Field(
        default=None,
        description="Written by `mergeopt calibrate` (strategy 'calibrate'): role 'pick' or 'next', the "
        "grid and the number of real runs it was calibrated on, and the calibrated prediction.",
    )

    @field_validator("weights")
    @classmethod
    def _on_the_simplex(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("no experts")
        problem = mixture_problem(weights)
        if problem is not None:
            raise ValueError(problem)
        return snap_roundoff(weights)

    @model_validator(mode="after")
    def _within_constraints(self) -> MixtureFile:
        if self.constraints is None:
            return self
        if set(self.constraints.lower) != set(self.weights):
            raise ValueError(
                f"constraints name {sorted(self.constraints.lower)} but the weights {sorted(self.weights)}"
            )
        if (outside := self.constraints.feasible_set().violation(self.weights)) is not None:
            raise ValueError(f"the weights break the recorded constraints: {outside}")
        capped = self.constraints.max_epochs is not None
        if capped and self.unit is not None and self.constraints.cap_unit != self.unit:
            raise ValueError(
                f"the repetition cap counts {self.constraints.cap_unit} but the weights are "
                f"{self.unit[:-1]} shares (unit {self.unit})"
            )
        return self

    @model_validator(mode="after")
    def _groups_agree_with_weights(self) -> MixtureFile:
        if self.groups is None:
            return self
        members = [n for g in self.groups.values() for n in g.within]
        if sorted(members) != sorted(self.weights):
            raise ValueError(f"groups hold {sorted(members)} but the weights name {sorted(self.weights)}")
        for label, group in self.groups.items():
            total = math.fsum(self.weights[n] for n in group.within)
            if not abs(group.share - total) <= SIMPLEX_TOLERANCE:  # NaN fails too
                raise ValueError(
                    f"group {label!r} has share {group.share:.9g} but its weights sum to {total:.9g}"
                )
            for name, within in group.within.items():
                if (
                    within is not None
                    and not abs(group.share * within - self.weights[name]) <= SIMPLEX_TOLERANCE
                ):
                    raise ValueError(
                        f"group {label!r}: share {group.share:.9g} x {name!r}'s share within {within:.9g} "
                        f"is not its weight {self.weights[name]:.9g}"
                    )
        return self

    @property
    def names(self) -> list[str]:
        return list(self.weights)
