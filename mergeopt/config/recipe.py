"""The recipe: every section in one frozen model, and the checks that span sections (names that
must agree, constraints that must be feasible, an objective the strategy can optimise).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from mergeopt.config.base import PathText, Section, says_test_split
from mergeopt.config.data import DataSection
from mergeopt.config.model import MergeSection, ModelSection
from mergeopt.config.objective import RESERVED_COLUMNS, ObjectiveSection
from mergeopt.config.runs import (
    CalibrateSection,
    RankSection,
    TrainSection,
    WorldSection,
)
from mergeopt.config.search import OptimSection, SearchSection
from mergeopt.config.tracking import LoggingSection
from mergeopt.config.weights import WeightsSection
from mergeopt.inputs import MAX_SEED
from mergeopt.merging.constraints import FeasibleSet, repetition_caps
from mergeopt.merging.simplex import mixture_problem, snap_roundoff


class Recipe(Section):
    """A whole run: the checkpoints, the dev sets, what is scored, how it is searched, and where it goes."""

    seed: int = Field(
        default=0,
        ge=0,
        le=MAX_SEED,
        description="Seeds the dev-set split, the batch order and every random draw.",
    )
    output_dir: PathText = Field(
        default="runs/default",
        description="The run directory (relative paths are relative to the working directory).",
    )
    device: str = Field(
        default="auto",
        description="auto (cuda when available, else cpu), cpu, cuda, cuda:N; under torchrun cuda gives each "
        "rank its LOCAL_RANK's GPU. mps is refused: it lacks the float64 of the logits' and losses' sums.",
    )
    deterministic: bool = Field(
        default=False,
        description="torch's deterministic algorithms and CUBLAS_WORKSPACE_CONFIG=:4096:8 (fit and train): "
        "bit-identical runs on one GPU, slower.",
    )
    allow_test_split: bool = Field(
        default=False,
        description="Fit on a benchmark's test split: an lm_eval term whose task is scored on its "
        "test_split, or a dev set whose name, file name or folder says 'test' (gsm8k_test.jsonl, "
        "mmlu/test/). Refused by default, as mergekit-evolve refuses it: a mixture tuned on a test set "
        "reports a score it will not get.",
    )
    model: ModelSection
    data: DataSection
    weights: WeightsSection = WeightsSection()
    optim: OptimSection = OptimSection()
    merge: MergeSection = MergeSection()
    objective: ObjectiveSection = ObjectiveSection()
    search: SearchSection = SearchSection()
    world: WorldSection = WorldSection()
    train: TrainSection | None = None
    rank: RankSection = RankSection()
    calibrate: CalibrateSection = CalibrateSection()
    logging: LoggingSection = LoggingSection()

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device == "mps":  # refused rather than half-working: MPS has no float64
            raise ValueError(
                "device 'mps' is not supported: mergeopt keeps the mixture logits, their optimizer and "
                "the loss sums in float64, which Apple's MPS lacks; use device=cpu"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
        return device

    @model_validator(mode="after")
    def _init_matches_experts(self) -> Recipe:
        init = self.weights.init
        if init is None:
            return self
        experts = set(self.model.experts)
        if set(init) != experts:
            raise ValueError(f"weights.init names {sorted(init)} but the experts are {sorted(experts)}")
        if (problem := mixture_problem(init)) is not None:
            raise ValueError(f"weights.init is not a mixture: {problem}")
        init.update(snap_roundoff(init))
        return self

    @model_validator(mode="after")
    def _constraints_are_feasible(self) -> Recipe:
        """Names, pins within bounds and Σlo ≤ 1 ≤ Σhi, checked here when every cap is known
        (token counts from train.data are checked once counted, before anything is written)."""
        w = self.weights
        experts = self.expert_names
        for key in ("bounds", "pinned", "tokens", "samples"):
            unknown = sorted(set(getattr(w, key) or {}) - set(experts))
            if unknown:
                raise ValueError(
                    f"weights.{key} names {unknown[0]!r}, which is not an expert ({', '.join(experts)})"
                )
        uncounted = [n for n in experts if n not in w.source_sizes]
        if w.max_epochs is not None and uncounted and self.train is None:
            raise ValueError(
                f"weights.max_epochs needs each source's {w.unit}, but none are given for {uncounted[0]!r}: "
                f"set weights.{w.unit} or train.data"
            )
        known = w.max_epochs is not None and not uncounted
        caps = repetition_caps(w.max_epochs, w.cap_budget, w.source_sizes) if known else None
        feasible = FeasibleSet.build(experts, w.bounds, w.pinned, caps)
        if (problem := feasible.problem()) is not None:
            raise ValueError(f"weights: no mixture meets the constraints: {problem}")
        if w.init is not None and (outside := feasible.violation(w.init)) is not None:
            raise ValueError(f"weights.init breaks the constraints: {outside}")
        return self

    @model_validator(mode="after")
    def _groups_name_experts(self) -> Recipe:
        """Groups hold known experts; a label is not another expert's name (mixture.json, report.md
        and the exports list groups and experts side by side)."""
        w, experts = self.weights, self.expert_names
        for label, members in w.groups.items():
            unknown = [m for m in members if m not in experts]
            if unknown:
                raise ValueError(
                    f"weights.groups {label!r} names {unknown[0]!r}, which is not an expert ({', '.join(experts)})"
                )
            if label in experts and members != [label]:
                raise ValueError(
                    f"weights.groups {label!r} is also an expert's name but holds {members}: rename the group"
                )
        return self

    @model_validator(mode="after")
    def _train_matches_experts(self) -> Recipe:
        if self.train is None:
            return self
        if set(self.train.data) != set(self.model.experts):
            raise ValueError(
                f"train.data names {sorted(self.train.data)} but the experts are {sorted(self.model.experts)}"
            )
        experts = set(self.model.experts)
        for i, mixture in enumerate(self.train.mixtures.weights):
            if set(mixture) != experts:
                missing, unknown = sorted(experts - set(mixture)), sorted(set(mixture) - experts)
                what = [f"lacks {missing} (give every expert, 0 included)"] if missing else []
                what += (
                    [f"names {unknown}, not experts (the experts are {sorted(experts)})"] if unknown else []
                )
                raise ValueError(f"train.mixtures.weights[{i}] " + " and ".join(what))
            if (problem := mixture_problem(mixture)) is not None:
                raise ValueError(f"train.mixtures.weights[{i}] is not a mixture: {problem}")
            mixture.update(snap_roundoff(mixture))
        if self.train.mixtures.kind == "list" and not self.train.mixtures.weights:
            raise ValueError("train.mixtures.kind is 'list' but train.mixtures.weights is empty")
        _check_interior_lattice(self.train.mixtures, len(experts))
        return self

    @model_validator(mode="after")
    def _objective_fits_data(self) -> Recipe:
        names = {d.name for d in self.data.dev}
        labels = []
        for i, term in enumerate(self.objective.terms):
            if term.dev != "all" and term.dev not in names:
                raise ValueError(
                    f"objective.terms[{i}].dev {term.dev!r} is not a dev set ({', '.join(sorted(names))})"
                )
            labels.append(term.label)
        if self.search.strategy != "gradient":
            self._no_term_named_like_a_journal_column()
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"objective term names must be unique (set name:), repeated: {', '.join(dupes)}")
        differentiable = all(t.kind == "loss" for t in self.objective.terms)
        if self.search.strategy == "gradient" and not differentiable:
            kinds = sorted({t.kind for t in self.objective.terms if t.kind != "loss"})
            raise ValueError(
                f"search.strategy 'gradient' needs a differentiable objective, but the terms include {', '.join(kinds)}"
                " (use grid, dirichlet, cmaes, spsa or surrogate)"
            )
        if self.search.strategy == "gradient" and self.search.budget is not None:
            raise ValueError(
                "search.budget counts evaluations of the zero-order strategies; the gradient strategy's "
                "budget is optim.steps"
            )
        if self.search.strategy == "gradient" and self.objective.normalize != "none":
            raise ValueError("objective.normalize 'experts' needs a zero-order search.strategy")
        self._budget_covers_the_search()
        return self

    def input_paths(self, experts: bool = True) -> dict[str, str | None]:
        """What a run of this recipe reads, by the key that names it (the directories among them
        must not hold a command's outputs); without ``experts`` for train, which writes them."""
        paths: dict[str, str | None] = {
            "model.base": self.model.base,
            "data.chat_template": self.data.chat_template,
        }
        if experts:
            paths |= {f"model.experts.{name}": path for name, path in self.model.experts.items()}
        paths |= {f"data.dev set {d.name!r}": d.path for d in self.data.dev}
        if self.train is not None:
            paths |= {f"train.data.{name}": path for name, path in self.train.data.items()}
        return paths

    def _no_term_named_like_a_journal_column(self) -> None:
        """A zero-order search journals each term's score in a column named after it, beside index,
        phase, value, seconds and w_<expert>: a term named one of those stopped the search at its
        first mixture with a traceback, once the model was loaded."""
        for i, term in enumerate(self.objective.terms):
            if term.name is not None and (term.name in RESERVED_COLUMNS or term.name.startswith("w_")):
                raise ValueError(
                    f"objective.terms[{i}].name {term.name!r} is a column of the search's evaluations.csv "
                    f"({', '.join(RESERVED_COLUMNS)}, w_<expert>): rename the term"
                )

    def _budget_covers_the_search(self) -> None:
        """A budget that cannot cover the evaluations the search must make, refused when the recipe
        is read: the search itself refuses it only once the model is loaded and the experts of an
        ``objective.normalize: experts`` are scored, each a full dev-set evaluation."""
        s, k = self.search, len(self.model.experts)
        if s.budget is None or s.strategy == "gradient":
            return
        experts = k if self.objective.normalize == "experts" else 0
        if s.budget < experts:
            raise ValueError(
                f"search.budget {s.budget} cannot even score the {k} experts that objective.normalize "
                "'experts' needs"
            )
        if s.strategy != "surrogate":
            return
        parts = [("seeds", s.surrogate.seeds), ("verify", s.surrogate.verify)]
        parts += [("the start (weights.init)", 1)] if self.weights.init is not None else []
        parts += [("the experts objective.normalize 'experts' scores", experts)] if experts else []
        needed = sum(n for _, n in parts)
        if s.budget < needed:
            raise ValueError(
                f"search.budget {s.budget} is smaller than the surrogate's "
                f"{' + '.join(what for what, _ in parts)} ({' + '.join(str(n) for _, n in parts)} = {needed})"
            )

    @model_validator(mode="after")
    def _no_test_split_dev_sets(self) -> Recipe:
        if self.allow_test_split:
            return self
        for d in self.data.dev:
            if (where := says_test_split(d.name, d.path)) is not None:
                raise ValueError(
                    f"dev set {d.name!r} ({d.path}) looks like a benchmark's test split ({where}); a "
                    "mixture tuned on it reports a score it will not get. Fit on a validation split, or "
                    "set allow_test_split: true"
                )
        return self

    @property
    def expert_names(self) -> list[str]:
        return list(self.model.experts)


def _check_interior_lattice(mixtures, experts: int) -> None:
    """An interior-only lattice has a point only when divisions >= the number of experts (every
    weight at least 1/divisions). With fewer, train found no mixture, trained nothing and replaced
    grid.csv with its header alone, exit 0: an earlier grid's rows were gone."""
    if mixtures.kind == "lattice" and mixtures.interior_only and mixtures.divisions < experts:
        raise ValueError(
            f"train.mixtures: an interior_only lattice of divisions {mixtures.divisions} over {experts} "
            f"experts holds no mixture (every weight > 0 needs divisions >= {experts})"
        )
