"""Does a ranking of data mixtures at one scale carry to another? ``python -m mergeopt.transfer SMALL LARGE``.

Choosing a mixture with small models (or with merged experts) is only worth it if the order they
put mixtures in survives at the scale one actually trains; RegMix bets on exactly that ("rank
invariance"). This module measures it for two tables of runs that share mixture columns: for each
metric, Spearman and Kendall (scipy.stats) with seeded bootstrap intervals, the overlap of the
two scales' top-k, and the regret at the large scale of trusting the small scale: how much worse,
at the large scale, the small scale's favourite is than the large scale's own best (in the
metric's units, and normalised to [0, 1] by the large-scale range).

Direct mode compares the measured scores of SMALL and LARGE on the mixtures both tables hold
(rows matched on their weights). Surrogate mode (``--surrogate-fit TRAIN``) is RegMix's protocol:
one LightGBM regressor per metric, fitted on a small-scale table of runs (mixture weights →
metric) with a fixed number of boosting rounds, so no test run is used for early stopping; its
predictions for LARGE's mixtures are ranked against LARGE's scores and, when SMALL is given,
against SMALL's (RegMix's own held-out number). Besides the metrics, an aggregate is ranked:
``mean``, the mean of the metric values per mixture (the same as ``python -m mergeopt.rank``'s
mean), or ``mean_rank``, the mean of per-metric ranks, when metrics mix lower- and higher-is-better.

Writes transfer_report.json, transfer_report.md and transfer_scatter.png. Example on RegMix's
tables (1M- and 60M-parameter models on the same 256 mixtures; 512 further 1M runs to fit on):

    python -m mergeopt.transfer tests/data/regmix/test_mixture_1m.csv+tests/data/regmix/test_pile_loss_1m.csv \\
        tests/data/regmix/test_mixture_60m.csv+tests/data/regmix/test_pile_loss_60m.csv \\
        --surrogate-fit tests/data/regmix/train_mixture_1m.csv+tests/data/regmix/train_pile_loss_1m.csv
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mergeopt.cli import run_command
from mergeopt.errors import UserError
from mergeopt.evaluation.rank import comma_list
from mergeopt.evaluation.rank_report import k_used
from mergeopt.evaluation.rank_stats import rank_statistics, varies
from mergeopt.evaluation.table_checks import check_enough_mixtures, check_weights
from mergeopt.evaluation.tables import (
    ScaleTable,
    aggregate_metrics,
    check_distinct_mixtures,
    holds_numbers,
    load_table,
    metric_columns,
    metric_values,
    mixture_columns,
    not_a_metric,
    row_label,
    same_mixture_columns,
    shared_mixtures,
    weight_prefixes,
)
from mergeopt.evaluation.transfer_report import (
    OUTPUT_FILES,
    context_notes,
    display_names,
    summary_table,
    write_outputs,
)
from mergeopt.evaluation.transfer_surrogate import (
    SURROGATE_OPTIONS,
    fit_surrogates,
    surrogate_settings,
    surrogate_summary,
)
from mergeopt.inputs import writable_dir
from mergeopt.runtime.rundir import owned, staged

COMPARISONS = {  # key: (proxy, truth, what it measures)
    "small_to_large": ("SMALL", "LARGE", "measured small-scale scores rank the large-scale runs"),
    "surrogate_to_large": ("surrogate", "LARGE", "surrogate predictions rank the large-scale runs"),
    "surrogate_to_small": ("surrogate", "SMALL", "surrogate predictions rank the small-scale runs"),
}


# ---------------------------------------------------------------- loading and pairing


def load_scale_tables(specs: Mapping[str, str], prefix: str | None, columns: Sequence[str] | None):
    """Load every table and check they have the same mixture columns; weights come in the first's order."""
    loaded = {role: load_table(spec) for role, spec in specs.items()}
    first_role = next(iter(loaded))
    first_frame, first_source = loaded[first_role]
    cols = mixture_columns(first_frame, first_source, prefix, columns)
    for role, (frame, source) in loaded.items():  # every table's columns first: one a table lacks
        if role != first_role:  # would otherwise show as weights that do not sum to 1
            same_mixture_columns(cols, mixture_columns(frame, source, prefix, columns), source, first_source)
    tables = {
        role: ScaleTable(role, frame, specs[role], check_weights(frame, cols, source))
        for role, (frame, source) in loaded.items()
    }
    return tables, cols


def _numeric_columns(frame: pd.DataFrame, exclude: set, prefixes: Sequence[str]) -> list[str]:
    return [
        str(c)
        for c in frame.columns
        if not_a_metric(str(c), exclude, prefixes) is None and holds_numbers(frame[c])
    ]


def compared_metrics(
    tables: Mapping[str, ScaleTable],
    cols: Sequence[str],
    requested: Sequence[str] | None,
    prefixes: Sequence[str] = (),
) -> tuple[list[str], dict[str, list[str]]]:
    """Metrics every table has: those requested (each must be in every table) or all shared numeric ones.

    Returns the metrics and, per table, the numeric columns left out because another table lacks them
    (none when metrics are requested: the rest were not selected, and are not reported as missing).
    """
    exclude = set(cols)
    group = list(tables.values())
    first = group[0]
    names = metric_columns(
        first.frame, group[1].frame, exclude, requested, (first.spec, group[1].spec), prefixes
    )
    for other in group[2:]:
        found = metric_columns(
            first.frame, other.frame, exclude, requested, (first.spec, other.spec), prefixes
        )
        names = [m for m in names if m in found]
    if not names:
        raise UserError(f"{', '.join(t.spec for t in group)} share no numeric metric columns")
    if requested:  # the user chose: the other columns were not selected, not missing anywhere
        return names, {}
    skipped = {
        t.role: left
        for t in group
        if (left := [c for c in _numeric_columns(t.frame, exclude, prefixes) if c not in names])
    }
    return names, skipped


def _row_labels(table: ScaleTable, rows: np.ndarray) -> list[str]:
    return [row_label(table.frame, int(i)) for i in rows]


# ---------------------------------------------------------------- statistics


def with_aggregate(
    scores: Mapping[str, np.ndarray],
    directions: Mapping[str, bool],
    aggregate: str | None,
    over: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The per-metric scores plus the aggregate over the metrics ``over`` (default: all): mean
    value, or mean per-metric rank (lower is better)."""
    scores = dict(scores)
    taken = {m: scores[m] for m in (over if over is not None else list(scores))}
    if aggregate == "mean":
        scores["mean"] = np.mean(list(taken.values()), axis=0)
    elif aggregate == "mean_rank":
        ranks = [stats.rankdata(-v if directions[m] else v) for m, v in taken.items()]
        scores["mean_rank"] = np.mean(ranks, axis=0)
    return scores


def paired_with_aggregate(
    proxy: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    directions: Mapping[str, bool],
    aggregate: str | None,
) -> tuple[dict[str, tuple], list[str]]:
    """(per metric and the aggregate, the (proxy, truth) scores; the metrics left out of the
    aggregate): those constant in the proxy or the truth (:func:`aggregate_metrics`)."""
    over, left_out = aggregate_metrics({m: (proxy[m], truth[m]) for m in proxy}, list(proxy))
    p = with_aggregate(proxy, directions, aggregate, over)
    t = with_aggregate(truth, directions, aggregate, over)
    return {m: (p[m], t[m]) for m in p}, left_out if aggregate else []


def transfer_statistics(
    proxy: np.ndarray,
    truth: np.ndarray,
    *,
    higher_is_better: bool,
    options: Mapping,
    name: str,
    labels: Sequence[str],
) -> dict:
    """:func:`rank_statistics` plus where the proxy's favourite lands in the truth.

    ``regret_raw`` is in the metric's own units (≥ 0, 0 when the favourite is truly best) and
    ``choice_rank`` is its place among the true scores (1 = best; ties share the better place).
    """
    s = rank_statistics(
        proxy, truth, higher_is_better=higher_is_better, name=name, undefined_when_constant=True, **options
    )
    truth_low = (
        -np.asarray(truth, dtype=np.float64) if higher_is_better else np.asarray(truth, dtype=np.float64)
    )
    chosen, best = s["proxy_best_row"], s["true_best_row"]
    # a constant score leaves the pick (or the best) to a tie-break: undefined, as the correlations are
    picked, ranked = varies(proxy), varies(proxy, truth)
    return {
        **s,
        "regret_raw": float(truth_low[chosen] - truth_low.min()) if ranked else math.nan,
        "choice_rank": int(np.sum(truth_low < truth_low[chosen])) + 1 if ranked else None,
        "choice": labels[chosen] if picked else None,
        "best": labels[best] if varies(truth) else None,
        "choice_true_score": float(truth[chosen]) if picked else math.nan,
        "best_true_score": float(truth[best]),
    }


def compare(
    proxy: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    directions: Mapping[str, bool],
    options: Mapping,
    labels: Sequence[str],
) -> dict:
    """Transfer statistics for every metric (and the aggregate) of one proxy against one truth."""
    return {
        m: transfer_statistics(
            proxy[m], truth[m], higher_is_better=directions[m], options=options, name=m, labels=labels
        )
        for m in proxy
    }


# ---------------------------------------------------------------- the whole check


def transfer_tables(
    small_spec: str | None,
    large_spec: str,
    *,
    surrogate_fit: str | None = None,
    metrics: Sequence[str] | None = None,
    higher_is_better: Sequence[str] = (),
    mixture_prefix: str | None = None,
    mixture_cols: Sequence[str] | None = None,
    k: int = 3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    surrogate_options: Mapping[str, float | int | None] | None = None,
) -> tuple[dict, dict]:
    """Load, pair and score SMALL against LARGE, and the surrogate fitted on ``surrogate_fit`` against both.

    Returns the report and, per comparison, the paired (proxy, truth) scores per metric (for the plot).
    ``seed`` drives the bootstrap and LightGBM; the same inputs and seed give the same report.
    """
    if small_spec is None and surrogate_fit is None:
        raise UserError("give SMALL and LARGE tables, or LARGE with --surrogate-fit TRAIN")
    if k < 1 or n_bootstrap < 0:
        raise UserError(f"need --k ≥ 1 and --bootstrap ≥ 0, got {k} and {n_bootstrap}")
    specs = {"SMALL": small_spec, "LARGE": large_spec, "TRAIN": surrogate_fit}
    tables, cols = load_scale_tables(
        {r: s for r, s in specs.items() if s is not None}, mixture_prefix, mixture_cols
    )
    settings = surrogate_settings(surrogate_options or {}) if surrogate_fit is not None else None
    prefixes = weight_prefixes(cols, mixture_prefix, mixture_cols)
    names, skipped = compared_metrics(tables, cols, metrics, prefixes)
    directions, aggregate = _directions(names, higher_is_better)
    options = {"k": k, "n_bootstrap": n_bootstrap, "seed": seed, "confidence": confidence}
    pairs, labels, shared, left_out = _paired(tables, names, directions, aggregate, settings, seed)
    comparisons = {
        key: {
            "proxy": COMPARISONS[key][0],
            "truth": COMPARISONS[key][1],
            "what": COMPARISONS[key][2],
            "n": len(labels[key]),
            "metrics": compare(
                {m: p for m, (p, _) in pair.items()},
                {m: t for m, (_, t) in pair.items()},
                directions,
                options,
                labels[key],
            ),
            "aggregate_left_out": left_out[key],
        }
        for key, pair in pairs.items()
    }
    report = {
        "small": small_spec,
        "large": large_spec,
        "surrogate_fit": surrogate_fit,
        "mixture_columns": list(cols),
        "n_mixtures": {
            "small": len(tables["SMALL"].frame) if "SMALL" in tables else None,
            "large": len(tables["LARGE"].frame),
            "shared": shared,
            "train": len(tables["TRAIN"].frame) if "TRAIN" in tables else None,
        },
        "metrics": names,
        "higher_is_better": [m for m in names if directions[m]],
        "skipped_metrics": skipped,
        "aggregate": aggregate,
        "options": options,
        "surrogate": surrogate_summary(tables, settings, seed),
        "comparisons": comparisons,
    }
    return report, pairs


def _directions(names: Sequence[str], higher_is_better: Sequence[str]) -> tuple[dict[str, bool], str | None]:
    """(whether higher is better, per metric and for the aggregate; the aggregate's name): with two
    metrics or more, their mean when they point the same way, else their mean rank."""
    unknown = sorted(set(higher_is_better) - set(names))
    if unknown:
        raise UserError(f"--higher-is-better names {unknown}, not a compared metric")
    directions = {m: m in higher_is_better for m in names}
    aggregate = None if len(names) < 2 else "mean" if len(set(directions.values())) == 1 else "mean_rank"
    if aggregate in names:
        raise UserError(f"a metric column is called '{aggregate}', which names the aggregate here; rename it")
    if aggregate:
        directions[aggregate] = directions[names[0]] if aggregate == "mean" else False
    return directions, aggregate


def _paired(
    tables: Mapping[str, ScaleTable],
    names: Sequence[str],
    directions: Mapping[str, bool],
    aggregate: str | None,
    settings,
    seed: int,
) -> tuple[dict[str, dict[str, tuple]], dict[str, list[str]], int | None, dict[str, list[str]]]:
    """(per comparison, the (proxy, truth) scores per metric; per comparison, its rows' labels; how
    many mixtures SMALL and LARGE share, None without SMALL; per comparison, the metrics left out
    of the aggregate): SMALL against LARGE on their shared mixtures, and the surrogate fitted on
    TRAIN against every row of LARGE and of SMALL. Each comparison needs 3 mixtures at least."""
    values = {
        role: {m: metric_values(t.frame, m, t.spec) for m in names}
        for role, t in tables.items()
        if role != "TRAIN"
    }
    pairs: dict[str, dict[str, tuple]] = {}
    labels: dict[str, list[str]] = {}
    left_out: dict[str, list[str]] = {}
    shared = None
    large = tables["LARGE"]
    if "SMALL" in tables:
        small = tables["SMALL"]
        rows_small, rows_large = shared_mixtures(
            (small.weights, large.weights), (small.frame, large.frame), (small.spec, large.spec)
        )
        check_enough_mixtures(len(rows_small), (small.spec, large.spec))
        shared = len(rows_small)
        pairs["small_to_large"], left_out["small_to_large"] = paired_with_aggregate(
            {m: v[rows_small] for m, v in values["SMALL"].items()},
            {m: v[rows_large] for m, v in values["LARGE"].items()},
            directions,
            aggregate,
        )
        labels["small_to_large"] = _row_labels(large, rows_large)
    if settings is not None:
        for role in ("LARGE", "SMALL"):  # each row is ranked once, and at least 3 of them
            if role in tables:
                table = tables[role]
                check_distinct_mixtures(table.weights, table.frame, table.spec)
                check_enough_mixtures(len(table.frame), (table.spec,))
        surrogate = fit_surrogates(tables["TRAIN"], names, settings, seed)
        for key, role in (("surrogate_to_large", "LARGE"), ("surrogate_to_small", "SMALL")):
            if role in tables:
                pairs[key], left_out[key] = paired_with_aggregate(
                    surrogate.predict(tables[role].weights), values[role], directions, aggregate
                )
                labels[key] = _row_labels(tables[role], np.arange(len(tables[role].frame)))
    return pairs, labels, shared, left_out


# ---------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    """``mergeopt transfer``: the parsed command line (:mod:`mergeopt.cli`)."""
    if len(args.tables) > 2 or (len(args.tables) == 1 and not args.surrogate_fit):
        raise UserError(
            f"expected SMALL LARGE, or LARGE with --surrogate-fit TRAIN; got {len(args.tables)} table(s)"
        )
    small, large = args.tables if len(args.tables) == 2 else (None, args.tables[0])
    writable_dir(args.out, "--out")
    surrogate = {name: getattr(args, name) for name in SURROGATE_OPTIONS}
    if not args.surrogate_fit and any(v is not None for v in surrogate.values()):
        raise UserError(
            "--rounds, --learning-rate, --num-leaves and --min-child-samples need --surrogate-fit"
        )
    report, pairs = transfer_tables(
        small,
        large,
        surrogate_fit=args.surrogate_fit,
        metrics=comma_list(args.metrics),
        higher_is_better=comma_list(args.higher_is_better),
        mixture_prefix=args.mixture_prefix,
        mixture_cols=comma_list(args.mixture_columns),
        k=args.k,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        surrogate_options=surrogate,
    )
    with owned(args.out, "transfer", "--out") as out, staged(out, OUTPUT_FILES) as staging:
        write_outputs(report, pairs, staging.path)
    note = display_names(report)[1]
    print(summary_table(report))
    print("\n" + (f"{note} " if note else "") + "Regret: normalised, at the truth's scale.")
    for line in context_notes(report):
        print(line)
    ks = k_used(s for c in report["comparisons"].values() for s in c["metrics"].values())
    print(f"Kendall intervals, top-{ks} overlap, raw regret and the favourites are in transfer_report.md.")
    print(f"Wrote {', '.join(OUTPUT_FILES)} to {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt transfer`` from Python, with its command-line arguments."""
    return run_command("transfer", argv)
