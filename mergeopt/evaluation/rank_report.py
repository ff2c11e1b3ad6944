"""What a rank check writes: rank_report.json, rank_report.md, rank_pairs.csv and rank_scatter.png.

Shared by ``mergeopt rank`` (grid and table mode) and by ``mergeopt fit`` with ``rank.grid``,
which write the same four files; ``mergeopt transfer`` formats its numbers and scatter panels the
same way. The report is validated as :class:`mergeopt.run_files.RankReport` before anything is
written, and undefined numbers (a NaN correlation) are written as null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mergeopt.evaluation.baselines import LABELS, NEEDS
from mergeopt.run_files import SCHEMA_VERSION, RankReport
from mergeopt.runtime.files import save_figure_atomic, write_csv_atomic, write_json_atomic, write_text_atomic

MAX_SCATTER_PANELS = 9  # metrics drawn in rank_scatter.png, plus the mean
OUTPUT_FILES = ("rank_report.json", "rank_report.md", "rank_scatter.png", "rank_pairs.csv")


def format_number(value: float, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def yes_no(value: bool | None) -> str:
    """A hit: yes, no, or n/a when undefined (a constant score leaves the pick to a tie-break)."""
    return "n/a" if value is None else "yes" if value else "no"


def k_used(statistics) -> int | str:
    """The k of the top-k the statistics used (``--k`` clamped to the mixtures compared), or "k"
    when they differ (comparisons over different numbers of mixtures)."""
    ks = {s["k"] for s in statistics}
    return ks.pop() if len(ks) == 1 else "k"


def top_k_cell(s: dict) -> str:
    """How many of the proxy's top k are in the true top k, "2/3"; n/a when undefined."""
    overlap = s["topk_overlap"]
    if overlap is None or (isinstance(overlap, float) and math.isnan(overlap)):
        return "n/a"
    return f"{round(overlap * s['k'])}/{s['k']}"


def markdown_table(report: dict) -> str:
    """The readable summary: one row per metric, the mean last."""
    k = k_used(report["metrics"].values())
    overall = report.get("overall", "mean")
    lines = [
        f"| metric | n | Spearman [{report['options']['confidence']:.0%} CI] | Kendall [CI] | pairwise acc | top-1 | top-{k} | regret |",
        "| --- | ---: | --- | --- | ---: | :---: | :---: | ---: |",
    ]
    for name, s in report["metrics"].items():
        rho = f"{format_number(s['spearman'])} [{format_number(s['spearman_ci'][0])}, {format_number(s['spearman_ci'][1])}]"
        tau = f"{format_number(s['kendall'])} [{format_number(s['kendall_ci'][0])}, {format_number(s['kendall_ci'][1])}]"
        topk = "n/a" if s["topk_hit"] is None else f"{yes_no(s['topk_hit'])} ({top_k_cell(s)})"
        arrow = " ↑" if s["higher_is_better"] else ""
        lines.append(
            f"| {f'**{name}**' if name == overall else name}{arrow} | {s['n']} | {rho} | {tau} | "
            f"{format_number(s['pairwise_accuracy'])} | {yes_no(s['top1_hit'])} | {topk} | {format_number(s['regret'])} |"
        )
    if report.get("note"):
        lines += ["", *report["note"].splitlines()]
    return "\n".join(lines)


def baseline_table(report: dict) -> str:
    """The proxy beside the baselines on the headline metric, then every metric's Spearman for each."""
    overall = report.get("overall", "mean")
    predictors = {"proxy": report["metrics"], **report["baselines"]}
    k = k_used(metrics[overall] for metrics in predictors.values())
    lines = [
        f"Against the baselines ({overall}; the regressions predict each run from the n - 1 others):",
        "",
        f"| predictor | needs | Spearman [{report['options']['confidence']:.0%} CI] | Kendall [CI] | "
        f"pairwise acc | top-1 | top-{k} | regret |",
        "| --- | --- | --- | --- | ---: | :---: | :---: | ---: |",
    ]
    for name, metrics in predictors.items():
        s = metrics[overall]
        rho = f"{format_number(s['spearman'])} [{format_number(s['spearman_ci'][0])}, {format_number(s['spearman_ci'][1])}]"
        tau = f"{format_number(s['kendall'])} [{format_number(s['kendall_ci'][0])}, {format_number(s['kendall_ci'][1])}]"
        lines.append(
            f"| {LABELS[name]} | {NEEDS[name]} | {rho} | {tau} | {format_number(s['pairwise_accuracy'])} | "
            f"{yes_no(s['top1_hit'])} | {yes_no(s['topk_hit'])} | {format_number(s['regret'])} |"
        )
    lines += ["", "Spearman of each predictor, every metric:", ""]
    lines.append("| metric | " + " | ".join(LABELS[name] for name in predictors) + " |")
    lines.append("| --- |" + " ---: |" * len(predictors))
    for metric in report["metrics"]:
        cells = [format_number(p[metric]["spearman"]) for p in predictors.values()]
        lines.append(f"| {f'**{metric}**' if metric == overall else metric} | " + " | ".join(cells) + " |")
    for name, why in (report.get("baselines_skipped") or {}).items():
        lines += ["", f"{LABELS[name]}: not computed ({why})."]
    return "\n".join(lines)


def plot_scatter(
    pairs: Mapping[str, tuple],
    report: dict,
    path: str | Path,
    baselines: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Proxy against true score, one panel per metric (the first nine) plus the mean; then each
    baseline's predictions against the true score of the headline metric, side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    overall = report.get("overall", "mean")
    names = [m for m in pairs if m != overall][:MAX_SCATTER_PANELS] + ([overall] if overall in pairs else [])
    panels = [(name, "proxy", pairs[name][0], report["metrics"][name]) for name in names]
    if baselines and overall in pairs:
        panels += [
            (overall, b, predicted[overall], report["baselines"][b][overall])
            for b, predicted in baselines.items()
        ]
    ncols = math.ceil(math.sqrt(len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (name, predictor, predicted, stats) in zip(axes.flat, panels):
        ax.scatter(pairs[name][1], predicted, s=6, alpha=0.6, color="C0" if predictor == "proxy" else "C1")
        title = name if predictor == "proxy" else f"{name}: {LABELS[predictor]}"
        ax.set_title(f"{title}\nρ = {format_number(stats['spearman'])}", fontsize=8)
        ax.set_xlabel("true score", fontsize=7)
        ax.set_ylabel("proxy score" if predictor == "proxy" else "predicted score", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    shown = len([m for m in names if m != overall])
    total = len([m for m in pairs if m != overall])
    if shown < total:
        fig.suptitle(f"first {shown} of {total} metrics shown; every metric is in rank_report.md", fontsize=9)
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def pairs_frame(
    pairs: Mapping[str, tuple],
    weights: pd.DataFrame | None = None,
    baselines: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """One row per mixture: its weights (when known), then ``proxy_<metric>``, ``truth_<metric>``,
    then each baseline's prediction, ``<baseline>_<metric>``."""
    columns = {} if weights is None else {c: weights[c].to_numpy() for c in weights.columns}
    for name, (proxy, truth) in pairs.items():
        columns[f"proxy_{name}"], columns[f"truth_{name}"] = proxy, truth
    for baseline, predicted in (baselines or {}).items():
        for name in pairs:
            columns[f"{baseline}_{name}"] = predicted[name]
    return pd.DataFrame(columns)


def write_outputs(
    report: dict,
    pairs: Mapping[str, tuple],
    out: str | Path,
    weights: pd.DataFrame | None = None,
    baselines: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """rank_report.{json,md}, rank_scatter.png and rank_pairs.csv (the scores behind the figure).

    ``out`` is written as it is: a staging directory (:mod:`mergeopt.runtime.rundir`) the caller
    publishes. Every file is checked and drawn in memory first, so a bad value fails before any.
    """
    out = Path(out)
    record = RankReport.model_validate({"schema_version": SCHEMA_VERSION, **json_safe(report)}).to_json()
    write_json_atomic(out / "rank_report.json", record)
    frame = pairs_frame(pairs, weights, baselines)
    write_csv_atomic(out / "rank_pairs.csv", frame.to_dict("records"), list(frame.columns))
    plot_scatter(pairs, report, out / "rank_scatter.png", baselines)
    text = markdown_table(report) + ("\n\n" + baseline_table(report) if "baselines" in report else "")
    write_text_atomic(out / "rank_report.md", text + "\n")
    return out


def json_safe(value):
    """NaN (an undefined correlation) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
