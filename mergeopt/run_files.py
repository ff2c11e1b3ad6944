"""The files a run leaves behind, one pydantic model each: mixture.json, rank_report.json,
transfer_report.json, diagnose.json.

A run directory is a contract between the command that writes it and everything that reads it
later: ``mergeopt merge`` and ``mergeopt export`` read mixture.json, the report and the analysis
notebook read all three, and so do users' own scripts. So each file has one model here that the
writer validates through before it writes and every reader validates through after it reads, and a
``schema_version``. A file from a newer mergeopt (a larger ``schema_version``) is refused in one
line rather than misread; files written before versioning are read as version 1. The JSON Schemas
in the docs are generated from these models (``python -m mergeopt.run_files DIR``), so they cannot
drift from what is written.

Readers are tolerant within a version: keys an older 0.x release wrote and later dropped (e.g.
``temperature``) are kept aside as extras, not refused. Writers are not: a test checks that a fresh
run's files have no extra keys.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    field_validator,
    model_validator,
)

import mergeopt
from mergeopt.errors import UserError
from mergeopt.inputs import existing_file
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.simplex import SIMPLEX_TOLERANCE, mixture_problem

SCHEMA_VERSION = 1


class _RunFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    FILE: ClassVar[str]
    schema_version: int = Field(
        default=SCHEMA_VERSION, description="The file format's version; readers refuse a newer one."
    )

    def to_json(self) -> dict[str, Any]:
        """What the writer puts on disk: the fields it set, in declaration order, then any extras."""
        return self.model_dump(exclude_unset=True)


class RankStatistics(BaseModel):
    """How one proxy score ranks the mixtures that one true score ranks (``rank_statistics``)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(description="Mixtures compared.")
    higher_is_better: bool
    spearman: float | None = Field(description="Spearman's rho (null when undefined: a constant score).")
    kendall: float | None = Field(description="Kendall's tau-b.")
    spearman_ci: list[float | None] = Field(description="Percentile bootstrap interval [low, high].")
    kendall_ci: list[float | None]
    bootstrap_used: int = Field(description="Resamples used (constant ones are skipped).")
    pairwise_accuracy: float | None = Field(
        description="Share of mixture pairs ordered as the truth orders them."
    )
    k: int
    top1_hit: bool = Field(description="The proxy's favourite is a true best.")
    topk_hit: bool = Field(description="A true best is among the proxy's k favourites.")
    topk_overlap: float = Field(description="Share of the proxy's top k in the truth's top k.")
    regret: float | None = Field(description="True score lost by the proxy's pick, over the true range.")
    proxy_best_row: int
    true_best_row: int


class TransferStatistics(RankStatistics):
    """:class:`RankStatistics` plus where the proxy's favourite lands among the true scores."""

    regret_raw: float | None = Field(
        description="True score lost by the proxy's pick, in the metric's units."
    )
    choice_rank: int = Field(description="The pick's place among the true scores (1 = best).")
    choice: str = Field(description="The proxy's pick (a row label).")
    best: str = Field(description="The truly best mixture (a row label).")
    choice_true_score: float | None
    best_true_score: float | None


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


class MixtureFile(_RunFile):
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
    stack: dict[str, Any] | None = Field(default=None, description="Stack size and dtypes.")
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
        return weights

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


class RankReport(_RunFile):
    """rank_report.json: how the proxy ranks mixtures against real runs (``mergeopt rank``, or fit's rank.grid)."""

    FILE: ClassVar[str] = "rank_report.json"

    grid: str | None = Field(default=None, description="Grid mode: the grid table of trained mixtures.")
    target: str | None = None
    proxy: str | None = Field(default=None, description="Table mode: the proxy table.")
    truth: str | None = Field(default=None, description="Table mode: the truth table.")
    mixture_columns: list[str] | None = Field(
        default=None, description="Table mode: the weight columns joined on."
    )
    overall: str | None = Field(default=None, description="The metric the headline numbers are about.")
    n_mixtures: int | dict[str, int | None] | None = None
    options: dict[str, Any] = Field(description="k, n_bootstrap, seed, confidence.")
    metrics: dict[str, RankStatistics] = Field(description="One entry per compared metric.")
    fitted_mixture: dict[str, Any] | None = Field(
        default=None, description="Grid mode: the fitted mixture's nearest grid point and its regret."
    )
    baselines: dict[str, dict[str, RankStatistics]] | None = Field(
        default=None,
        description="Grid mode: the same statistics for each baseline (interpolation of the experts' "
        "scores; LightGBM and the mixing law, each leave-one-out on the grid's runs), per metric; "
        "bootstrap intervals for the target only.",
    )
    baselines_skipped: dict[str, str] | None = Field(
        default=None,
        description="Grid mode: baselines not computed, and why (the grid is too small for them, or "
        "rank.baselines leaves them out).",
    )
    note: str | None = None


class CalibratedMixture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float]
    source: str = Field(description="run (a grid row), expert, fit (the fit's mixture) or dirichlet.")
    predicted: float = Field(description="Calibrated posterior mean of the metric.")
    proxy: float = Field(description="The merged proxy's value of the metric.")


class CalibrationPick(CalibratedMixture):
    candidate: int = Field(description="Row of the candidate in calibrated_ranking.csv's 'candidate'.")
    interval: list[float] = Field(description="95% posterior interval of its true value.")
    prob_best: float | None = Field(description="Posterior probability that it is the best candidate.")
    truth: float | None = Field(description="Its true value when it is one of the runs.")


class CalibrationProposal(CalibratedMixture):
    expected_improvement: float | None = Field(
        description="Expected improvement over the best run when proposed (null: no run yet, the proxy's pick)."
    )
    sd: float = Field(description="Posterior sd of its true value.")


class CalibrationReport(_RunFile):
    """calibration.json: the proxy calibrated on real runs (``mergeopt calibrate``)."""

    FILE: ClassVar[str] = "calibration.json"

    grid: str = Field(description="The grid table of real runs.")
    metric: str = Field(description="calibrate.metric: target, a dev set or an objective term.")
    higher_is_better: bool
    use_proxy: bool = Field(description="false: regression on the runs alone, without the proxy.")
    options: dict[str, Any] = Field(description="The calibrate section and the seed.")
    out: str = Field(description="Where the outputs were written.")
    runs: int = Field(description="Real runs the model was fitted to.")
    candidates: int = Field(description="Mixtures scored by the proxy (runs, experts, fit, Dirichlet).")
    model: dict[str, float] = Field(
        description="MAP hyper-parameters (in the proxy's spreads), the standardisation and the "
        "log marginal likelihood (mergeopt.evaluation.calibration)."
    )
    proxy_slope: dict[str, float] = Field(
        description="Posterior mean and sd of the proxy's slope b: how far its differences are trusted."
    )
    pick: CalibrationPick = Field(description="The candidate with the best calibrated value.")
    best_run: dict[str, Any] | None = Field(description="The best of the runs so far (grid row, 0-based).")
    proposals: list[CalibrationProposal] = Field(description="What to train next, in order.")


class TransferComparison(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy: str
    truth: str
    what: str
    n: int
    metrics: dict[str, TransferStatistics]


class TransferReport(_RunFile):
    """transfer_report.json: how a ranking of mixtures at one scale carries to another (``mergeopt transfer``)."""

    FILE: ClassVar[str] = "transfer_report.json"

    small: str | None
    large: str
    surrogate_fit: str | None
    mixture_columns: list[str]
    n_mixtures: dict[str, int | None]
    metrics: list[str]
    higher_is_better: list[str]
    skipped_metrics: dict[str, list[str]]
    aggregate: str | None
    options: dict[str, Any]
    surrogate: dict[str, Any] | None
    comparisons: dict[str, TransferComparison]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignConflicts(_Strict):
    """TIES sign conflicts of the task vectors, each trimmed to its top ``density`` by magnitude."""

    density: float = Field(
        description="The trim: each τ_i keeps its int(density · n) largest entries per tensor."
    )
    contested: int = Field(description="Entries where at least two trimmed task vectors are non-zero.")
    conflicting: int = Field(description="Contested entries whose non-zero values do not all share a sign.")
    rate: float | None = Field(description="conflicting / contested (null: nothing contested).")
    per_layer: list[float | None] = Field(description="The rate within each layer (``layers``' order).")
    pairwise: list[list[float | None]] = Field(
        description="Row i, column j: among entries non-zero in both τ_i and τ_j, the share of opposite signs."
    )


class TaskVectorDiagnostics(_Strict):
    """Norms and angles of τ_i = θ_i − θ0 (the prepared τ'_i for ties/dare) over the merged parameters."""

    vectors: Literal["task vectors", "prepared task vectors"] = Field(
        description="'prepared task vectors' when merge.method is ties or dare (what the proxy merges)."
    )
    entries: int = Field(description="Merged parameter entries counted.")
    base_norm: float = Field(description="‖θ0‖ over the merged parameters.")
    norm: dict[str, float] = Field(description="‖τ_i‖ per expert.")
    relative_norm: dict[str, float | None] = Field(description="‖τ_i‖ / ‖θ0‖ per expert.")
    relative_norm_per_layer: dict[str, list[float | None]] = Field(
        description="Per expert, ‖τ_i‖ / ‖θ0‖ within each layer (``layers``' order)."
    )
    cosine: list[list[float | None]] = Field(
        description="Row i, column j: cos(τ_i, τ_j), experts in ``experts``' order."
    )
    cosine_per_layer: list[list[list[float | None]]] = Field(description="One such matrix per layer.")
    sign_conflicts: SignConflicts


class LossDiagnostics(_Strict):
    """Dev losses of the base and of each expert alone; keys: 'target' and each dev set."""

    base: dict[str, float] = Field(description="θ0 (the merge at w = 0).")
    experts: dict[str, dict[str, float]] = Field(description="Each expert alone (w one-hot).")
    improvement: dict[str, dict[str, float]] = Field(
        description="L(θ0) − L(θ_i): positive when the expert helps."
    )
    share: dict[str, dict[str, float | None]] = Field(
        description="max(improvement, 0) over its sum across the experts (null when no expert improves)."
    )


class EdgeDiagnostics(_Strict):
    """Dev loss along the segment between two experts, w = (1 − t) e_i + t e_j."""

    experts: list[str] = Field(description="Two experts: t = 0 is the first, t = 1 the second.")
    t: list[float]
    target: list[float] = Field(description="The target dev loss at each t.")
    per_set: dict[str, list[float]] = Field(description="Each dev set's loss at each t.")
    barrier: float = Field(description="max_t L(t) − ((1 − t) L(0) + t L(1)): height above the chord.")
    relative_barrier: float | None = Field(
        description="barrier / ((L(0) + L(1)) / 2): the height as a share of the experts' loss."
    )
    convex: bool = Field(description="Every second difference of the target loss is ≥ −tolerance.")
    min_second_difference: float | None = Field(description="The smallest L(t−h) − 2 L(t) + L(t+h).")


class DiagnosticFlag(_Strict):
    """A condition under which the proxy is known, or suspected, to degrade."""

    kind: Literal["norm_outlier", "large_barrier", "conflicting_task_vectors", "redundant_experts", "no_gain"]
    experts: list[str]
    value: float = Field(description="The number compared with the threshold.")
    threshold: float
    message: str


class DiagnoseFile(_RunFile):
    """diagnose.json: the experts' task vectors and the loss between them (``mergeopt diagnose``)."""

    FILE: ClassVar[str] = "diagnose.json"

    experts: list[str]
    dev_sets: list[str]
    target: str | None = Field(description="data.target: the dev set(s) the target loss weighs.")
    method: dict[str, Any] = Field(description="The merge the proxy uses (name, scale, options).")
    stack_dtype: str = Field(description="model.stack_dtype: the numbers include its rounding.")
    points: int = Field(description="Points per edge, both experts included.")
    layers: list[str] = Field(description="Layer names, in the model's order.")
    task_vectors: TaskVectorDiagnostics
    losses: LossDiagnostics
    edges: list[EdgeDiagnostics]
    flags: list[DiagnosticFlag]
    thresholds: dict[str, float] = Field(description="The thresholds the flags were raised with.")
    mergeopt_version: str


RUN_FILES: tuple[type[_RunFile], ...] = (
    MixtureFile,
    RankReport,
    CalibrationReport,
    TransferReport,
    DiagnoseFile,
)
T = TypeVar("T", bound=_RunFile)


def validated(model: type[T], data: dict[str, Any], path: str | Path) -> T:
    """``data`` as ``model`` (the writer's check before writing, the reader's after reading)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "required key is missing" if first["type"] == "missing" else first["msg"]
        raise UserError(f"{path}: {loc + ': ' if loc else ''}{msg.removeprefix('Value error, ')}") from None


def read_run_file(model: type[T], path: str | Path) -> T:
    """Read ``path`` (a run directory means its ``model.FILE``): one line for every way it can be wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / model.FILE
    existing_file(path, f"{model.FILE.removesuffix('.json').replace('_', ' ')} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {model.FILE} must be a JSON object")
    version = data.get("schema_version", 1)  # files from before versioning are version 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: schema_version {version!r} is not a positive whole number")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {version} is newer than mergeopt {mergeopt.__version__} reads "
            f"(up to {SCHEMA_VERSION}); upgrade mergeopt to read it"
        )
    return validated(model, data, path)


def read_finished_mixture(path: str | Path) -> MixtureFile:
    """A finished fit's mixture.json: the one check every command that consumes one makes."""
    mixture = read_run_file(MixtureFile, path)
    if mixture.status != "complete":
        where = Path(path) / MixtureFile.FILE if Path(path).is_dir() else path
        raise UserError(
            f"{where}: the fit did not finish (status {mixture.status!r}, not 'complete'); "
            "use a finished fit's mixture.json"
        )
    return mixture


def json_schemas() -> dict[str, dict]:
    """{file name: its JSON Schema}: what the docs publish."""
    return {model.FILE: model.model_json_schema() for model in RUN_FILES}


if __name__ == "__main__":  # python -m mergeopt.run_files DIR: write the JSON Schemas the docs publish
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (out / name.replace(".json", ".schema.json")).write_text(json.dumps(schema, indent=2) + "\n")
