"""The weights section: where the search starts on the simplex, and the constraints (bounds, pins,
repetition caps, groups) every mixture it returns meets.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mergeopt.config.base import Section, check_name
from mergeopt.merging.simplex import ROUNDOFF, SIMPLEX_TOLERANCE

CAP_KEYS = {"tokens": ("token_budget", "tokens"), "samples": ("sample_budget", "samples")}  # by weights.unit


class WeightsSection(Section):
    """Where the search starts on the simplex, and the constraints every mixture it returns meets
    (mergeopt.merging.constraints: bounds, pins and repetition caps make one box on the simplex)."""

    unit: Literal["tokens", "samples"] = Field(
        default="tokens",
        description="What a mixture weight is a share of: training tokens (tokens, as pretraining "
        "frameworks blend and as RegMix's runs are mixed) or training samples "
        "(samples, as interleave_datasets' probabilities). mergeopt train draws each example's domain "
        "so that its runs train on these shares (tokens: domain i is drawn with probability "
        "proportional to w_i over its mean tokens per example); mixture.json records it, and "
        "mergeopt export reads its weights in this unit. The grid runs a fit is ranked against must "
        "be mixed in the same unit, and a repetition cap (max_epochs) counts its budget and sources "
        "in it.",
    )
    init: dict[str, float] | None = Field(
        default=None,
        description="Starting mixture {expert: w}, uniform when absent (with constraints: the most "
        "uniform feasible mixture). Every strategy starts from it: "
        "the gradient's and SPSA's first point, CMA-ES's initial mean; grid, dirichlet and surrogate "
        "evaluate it first, so no search returns a mixture its objective scores worse.",
    )
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Per-expert bounds {expert: [lo, hi]} on its weight, 0 <= lo <= hi <= 1; experts "
        "not named are free in [0, 1]. Every strategy returns a mixture within them.",
    )
    pinned: dict[str, float] = Field(
        default_factory=dict,
        description="Weights fixed in advance {expert: w}, each in [0, 1]; the other experts share "
        "1 - the pinned sum.",
    )
    max_epochs: float | None = Field(
        default=None,
        gt=0.0,
        description="Repetition cap R: no training source may be repeated more than R epochs in "
        "the training run's budget, counted in weights.unit. In tokens: w_i <= R * T_i / token_budget "
        "for source i of T_i tokens; in samples: w_i <= R * N_i / sample_budget for source i of N_i "
        "samples (Olmix caps at 5). Needs the budget, and each source's size: weights.tokens "
        "(weights.samples), or counted from train.data as mergeopt export counts it (with the base's "
        "tokenizer) before the fit loads its model.",
    )
    token_budget: int | None = Field(
        default=None, gt=0, description="With max_epochs in tokens: the training run's budget B in tokens."
    )
    tokens: dict[str, int] | None = Field(
        default=None,
        description="With max_epochs in tokens: training tokens T_i of each expert's source "
        "{expert: T_i}; experts not named are counted from train.data.",
    )
    sample_budget: int | None = Field(
        default=None,
        gt=0,
        description="With max_epochs and weights.unit: samples: the training run's budget S in samples.",
    )
    samples: dict[str, int] | None = Field(
        default=None,
        description="With max_epochs and weights.unit: samples: training samples N_i of each expert's "
        "source {expert: N_i}; experts not named are counted from train.data.",
    )

    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Hierarchical mixture {group: [expert, ...]}: experts grouped into domains, w_i = "
        "the group's share times the expert's share within it. Experts no group names are each a group "
        "of their own, named after the expert. The gradient strategy learns both levels "
        "(softmax over group logits times softmax within each group; it starts with every group "
        "equal); dirichlet and surrogate draw a Dirichlet over the groups times one within each; "
        "mixture.json, report.md and the exports report both levels. With bounds, pins or caps, "
        "dirichlet and surrogate share out what the lower bounds and pins leave by the same "
        "hierarchical draw, conditioned on the box, and the gradient strategy steps on the "
        "experts' logits (one level) from the hierarchy's start.",
    )

    @field_validator("groups")
    @classmethod
    def _groups_partition(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for label, members in groups.items():
            check_name(label, "group name")
            if not members:
                raise ValueError(f"group {label!r} is empty; a group holds at least one expert")
            for expert in members:
                if expert in seen:
                    where = (
                        f"both {seen[expert]!r} and {label!r}"
                        if seen[expert] != label
                        else f"{label!r} twice"
                    )
                    raise ValueError(f"expert {expert!r} is in {where}; an expert belongs to one group")
                seen[expert] = label
        return groups

    @field_validator("bounds")
    @classmethod
    def _bounds_in_unit_interval(cls, bounds: dict[str, tuple[float, float]]) -> dict:
        snapped = {}
        for name, (lo, hi) in bounds.items():
            # a hair outside [0, 1] is round-off (a bound written as 1 − Σ others), read as 0 or 1
            lo, hi = (_within_unit_roundoff(v) for v in (lo, hi))
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
                raise ValueError(f"{name!r} has bounds [{lo:g}, {hi:g}]; they need 0 <= lo <= hi <= 1")
            snapped[name] = (lo, hi)
        return snapped

    @field_validator("pinned")
    @classmethod
    def _pins_in_unit_interval(cls, pinned: dict[str, float]) -> dict[str, float]:
        pinned = {name: _within_unit_roundoff(value) for name, value in pinned.items()}
        for name, value in pinned.items():
            if not math.isfinite(value) or value > 1.0:
                raise ValueError(f"{name!r} is pinned at {value:g}, above 1 (a weight is in [0, 1])")
            if value < 0.0:  # beyond round-off (a hair below 0 was read as 0 above)
                raise ValueError(f"{name!r} is pinned at {value:g}, below 0 (a weight is in [0, 1])")
        if math.fsum(pinned.values()) > 1.0 + SIMPLEX_TOLERANCE:
            raise ValueError(f"the pinned weights sum to {math.fsum(pinned.values()):g}, above 1")
        return pinned

    @field_validator("tokens", "samples")
    @classmethod
    def _positive_sizes(cls, sizes: dict[str, int] | None, info) -> dict[str, int] | None:
        for name, count in (sizes or {}).items():
            if count <= 0:
                raise ValueError(f"{name!r} has {count} {info.field_name}; a source has at least 1")
        return sizes

    @model_validator(mode="after")
    def _cap_parts_together(self) -> WeightsSection:
        if self.max_epochs is None:
            for key in ("token_budget", "tokens", "sample_budget", "samples"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"weights.{key} is only used by a repetition cap: set weights.max_epochs"
                    )
            return self
        budget, sizes = CAP_KEYS[self.unit]
        if getattr(self, budget) is None:
            raise ValueError(
                f"weights.max_epochs caps repetition within weights.{budget} ({self.unit}, weights.unit): "
                "set it too"
            )
        for unit, keys in CAP_KEYS.items():
            for key in keys:
                if unit != self.unit and getattr(self, key) is not None:
                    raise ValueError(
                        f"weights.{key} counts {unit}, but the cap counts {self.unit} (weights.unit): "
                        f"set weights.{budget} and weights.{sizes} instead"
                    )
        return self

    @property
    def cap_budget(self) -> int | None:
        """The repetition cap's budget in weights.unit (None without a cap)."""
        return getattr(self, CAP_KEYS[self.unit][0])

    @property
    def source_sizes(self) -> dict[str, int]:
        """The sources' sizes the recipe gives, in weights.unit (weights.tokens or weights.samples)."""
        return dict(getattr(self, CAP_KEYS[self.unit][1]) or {})

    @property
    def constrained(self) -> bool:
        return bool(self.bounds or self.pinned or self.max_epochs is not None)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "temperature" in data:
            raise ValueError(
                "weights.temperature was removed: under Adam, a fit with temperature T is the fit with "
                "T = 1 and optim.lr divided by T; set optim.lr instead"
            )
        return data


def _within_unit_roundoff(value: float) -> float:
    """``value`` with round-off just outside [0, 1] (within ROUNDOFF) read as 0 or 1."""
    if -ROUNDOFF <= value < 0.0:
        return 0.0
    if 1.0 < value <= 1.0 + ROUNDOFF:
        return 1.0
    return value
