"""What ``mergeopt calibrate`` reads and checks before a model is loaded: the grid of real runs
(on the simplex, with its truth columns, trained by these experts' recipe and in the recipe's
weights.unit), the metric calibrated and its direction, the feasible set, and the fit's mixture.

Why apart from the command: every refusal here happens in seconds, before the experts are read,
and the checks are the ones `rank` and `fit` apply to the same grid.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mergeopt.errors import UserError
from mergeopt.evaluation.proxy import WEIGHT_PREFIX
from mergeopt.objectives.objective import Objective
from mergeopt.runtime.exact_csv import at_line, file_line


def metric_of(objective: Objective, metric: str) -> tuple[str | None, bool]:
    """(the grid/proxy column of ``metric`` or None for the target, whether higher is better)."""
    from mergeopt.evaluation.proxy import truth_columns
    from mergeopt.objectives.metrics import higher_is_better

    if metric == "target":
        return None, False
    columns = truth_columns(objective)
    if metric not in columns:
        raise UserError(
            f"calibrate.metric: {metric!r} is not 'target', a dev set or an objective term "
            f"(known: target, {', '.join(columns)})"
        )
    terms = {t.label: t for t in objective.metric_terms}
    return columns[metric], higher_is_better(terms[metric]) if metric in terms else False


def check_provenance(
    runs: Sequence[tuple[int, Path, dict]], grid: str | Path, experts: dict[str, str]
) -> None:
    """A grid from ``mergeopt train`` whose runs were trained by another recipe than these experts.

    Each run ``mergeopt train`` writes carries ``run.json`` with its training recipe's fingerprint
    (base, data, budget, optimiser, seed). When the grid's runs (``runs``, from
    :func:`~mergeopt.worlds.run_records.grid_run_records`) and the recipe's experts both have one
    and no fingerprint is shared, the runs are another recipe's: the calibration would correct this
    proxy with the truth of different experts. Grids made elsewhere are not checked.
    """
    from mergeopt.worlds.run_records import RUN_MARKER, relocated

    def read(path: Path) -> dict:
        try:
            record = json.loads((path / RUN_MARKER).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    records = {name: read(Path(path)) for name, path in experts.items()}
    records = {name: r for name, r in records.items() if isinstance(r.get("fingerprint"), str)}
    ours = {name: r["fingerprint"] for name, r in records.items()}
    if not ours:
        return

    def moved(record: dict) -> bool:
        """Trained by the same recipe on the same files at other paths: runs trained after the
        experts and data were copied to another disk (mergeopt train keeps the experts' run.json
        as it was written, naming the old paths)."""
        for expert in records.values():
            carried = relocated(record, expert) if isinstance(expert.get("inputs"), dict) else None
            if carried is not None and carried.get("inputs") and carried["inputs"] == expert["inputs"]:
                return True
        return False

    for row, path, record in runs:
        theirs = record.get("fingerprint")
        if isinstance(theirs, str) and theirs not in ours.values() and not moved(record):
            name, mine = next(iter(ours.items()))
            raise UserError(
                f"{at_line(grid, row)}: its run was trained by another recipe (fingerprint {theirs} in "
                f"{path / RUN_MARKER}) "
                f"than the recipe's experts (model.experts.{name}: {mine}); calibrate with a grid of "
                "runs trained alongside these experts"
            )


def check_repeated_runs(table: pd.DataFrame, grid: str | Path) -> None:
    """Two rows naming the same run directory (a row appended twice by hand): the calibration would
    count one run's result as two seeds agreeing, and narrow its noise and interval on nothing.
    Several seeds of a mixture are several runs, each its own directory, and stay welcome. Any run's
    directory on this disk counts, mergeopt train's or one trained elsewhere (without its run.json)."""
    from mergeopt.worlds.run_records import run_dir

    if "path" not in table.columns:
        return
    seen: dict[Path, int] = {}
    for row, value in enumerate(table["path"]):
        found = run_dir(value, grid) if isinstance(value, str) and value.strip() else None
        if found is None:
            continue
        key = found.resolve()
        if key in seen:
            raise UserError(
                f"{at_line(grid, row)}: the same run ({value}) as line {file_line(grid, seen[key])}: keep "
                "one row per run (several seeds of a mixture are several runs, each its own directory)"
            )
        seen[key] = row


@dataclass
class CheckedGrid:
    """The grid of real runs and what else calibrate reads before a model is loaded, all checked:
    the metric's column (None: the target) and its direction, the recipe's feasible set and its
    record (None when unconstrained), and the fit's mixture when output_dir holds a finished one."""

    path: str | Path
    table: pd.DataFrame
    column: str | None
    higher: bool
    feasible: object = None
    record: dict | None = None
    fitted: dict[str, float] | None = None
    trained: tuple[int, ...] = ()  # the rows naming a run of mergeopt train (its run.json) on this disk


def checked_grid(args: argparse.Namespace, recipe, objective: Objective) -> CheckedGrid:
    from mergeopt.evaluation.proxy import check_grid_unit, check_truth, read_grid
    from mergeopt.run_files import read_finished_mixture
    from mergeopt.worlds.run_records import grid_run_records

    grid = args.grid or recipe.calibrate.grid or recipe.rank.grid
    if grid is None:
        raise UserError("no grid of real runs: pass --grid GRID.csv or set calibrate.grid (or rank.grid)")
    names = recipe.expert_names
    column, higher = metric_of(objective, recipe.calibrate.metric)
    table = on_the_simplex(read_grid(grid, names, ranked=False), names)  # checked before a model is loaded
    if table.empty and not recipe.calibrate.use_proxy:
        raise UserError(
            f"{grid}: no run yet, and calibrate.use_proxy is false: the model without the proxy is a "
            "regression on the runs alone; add a run's row or set calibrate.use_proxy: true"
        )
    check_truth(table, objective, grid)
    runs = grid_run_records(table, grid)
    check_provenance(runs, grid, recipe.model.experts)
    check_repeated_runs(table, grid)
    check_grid_unit(runs, grid, recipe.weights.unit)
    checked = CheckedGrid(grid, table, column, higher, trained=tuple(row for row, _, _ in runs))
    if recipe.weights.constrained:  # bounds, pins, repetition caps: checked before a model is loaded
        from mergeopt.loading.feasible import constraints_record, feasible_set, source_sizes

        sizes = source_sizes(recipe, (lambda _m: None) if args.quiet else print)
        checked.feasible = feasible_set(recipe, sizes)
        checked.record = constraints_record(recipe, checked.feasible, sizes)
    fit_path = Path(recipe.output_dir) / "mixture.json"
    if fit_path.is_file():
        mixture = read_finished_mixture(fit_path)
        if set(mixture.names) == set(names):
            checked.fitted = dict(mixture.weights)
    return checked


def on_the_simplex(table: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """The grid with each run's weights rescaled to sum to 1, the mixture the proxy scores.

    read_grid accepts rows within its tolerance of 1 (weights typed to three decimals, as
    calibration.md prints them) and the proxy scores them renormalised (proxy_grid): the model, the
    ranking and a run's pick/mixture.json (whose weights must sum to 1) take the same mixture.
    """
    from mergeopt.evaluation.proxy import grid_weights

    table = table.copy()
    table[[f"{WEIGHT_PREFIX}{n}" for n in names]] = grid_weights(table, names).numpy()
    return table
