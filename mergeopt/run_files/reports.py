"""The reports of the commands that check the proxy against real runs: rank_report.json
(``mergeopt rank``), calibration.json (``mergeopt calibrate``) and transfer_report.json
(``mergeopt transfer``), with the rank statistics they share.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from mergeopt.run_files.base import RunFile


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
    top1_hit: bool | None = Field(
        description="The proxy's favourite is a true best (null in table mode when a score is constant)."
    )
    topk_hit: bool | None = Field(description="A true best is among the proxy's k favourites.")
    topk_overlap: float | None = Field(description="Share of the proxy's top k in the truth's top k.")
    regret: float | None = Field(description="True score lost by the proxy's pick, over the true range.")
    proxy_best_row: int = Field(description="The proxy's pick: its row in rank_pairs.csv (0-based).")
    true_best_row: int = Field(description="A truly best mixture: its row in rank_pairs.csv (0-based).")


class TransferStatistics(RankStatistics):
    """:class:`RankStatistics` plus where the proxy's favourite lands among the true scores."""

    proxy_best_row: int = Field(
        description="The proxy's pick: its place among the compared mixtures (0-based; `choice` names it)."
    )
    true_best_row: int = Field(
        description="A truly best mixture: its place among the compared mixtures (0-based; `best` names it)."
    )

    regret_raw: float | None = Field(
        description="True score lost by the proxy's pick, in the metric's units."
    )
    choice_rank: int | None = Field(
        description="The pick's place among the true scores (1 = best; null when a score is constant)."
    )
    choice: str | None = Field(description="The proxy's pick (a row label; null when the proxy is constant).")
    best: str | None = Field(
        description="The truly best mixture (a row label; null when the truth is constant)."
    )
    choice_true_score: float | None
    best_true_score: float | None


class RankReport(RunFile):
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


class CalibrationReport(RunFile):
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
    best_run: dict[str, Any] | None = Field(
        description="The best of the runs so far: its grid row (0-based) and line (in the grid file, "
        "header = line 1), weights and truth."
    )
    proposals: list[CalibrationProposal] = Field(description="What to train next, in order.")


class TransferComparison(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy: str
    truth: str
    what: str
    n: int
    metrics: dict[str, TransferStatistics]
    aggregate_left_out: list[str] = Field(
        default_factory=list,
        description="Metrics left out of the aggregate: constant in the proxy or the truth, they rank nothing.",
    )


class TransferReport(RunFile):
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
