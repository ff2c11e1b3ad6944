"""``mergeopt calibrate RECIPE``: correct the merged proxy with the real runs so far, and say what to train next.

The loop a team runs with a few training runs to spend:

1. ``mergeopt calibrate recipe.yaml --grid runs.csv`` scores the merged proxy at the runs' mixtures,
   the experts, the fit's mixture (when ``output_dir/mixture.json`` exists) and
   ``calibrate.candidates`` Dirichlet mixtures, fits :mod:`mergeopt.evaluation.calibration` (a GP with
   the proxy as prior mean) to the runs, and writes the calibrated ranking, the pick with its 95%
   interval, and the mixture(s) to train next (by expected improvement);
2. train ``OUT/next-1`` (``mergeopt export OUT/next-1 --to FORMAT`` writes its training config);
3. append the run's row to the grid (its ``w_<expert>`` and truth columns) and rerun: the proxy's
   evaluations are journaled in ``OUT/calibrate_checkpoint``, so only new mixtures are evaluated.

With no run yet, the calibrated ranking is the proxy's and the first proposal is the proxy's pick.
Outputs in OUT (default ``output_dir/calibration``): calibration.json (typed:
:class:`mergeopt.run_files.CalibrationReport`), calibration.md, calibrated_ranking.csv,
calibration.png, and ``pick/`` and ``next-<i>/`` (each a mixture.json with the recipe beside it, what
``mergeopt export`` and ``mergeopt merge`` read).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import mergeopt
from mergeopt.cli import run_command
from mergeopt.errors import UserError
from mergeopt.evaluation import calibration
from mergeopt.evaluation.calibration_report import OUTPUT_FILES, markdown, report, write_outputs
from mergeopt.evaluation.proxy import WEIGHT_PREFIX
from mergeopt.inputs import writable_dir
from mergeopt.objectives.objective import Objective
from mergeopt.runtime import distributed
from mergeopt.runtime.exact_csv import at_line
from mergeopt.runtime.resume import (
    CALIBRATE_CHECKPOINT_DIR,
    PROXY_EVALUATIONS,
    interruptible,
    saying_where_saved,
)
from mergeopt.search.evaluator import ROUND_DECIMALS

# ----------------------------------------------------------------------------- inputs


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


def metric_values(
    frame: pd.DataFrame, column: str | None, dev_names: Sequence[str], set_weights: np.ndarray
) -> np.ndarray:
    """The metric's values in a table of losses and scores; the target is the dev sets' losses
    (``loss_<name>``, in ``dev_names``' order, whatever the table's column order) weighted as in
    the rank check."""
    from mergeopt.evaluation.proxy import LOSS_PREFIX

    if column is not None:
        return frame[column].to_numpy(dtype=float)
    return frame[[f"{LOSS_PREFIX}{name}" for name in dev_names]].to_numpy(dtype=float) @ set_weights


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
    from mergeopt.worlds.run_records import RUN_MARKER

    def fingerprint(path: Path) -> str | None:
        try:
            return json.loads((path / RUN_MARKER).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    ours = {name: fingerprint(Path(path)) for name, path in experts.items()}
    ours = {name: f for name, f in ours.items() if f}
    if not ours:
        return
    for row, path, record in runs:
        theirs = record.get("fingerprint")
        if isinstance(theirs, str) and theirs not in ours.values():
            name, mine = next(iter(ours.items()))
            raise UserError(
                f"{at_line(grid, row)}: its run was trained by another recipe (fingerprint {theirs} in "
                f"{path / RUN_MARKER}) "
                f"than the recipe's experts (model.experts.{name}: {mine}); calibrate with a grid of "
                "runs trained alongside these experts"
            )


def candidate_table(
    names: Sequence[str],
    runs: pd.DataFrame,
    fitted: dict[str, float] | None,
    count: int,
    alpha: float,
    seed: int,
    feasible=None,
) -> pd.DataFrame:
    """The mixtures scored by the proxy: the runs (first, in grid order), the experts, the fit's
    mixture and ``count`` seeded Dirichlet(alpha) draws; a mixture already listed is not repeated.

    With a :class:`~mergeopt.merging.constraints.FeasibleSet` the draws are its own (a Dirichlet
    within the box), experts outside it are left out, and the ``allowed`` column marks the
    candidates the pick and the proposals may be (the runs inform the model wherever they are).
    """
    from mergeopt.search.mixtures import dirichlet_samples

    columns = [f"{WEIGHT_PREFIX}{n}" for n in names]
    rows = [(list(w), "run") for w in runs[columns].to_numpy(dtype=float)]
    extra = [(list(w), "expert") for w in np.eye(len(names))]
    if fitted is not None:
        extra.append(([fitted[n] for n in names], "fit"))
    if feasible is None or feasible.trivial:
        draws = [[d[n] for n in names] for d in dirichlet_samples(names, alpha, count, seed)]
    else:
        draws = feasible.sample(np.random.default_rng(seed), alpha, count).tolist()
    extra += [(w, "dirichlet") for w in draws]
    inside = (lambda w: True) if feasible is None else feasible.contains
    seen = {tuple(np.round(w, ROUND_DECIMALS)) for w, _ in rows}
    for w, source in extra:
        key = tuple(np.round(w, ROUND_DECIMALS))
        if key not in seen and inside(w):
            seen.add(key)
            rows.append((w, source))
    frame = pd.DataFrame([w for w, _ in rows], columns=columns)
    frame["source"] = [source for _, source in rows]
    frame["allowed"] = [bool(inside(w)) for w, _ in rows]
    if not frame["allowed"].any():
        raise UserError("calibrate: no candidate mixture meets the recipe's weights constraints")
    return frame


def _keys(frame: pd.DataFrame, names: Sequence[str]) -> list[tuple]:
    """Each row's mixture as the Evaluator's cache rounds it."""
    weights = frame[[f"{WEIGHT_PREFIX}{n}" for n in names]].to_numpy(dtype=float)
    return [tuple(row) for row in np.round(weights, ROUND_DECIMALS)]


def evaluation_order(candidates: pd.DataFrame, journaled: Sequence[Sequence[float]], names) -> pd.DataFrame:
    """The mixtures to score, the journal's first and in its order (each replayed, at no cost), then
    every candidate not in it: the journal replays in order, and a new round's candidates (a run
    appended, another ``calibrate.candidates``) differ from the last round's."""
    columns = [f"{WEIGHT_PREFIX}{n}" for n in names]
    rows = pd.concat(
        [
            pd.DataFrame(np.asarray(journaled, dtype=float).reshape(-1, len(columns)), columns=columns),
            candidates[columns],
        ],
        ignore_index=True,
    )
    return rows[~pd.Series(_keys(rows, names)).duplicated().to_numpy()].reset_index(drop=True)


# ----------------------------------------------------------------------------- the decision


def calibrate(
    weights: np.ndarray,
    proxy: np.ndarray,
    runs: Sequence[int],
    truth: np.ndarray,
    spec,
    seed: int,
    higher_is_better: bool = False,
    allowed: np.ndarray | None = None,
) -> tuple[calibration.Posterior, calibration.Decision]:
    """Fit the calibration to ``truth`` at the candidates ``runs`` and decide over all candidates.

    Scores where higher is better are negated for the model (which minimises) and stay negated in
    the returned objects; :func:`report` turns them back.
    """
    sign = -1.0 if higher_is_better else 1.0
    runs = list(runs)
    posterior = calibration.fit(
        weights[runs], sign * np.asarray(truth, dtype=float), sign * proxy[runs], sign * proxy, spec.use_proxy
    )
    decision = calibration.decide(
        posterior,
        weights,
        sign * proxy,
        runs,
        spec.batch,
        spec.exploration,
        spec.samples,
        seed,
        allowed,
        caution=1.0 if spec.pick == "cautious" else 0.0,
    )
    return posterior, decision


def _main(args: argparse.Namespace) -> int:
    from mergeopt.config import load_recipe
    from mergeopt.loading.devices import resolve_device
    from mergeopt.runtime.rundir import check_output_dir, owned

    recipe = load_recipe(args.recipe, args.overrides)
    what = "--out" if args.out is not None else "output_dir"
    out = (
        check_output_dir(args.out, what)
        if args.out is not None
        else Path(check_output_dir(recipe.output_dir, what)) / "calibration"
    )
    writable_dir(out, "--out" if args.out is not None else "output_dir/calibration")
    distributed.init_from_env(resolve_device(recipe.device))  # every rank hears a refused --out
    with saying_where_saved(out / CALIBRATE_CHECKPOINT_DIR), interruptible(), owned(out, "calibrate", what):
        return _run(args, recipe, out)


@dataclass
class _Grid:
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


def _checked_grid(args: argparse.Namespace, recipe, objective: Objective) -> _Grid:
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
    check_grid_unit(runs, grid, recipe.weights.unit)
    checked = _Grid(grid, table, column, higher)
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


# what the proxy's value at a mixture depends on besides the inputs' contents: the model, the merge,
# the data and objective, the seed (DARE's masks, the mixup draw, the held-out split), the device
# and dtypes, and of optim the two keys that change how an evaluation is batched (device and
# eval_batch_size may still change between rounds: RunState allows them, CHANGEABLE_ON_RESUME)
PROXY_OPTIM_KEYS = ("eval_batch_size", "loss_chunk_tokens")
NOT_PROXY_SECTIONS = ("output_dir", "optim", "search", "train", "rank", "calibrate", "logging")


def proxy_tree(tree: dict) -> dict:
    """The part of the recipe's tree that keys the proxy's journal (OUT/calibrate_checkpoint).

    The journal is kept from round to round, and between rounds a user trains the proposals,
    perhaps with another ``train`` section, or tries a fit with another ``optim.lr`` or ``search``:
    none of that changes what the proxy scores, and refusing the journal for it would re-evaluate
    every candidate (thousands of forward passes at 8B)."""
    kept = {k: v for k, v in tree.items() if k not in NOT_PROXY_SECTIONS}
    optim = tree.get("optim") or {}
    return kept | {"optim": {k: optim[k] for k in PROXY_OPTIM_KEYS if k in optim}}


def _proxy_scores(
    args: argparse.Namespace, recipe, resolved, out: Path, objective: Objective, grid: _Grid, quiet: bool
):
    """(problem, candidates, their proxy scores in the candidates' order): the proxy evaluated at
    every candidate not yet in the journal (OUT/calibrate_checkpoint), which a failed first run
    leaves as it found it."""
    from mergeopt.evaluation.proxy import proxy_grid
    from mergeopt.loading.problem import load_problem
    from mergeopt.runtime.fingerprint import input_fingerprints
    from mergeopt.runtime.resume import open_state, recipe_tree

    spec, names = recipe.calibrate, recipe.expert_names
    checkpoint, resuming = open_state(
        out,
        recipe_tree(recipe),
        "restart" if args.restart else "auto",
        CALIBRATE_CHECKPOINT_DIR,
        input_fingerprints(resolved, training_data=False),
        keyed_by=proxy_tree,  # also a journal an earlier mergeopt keyed by the whole recipe
    )
    if resuming and not quiet:
        print(f"reusing the proxy's evaluations in {checkpoint.dir}")
    elif not resuming:
        checkpoint.start_lazily()
    candidates = candidate_table(
        names, grid.table, grid.fitted, spec.candidates, spec.alpha, resolved.seed, grid.feasible
    )
    journaled = [e["w"] for e in checkpoint.read_evaluations(PROXY_EVALUATIONS)] if resuming else []
    evaluated = evaluation_order(candidates, journaled, names)
    try:
        problem = load_problem(resolved, not quiet, objective)
        scored = proxy_grid(
            problem, objective, evaluated, not quiet, checkpoint, together=resolved.model.shard == "fsdp"
        )
    except UserError:
        if not resuming and distributed.is_main():
            checkpoint.clear()
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    return problem, candidates, scored.set_axis(_keys(evaluated, names)).loc[_keys(candidates, names)]


def _run(args: argparse.Namespace, recipe, out: Path) -> int:
    from mergeopt.runtime.rundir import staged
    from mergeopt.worlds import resolve_recipe

    spec, names = recipe.calibrate, recipe.expert_names
    objective = Objective.from_recipe(recipe)
    grid = _checked_grid(args, recipe, objective)
    quiet = args.quiet or not distributed.is_main()
    with distributed.main_first():
        resolved, world_roots = resolve_recipe(recipe, (lambda _m: None) if quiet else print)
    problem, candidates, scores = _proxy_scores(args, recipe, resolved, out, objective, grid, quiet)
    if not distributed.is_main():
        return 0
    a = problem.set_weights.double().numpy()
    a = a / a.sum()
    proxy = metric_values(scores, grid.column, objective.dev_names, a)
    truth = metric_values(grid.table, grid.column, objective.dev_names, a)
    weights = candidates[[f"{WEIGHT_PREFIX}{n}" for n in names]].to_numpy(dtype=float)
    posterior, decision = calibrate(
        weights,
        proxy,
        range(len(grid.table)),
        truth,
        spec,
        resolved.seed,
        grid.higher,
        candidates["allowed"].to_numpy(),
    )
    meta = {
        "grid": str(grid.path),
        "metric": spec.metric,
        "higher_is_better": grid.higher,
        "use_proxy": spec.use_proxy,
        "options": spec.model_dump(mode="json") | {"seed": resolved.seed},
        "out": str(out),
    }
    content, ranking = report(names, candidates, proxy, truth, posterior, decision, meta)
    base = {
        "unit": resolved.weights.unit,  # the grid's runs were mixed in it, and so is every proposal
        "target": resolved.data.target,
        "method": problem.stack.method,
        "device": str(problem.device),
        "processes": distributed.process_rank_and_size()[1],
        "shard": resolved.model.shard,
        "stack": problem.stack.record(resolved.model.stack_dtype),  # what merge compares its stack with
        "seed": resolved.seed,
        "worlds": {name: str(root) for name, root in world_roots.items()},
        **({"constraints": grid.record} if grid.record is not None else {}),
        "mergeopt_version": mergeopt.__version__,
    }
    # the proxy's journal (calibrate_checkpoint/) stays for the next round: it is not replaced
    with staged(out, (*OUTPUT_FILES, "pick", "next-*")) as staging:
        write_outputs(staging.path, content, ranking, names, recipe, base)
    print(markdown(content, ranking, names))
    print(f"Wrote {', '.join(OUTPUT_FILES)}, pick/ and next-*/ to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _main(args)


def main(argv: Sequence[str]) -> int:
    """``mergeopt calibrate`` from Python, with its command-line arguments."""
    return run_command("calibrate", argv)
