"""What ``mergeopt transfer`` writes and prints: transfer_report.md and .json, the scatter plot, and the
summary table, from the report :func:`mergeopt.evaluation.transfer.transfer_tables` computes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeopt.evaluation.rank_report import (
    MAX_SCATTER_PANELS,
    format_number,
    json_safe,
    k_used,
    top_k_cell,
)
from mergeopt.run_files import SCHEMA_VERSION, TransferReport
from mergeopt.runtime.files import save_figure_atomic, write_json_atomic, write_text_atomic

OUTPUT_FILES = ("transfer_report.json", "transfer_report.md", "transfer_scatter.png")


def short_names(names: Sequence[str]) -> tuple[dict[str, str], str, str]:
    """Display names without the prefix and suffix every metric shares (RegMix: metric/the_pile_*_val_loss).

    The cut falls on a separator, so no name loses part of a word; the report keeps full names.
    """
    names = list(names)
    if len(names) < 2:
        return {n: n for n in names}, "", ""
    separators = "/_-.: "
    prefix = os.path.commonprefix(names)
    prefix = prefix[: max((prefix.rfind(c) + 1 for c in separators), default=0)]
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suffix = suffix[min((i for i, c in enumerate(suffix) if c in separators), default=len(suffix)) :]
    short = {n: n[len(prefix) : len(n) - len(suffix)] for n in names}
    if any(len(prefix) + len(suffix) >= len(n) for n in names) or len(set(short.values())) < len(names):
        return {n: n for n in names}, "", ""
    return short, prefix, suffix


def display_names(report: dict) -> tuple[dict[str, str], str | None]:
    short, prefix, suffix = short_names(report["metrics"])
    if report["aggregate"]:
        short[report["aggregate"]] = f"**{report['aggregate']}**"
    note = f"Metric names are shown without their shared `{prefix}…{suffix}`." if prefix or suffix else None
    return short, note


def _interval(s: dict, key: str) -> str:
    low, high = s[f"{key}_ci"]
    return f"{format_number(s[key])} [{format_number(low)}, {format_number(high)}]"


def comparison_table(report: dict, key: str) -> str:
    """One comparison in full: a row per metric, the aggregate last. Its top-k is the k it used:
    ``--k`` clamped to the mixtures compared."""
    shown = display_names(report)[0]
    k = k_used(report["comparisons"][key]["metrics"].values())
    lines = [
        f"| metric | n | Spearman [{report['options']['confidence']:.0%} CI] | Kendall [CI] | top-{k} overlap "
        "| choice's true rank | regret | regret (norm.) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in report["comparisons"][key]["metrics"].items():
        arrow = " ↑" if s["higher_is_better"] else ""
        lines.append(
            f"| {shown[name]}{arrow} | {s['n']} | {_interval(s, 'spearman')} | {_interval(s, 'kendall')} | "
            f"{top_k_cell(s)} | {s['choice_rank'] if s['choice_rank'] is not None else 'n/a'} | "
            f"{_raw(s['regret_raw'])} | {format_number(s['regret'])} |"
        )
    return "\n".join(lines)


def _raw(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4g}"


def context_notes(report: dict) -> list[str]:
    """The lines printed under the summary table: the mixtures compared when the tables share only
    some, the compared mixtures the surrogate was trained on, the metrics not compared, and those
    left out of the aggregate."""
    n, lines = report["n_mixtures"], []
    if n["shared"] is not None and (n["shared"] < n["small"] or n["shared"] < n["large"]):
        lines.append(
            f"SMALL→LARGE: compared on the {n['shared']} mixtures both tables hold (of {n['small']} and "
            f"{n['large']})."
        )
    s = report.get("surrogate")
    if s is not None and any(s["train_mixtures_in"].values()):
        held = ", ".join(
            f"{v} of {role}'s {n[role.lower()]}" for role, v in s["train_mixtures_in"].items() if v
        )
        lines.append(
            f"The surrogate's training table holds {held} mixtures: there its scores are fitted, not predicted."
        )
    lines += [
        f"Not compared (not in every table): {role}'s {left}"
        for role, left in report["skipped_metrics"].items()
    ]
    lines += [
        f"{pair}: the {report['aggregate']} leaves out {left}, constant in a table (their statistics are n/a)."
        for pair, left in _left_out_of_aggregate(report)
    ]
    return lines


def _left_out_of_aggregate(report: dict) -> list[tuple[str, list[str]]]:
    """(SMALL→LARGE, the metrics) for each comparison whose aggregate leaves constant metrics out."""
    return [
        (f"{c['proxy']}→{c['truth']}", c["aggregate_left_out"])
        for c in report["comparisons"].values()
        if c.get("aggregate_left_out")
    ]


def summary_table(report: dict) -> str:
    """The printed summary: per metric, Spearman [CI] and normalised regret of each comparison."""
    shown = display_names(report)[0]
    keys = list(report["comparisons"])
    heads = [f"{report['comparisons'][c]['proxy']}→{report['comparisons'][c]['truth']}" for c in keys]
    lines = [
        "| metric | " + " | ".join(f"{h} ρ [CI] | τ | regret" for h in heads) + " |",
        "| --- |" + " --- | ---: | ---: |" * len(keys),
    ]
    for name in report["comparisons"][keys[0]]["metrics"]:
        cells = []
        for key in keys:
            s = report["comparisons"][key]["metrics"][name]
            low, high = s["spearman_ci"]
            cells += [
                f"{format_number(s['spearman'])} [{format_number(low)}, {format_number(high)}]",
                format_number(s["kendall"]),
                format_number(s["regret"]),
            ]
        lines.append(f"| {shown[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _context_lines(report: dict) -> list[str]:
    n = report["n_mixtures"]
    lines = []
    if report["small"] is not None:
        lines.append(f"- SMALL: `{report['small']}` ({n['small']} mixtures)")
    lines.append(f"- LARGE: `{report['large']}` ({n['large']} mixtures)")
    if n["shared"] is not None:
        lines.append(
            f"- SMALL→LARGE is compared on the {n['shared']} mixtures both hold (rows matched on weights)"
        )
    s = report["surrogate"]
    if s is not None:
        seen = ", ".join(f"{v} of {role}'s" for role, v in s["train_mixtures_in"].items())
        lines.append(
            f"- surrogate: {s['model']}, fitted on `{report['surrogate_fit']}` ({n['train']} mixtures); "
            f"{s['rounds']} rounds, learning rate {s['learning_rate']:g}, {s['num_leaves']} leaves, "
            f"at least {s['min_child_samples']} samples per leaf, seed {s['seed']}; fixed rounds, no early "
            f"stopping; {seen} mixtures are in its training table"
        )
    if report["aggregate"] == "mean":
        lines.append("- aggregate **mean**: the mean of the metric values per mixture")
    elif report["aggregate"] == "mean_rank":
        lines.append(
            "- aggregate **mean_rank**: the mean of per-metric ranks per mixture (1 = best; the metrics mix "
            "lower- and higher-is-better)"
        )
    for role, left in report["skipped_metrics"].items():
        lines.append(f"- not compared (only some tables have them): {role}'s {left}")
    lines += [
        f"- {pair}: the aggregate leaves out {left}, constant in a table: they rank nothing, and their "
        "statistics are n/a"
        for pair, left in _left_out_of_aggregate(report)
    ]
    o = report["options"]
    lines.append(
        f"- intervals: {o['confidence']:.0%} percentile bootstrap, {o['n_bootstrap']} resamples of mixtures, "
        f"seed {o['seed']}; regret: the truth's score of the proxy's favourite minus the truth's best "
        "(metric units), and that over the truth's range (norm.)"
    )
    return lines


def markdown_report(report: dict) -> str:
    """transfer_report.md: what was compared, then one full table per comparison."""
    note = display_names(report)[1]
    parts = ["# Ranking transfer", "", *_context_lines(report)]
    if note:
        parts.append(f"- {note}")
    for key, c in report["comparisons"].items():
        parts += ["", f"## {c['proxy']} → {c['truth']}: {c['what']}", "", comparison_table(report, key)]
    return "\n".join(parts)


def plot_transfer(pairs: Mapping[str, Mapping[str, tuple]], report: dict, path: str | Path) -> Path:
    """Small-scale score (measured, or the surrogate's prediction) against large-scale score, per metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = [c for c in ("small_to_large", "surrogate_to_large") if c in pairs] or list(pairs)
    aggregate = report["aggregate"]
    names = report["metrics"][:MAX_SCATTER_PANELS] + ([aggregate] if aggregate else [])
    shown = short_names(report["metrics"])[0]
    ncols = math.ceil(math.sqrt(len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for key in keys:
            proxy, truth = pairs[key][name]
            rho = format_number(report["comparisons"][key]["metrics"][name]["spearman"])
            ax.scatter(
                truth,
                proxy,
                s=6,
                alpha=0.5,
                label=f"{'SMALL, measured' if key == 'small_to_large' else 'surrogate'} (ρ = {rho})",
            )
        ax.set_title(shown.get(name, name), fontsize=8)
        ax.set_xlabel(f"{report['comparisons'][keys[0]]['truth']} score", fontsize=7)
        ax.set_ylabel("small-scale score or prediction", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if len(report["metrics"]) > MAX_SCATTER_PANELS:
        fig.suptitle(
            f"first {MAX_SCATTER_PANELS} of {len(report['metrics'])} metrics shown; "
            "every metric is in transfer_report.md",
            fontsize=9,
        )
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def write_outputs(report: dict, pairs: Mapping, out: str | Path) -> Path:
    """The report's files into ``out`` (a staging directory the caller publishes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_transfer(pairs, report, out / "transfer_scatter.png")
    write_text_atomic(out / "transfer_report.md", markdown_report(report) + "\n")
    record = TransferReport.model_validate({"schema_version": SCHEMA_VERSION, **json_safe(report)}).to_json()
    write_json_atomic(out / "transfer_report.json", record)
    return out
