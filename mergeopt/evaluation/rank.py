"""Does the proxy rank data mixtures like the truth? ``python -m mergeopt.rank --proxy A.csv --truth B.csv``.

A merged model (or a small model) is only useful for choosing a mixture if it orders mixtures the
way models really trained on them do. This module measures that agreement over a set of mixtures:
rank correlations (Spearman, Kendall, from scipy.stats) with seeded bootstrap intervals, the share
of mixture pairs ordered correctly, whether the proxy's favourites are the true favourites, and the
regret of trusting the proxy, normalised to [0, 1] so that metrics on different scales compare.

Table mode joins a proxy table and a truth table on their mixture-weight columns and writes
rank_report.json, rank_report.md and rank_scatter.png. A table is one CSV, or RegMix's layout
``MIXTURES.csv+METRICS.csv`` (two files joined on their ``index`` column). Example:

    python -m mergeopt.rank --proxy tests/data/regmix/test_mixture_1m.csv+tests/data/regmix/test_pile_loss_1m.csv \\
        --truth tests/data/regmix/test_mixture_60m.csv+tests/data/regmix/test_pile_loss_60m.csv --out rank_out
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mergeopt.cli import run_command
from mergeopt.config import RankSection
from mergeopt.errors import UserError
from mergeopt.evaluation.baselines import baseline_predictions
from mergeopt.evaluation.rank_report import OUTPUT_FILES, baseline_table, markdown_table, write_outputs
from mergeopt.evaluation.rank_stats import mixture_regret, nearest_line, rank_statistics
from mergeopt.evaluation.tables import rank_tables
from mergeopt.inputs import writable_dir
from mergeopt.objectives.objective import Objective
from mergeopt.run_files import read_finished_mixture
from mergeopt.runtime import distributed
from mergeopt.runtime.exact_csv import file_line
from mergeopt.runtime.fingerprint import input_fingerprints
from mergeopt.runtime.interrupts import interruptible, saying_where_saved
from mergeopt.runtime.resume import RANK_CHECKPOINT_DIR
from mergeopt.runtime.rundir import check_apart_from_inputs, owned, staged


def rank_grid(
    problem,
    objective: Objective,
    grid_path: str | Path,
    rank: RankSection,
    seed: int,
    mixture: dict | None = None,
    progress: bool = True,
    checkpoint=None,
    together: bool = False,
) -> tuple[dict, dict, pd.DataFrame, dict]:
    """Evaluate the merged proxy at every grid mixture and score it, and the baselines of
    :mod:`mergeopt.evaluation.baselines`, against the grid's true values.

    The metrics are each dev set's loss, each non-loss objective term (its ``score_<label>``
    column, oriented by :func:`mergeopt.objectives.metrics.higher_is_better`), and the target loss.
    ``problem`` comes from :func:`mergeopt.loading.problem.load_problem`; ``rank`` holds k and the
    bootstrap resamples, ``seed`` is the recipe's. ``mixture`` (a mixture.json) adds the regret of
    the fitted mixture at its nearest grid point, on the target. ``checkpoint`` and ``together``
    go to :func:`mergeopt.evaluation.proxy.proxy_grid` (resume, a sharded stack). Returns the
    report, the paired scores, the proxy's losses and scores, and each baseline's predicted scores.
    """
    from mergeopt.evaluation.proxy import check_truth, read_grid
    from mergeopt.objectives.metrics import higher_is_better

    names = problem.stack.expert_names
    table = read_grid(grid_path, names)
    check_truth(table, objective, grid_path)
    weight_columns = [f"w_{n}" for n in names]
    proxy, pairs, expert_scores = _proxy_pairs(
        problem, objective, table, weight_columns, progress, checkpoint, together
    )
    higher = {t.label: higher_is_better(t) for t in objective.metric_terms}
    options = {
        "k": rank.k,
        "n_bootstrap": rank.bootstrap,
        "seed": seed,
        "confidence": 0.95,
    }
    report = {
        "grid": str(grid_path),
        "target": objective.target,
        "overall": "target",
        "n_mixtures": len(table),
        "options": options,
        "metrics": {
            name: rank_statistics(
                *pair,
                name=name,
                higher_is_better=higher.get(name, False),
                undefined_when_constant=name != "target",  # a score constant over the grid picks by tie-break
                **options,
            )
            for name, pair in pairs.items()
        },
    }
    predictions, left_out = baseline_predictions(
        table[weight_columns].to_numpy(),
        {name: truth for name, (_, truth) in pairs.items()},
        expert_scores,
        seed,
        progress,
        rank.baselines,
        rank.workers,
    )
    report["baselines"] = _baseline_statistics(predictions, pairs, higher, options)
    if left_out:
        report["baselines_skipped"] = left_out
    if mixture is not None:
        fitted = mixture_regret(mixture["weights"], table[weight_columns], pairs["target"][1])
        report["fitted_mixture"] = {**fitted, "line": file_line(grid_path, fitted["row"])}
    return report, pairs, proxy, predictions


def _proxy_pairs(
    problem, objective: Objective, table: pd.DataFrame, weight_columns, progress, checkpoint, together
):
    """(the proxy's scores at the grid's mixtures; per metric, (proxy, truth) at them; per metric,
    the experts' own scores, for the interpolation baseline), the target as the dev sets' losses
    weighted by the recipe's set weights."""
    from mergeopt.evaluation.proxy import proxy_grid, truth_columns

    # the grid's mixtures, then the experts themselves (the interpolation baseline's scores; a grid
    # that has its vertices scores each once: the Evaluator caches by mixture)
    vertices = pd.DataFrame(np.eye(len(weight_columns)), columns=weight_columns)
    scored = pd.concat([table[weight_columns], vertices], ignore_index=True)
    evaluated = proxy_grid(problem, objective, scored, progress, checkpoint, together)
    proxy = evaluated.iloc[: len(table)].set_axis(table.index)
    experts = evaluated.iloc[len(table) :]
    a = problem.set_weights.double().numpy()
    a = a / a.sum()
    columns = truth_columns(objective)
    pairs = {name: (proxy[c].to_numpy(), table[c].to_numpy()) for name, c in columns.items()}
    expert_scores = {name: experts[c].to_numpy() for name, c in columns.items()}
    losses = [columns[name] for name in objective.dev_names]
    pairs["target"] = (proxy[losses].to_numpy() @ a, table[losses].to_numpy() @ a)
    expert_scores["target"] = experts[losses].to_numpy() @ a
    return proxy, pairs, expert_scores


def _baseline_statistics(predictions: dict, pairs: dict, higher: dict, options: dict) -> dict:
    """Each baseline's rank statistics per metric, with bootstrap intervals for the headline metric
    only (the table that shows them): four predictors' resamples on every metric would make the
    baselines cost more than the proxy's whole report."""
    return {
        baseline: {
            name: rank_statistics(
                predicted[name],
                pairs[name][1],
                name=name,
                higher_is_better=higher.get(name, False),
                undefined_when_constant=name != "target",
                **{**options, "n_bootstrap": options["n_bootstrap"] if name == "target" else 0},
            )
            for name in pairs
        }
        for baseline, predicted in predictions.items()
    }


def _grid_main(args) -> int:
    from mergeopt.config import load_recipe
    from mergeopt.loading.devices import resolve_device

    recipe = load_recipe(args.recipe, args.overrides)
    what = "--out" if args.out is not None else "output_dir"
    check_apart_from_inputs(
        args.out if args.out is not None else recipe.output_dir, recipe.input_paths(), what, "rank"
    )
    out = writable_dir(args.out if args.out is not None else recipe.output_dir, what)
    distributed.init_from_env(resolve_device(recipe.device))  # every rank hears a refused --out
    with saying_where_saved(out / RANK_CHECKPOINT_DIR), interruptible(), owned(out, "rank", what):
        from mergeopt.reporting.run_report import check_report_inputs

        # report.md sums up a fit's or diagnose's files kept there: one this mergeopt cannot read is refused now
        check_report_inputs(out, (*OUTPUT_FILES, "report.md", "simplex.png"))
        return _grid_run(args, recipe, out)


def _grid_run(args, recipe, out: Path) -> int:
    """Grid mode: the merged proxy on the grid's mixtures, journaled in ``OUT/rank_checkpoint``.

    As a fit keeps its state in ``output_dir/checkpoint``, grid mode keeps the proxy's evaluations
    in its output directory (its own ``rank_checkpoint/``, so a fit's checkpoint there is never
    touched) until the report is written; a rerun of the same command replays them and evaluates
    only the rows left. Under torchrun the ranks share the grid's mixtures; rank 0 writes.
    """
    from mergeopt.evaluation.proxy import check_grid_unit, check_truth, read_grid
    from mergeopt.loading.problem import load_problem
    from mergeopt.runtime.resume import recipe_tree
    from mergeopt.worlds import resolve_recipe
    from mergeopt.worlds.grid_measures import check_measured_inputs, check_measured_tokens
    from mergeopt.worlds.run_records import grid_run_records

    grid = args.grid or recipe.rank.grid
    if grid is None:
        raise UserError("no grid table: pass --grid GRID.csv or set rank.grid in the recipe")
    objective = Objective.from_recipe(recipe)  # world paths do not change the objective
    # a bad table is reported before anything is built or loaded
    table = read_grid(grid, recipe.expert_names)
    check_truth(table, objective, grid)
    check_grid_unit(grid_run_records(table, grid), grid, recipe.weights.unit)
    mixture_path = Path(args.mixture) if args.mixture else Path(recipe.output_dir) / "mixture.json"
    mixture = _fitted_mixture(mixture_path, recipe.expert_names, named=bool(args.mixture))
    quiet = args.quiet or not distributed.is_main()
    with distributed.main_first():  # one rank builds a world into the cache, the others reuse it
        resolved, _ = resolve_recipe(recipe, (lambda _m: None) if quiet else print)
    check_measured_inputs(grid, resolved, objective)  # the grid's truth was measured on these records
    # the proxy's evaluations depend on the recipe, not on how the rank statistics are drawn
    tree = {k: v for k, v in recipe_tree(recipe).items() if k != "rank"}
    checkpoint, resuming = _rank_checkpoint(out, tree, input_fingerprints(resolved), args.restart, quiet)
    try:
        problem = load_problem(resolved, not quiet, objective, trains=False)  # evaluations only
        check_measured_tokens(grid, resolved, objective, problem.sets)
        report, pairs, _, baselines = rank_grid(
            problem,
            objective,
            grid,
            resolved.rank,
            resolved.seed,
            mixture,
            not quiet,
            checkpoint,
            together=resolved.model.shard == "fsdp",
        )
    except UserError:
        if not resuming and distributed.is_main():  # a user error leaves no state behind
            checkpoint.discard()
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    if not distributed.is_main():
        return 0
    weights = read_grid(grid, recipe.expert_names)[[f"w_{n}" for n in recipe.expert_names]]
    _publish(out, report, pairs, weights, baselines)
    checkpoint.clear()  # the report is the record now (a no-op: the swap dropped it)
    _print_summary(report, mixture_path, out)
    return 0


def _rank_checkpoint(out: Path, tree: dict, inputs: dict, restart: bool, quiet: bool):
    """The proxy's journal in ``OUT/rank_checkpoint`` and whether it resumes one, keyed by the
    recipe's ``tree`` and the inputs' fingerprints."""
    from mergeopt.runtime.resume import open_state

    checkpoint, resuming = open_state(
        out, tree, "restart" if restart else "auto", RANK_CHECKPOINT_DIR, inputs
    )
    if resuming and not quiet:
        print(f"resuming from {checkpoint.dir}")
    elif not resuming:
        checkpoint.start_lazily()  # created at the first journaled evaluation, a --restart's old one removed
    return checkpoint, resuming


def _publish(out: Path, report: dict, pairs: dict, weights: pd.DataFrame, baselines: dict) -> None:
    """The rank report, its tables and plots, and report.md, published in one swap that also drops
    rank_checkpoint/; a fit's files beside are kept (report.md sums them up too)."""
    from mergeopt.reporting.run_report import write_report

    with staged(out, (*OUTPUT_FILES, "report.md", "simplex.png", RANK_CHECKPOINT_DIR)) as staging:
        write_outputs(report, pairs, staging.path, weights, baselines)
        staging.carry_over()
        write_report(staging.path, name=out.name)


def _fitted_mixture(path: Path, experts: Sequence[str], named: bool) -> dict | None:
    """The fit's mixture.json whose regret grid mode reports: the run's own if it is there (it is
    optional), a ``--mixture`` the user named (it must be there), over the recipe's experts."""
    if not (path.is_file() or named):
        return None
    mixture = read_finished_mixture(path)
    if set(mixture.names) != set(experts):
        raise UserError(
            f"{path}: its weights name {sorted(mixture.names)} but the recipe's experts are {sorted(experts)}"
        )
    return mixture.to_json()


def _print_summary(report: dict, mixture_path: Path, out: Path) -> None:
    """Grid mode's lines on the terminal: the statistics, the baselines, the fitted mixture's regret."""
    print(markdown_table(report))
    if "baselines" in report:
        print("\n" + baseline_table(report))
    if "fitted_mixture" in report:
        fitted = report["fitted_mixture"]
        print(
            f"\nfitted mixture ({mixture_path}): nearest grid mixture on {nearest_line(report)} at "
            f"distance {fitted['distance']:.3f}, normalized regret {fitted['regret']:.3f}"
        )
    print(f"\nWrote {', '.join(OUTPUT_FILES)}, simplex.png, report.md to {out}")


# each mode's own options: given in the other mode they were ignored without a word (grid mode ranks
# with the recipe's rank.k, rank.bootstrap and seed, whatever --k said)
TABLE_OPTIONS = {
    "proxy": "--proxy",
    "truth": "--truth",
    "mixture_prefix": "--mixture-prefix",
    "mixture_columns": "--mixture-columns",
    "metrics": "--metrics",
    "higher_is_better": "--higher-is-better",
    "k": "--k",
    "bootstrap": "--bootstrap",
    "seed": "--seed",
}
GRID_OPTIONS = {"grid": "--grid", "mixture": "--mixture", "restart": "--restart"}
GRID_KEYS = {"k": "rank.k", "bootstrap": "rank.bootstrap", "seed": "seed"}  # a table option's recipe key
TABLE_DEFAULTS = {"k": 3, "bootstrap": 1000, "seed": 0, "higher_is_better": ""}


def check_mode_options(args: argparse.Namespace) -> None:
    """A table-mode option with a recipe (grid mode), or a grid-mode option without one, is refused."""
    grid = args.recipe is not None
    options = TABLE_OPTIONS if grid else GRID_OPTIONS
    dests = [dest for dest in options if getattr(args, dest) not in (None, False)]
    if not dests:
        return
    given = [options[dest] for dest in dests]
    if grid:
        keys = [f"{GRID_KEYS[d]}={getattr(args, d)}" for d in dests if d in GRID_KEYS]
        how = (
            f"ranks with the recipe's rank.k, rank.bootstrap and seed (override them: {' '.join(keys)})"
            if keys
            else "ranks the recipe's dev sets and objective terms against the grid's columns"
        )
        raise UserError(
            f"{', '.join(given)}: table-mode option(s) given with a recipe (grid mode), which {how}; "
            "drop the recipe for table mode"
        )
    raise UserError(
        f"{', '.join(given)}: grid-mode option(s) given without a recipe; table mode ranks --proxy "
        "against --truth (mergeopt rank RECIPE --grid GRID.csv is grid mode)"
    )


def comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def run(args: argparse.Namespace) -> int:
    """``mergeopt rank``: grid mode with a recipe, table mode with ``--proxy`` and ``--truth``."""
    check_mode_options(args)
    if args.recipe is not None:
        return _grid_main(args)
    if not args.proxy or not args.truth:
        raise UserError("table mode needs both --proxy and --truth")
    for key, value in TABLE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.k < 1 or args.bootstrap < 0:
        raise UserError(f"need --k ≥ 1 and --bootstrap ≥ 0, got {args.k} and {args.bootstrap}")
    writable_dir(args.out or "rank_out", "--out")
    report, pairs, weights = rank_tables(
        args.proxy,
        args.truth,
        mixture_prefix=args.mixture_prefix,
        mixture_cols=comma_list(args.mixture_columns),
        metrics=comma_list(args.metrics),
        higher_is_better=comma_list(args.higher_is_better),
        k=args.k,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    with owned(args.out if args.out is not None else "rank_out", "rank", "--out") as out:
        with staged(out, OUTPUT_FILES) as staging:
            write_outputs(report, pairs, staging.path, weights)
    print(markdown_table(report))
    print(f"\nWrote {', '.join(OUTPUT_FILES)} to {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt rank`` from Python, with its command-line arguments."""
    return run_command("rank", argv)
