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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

import mergeopt
from mergeopt.cli import run_command
from mergeopt.errors import UserError
from mergeopt.evaluation import calibration
from mergeopt.evaluation.calibrate_inputs import CheckedGrid, checked_grid
from mergeopt.evaluation.calibration_report import OUTPUT_FILES, markdown, report, write_outputs
from mergeopt.evaluation.proxy import WEIGHT_PREFIX
from mergeopt.inputs import writable_dir
from mergeopt.objectives.objective import Objective
from mergeopt.runtime import distributed
from mergeopt.runtime.interrupts import interruptible, saying_where_saved
from mergeopt.runtime.resume import CALIBRATE_CHECKPOINT_DIR, PROXY_EVALUATIONS
from mergeopt.search.evaluator import ROUND_DECIMALS

# ----------------------------------------------------------------------------- the candidates


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


def warn_of_another_scale(proxy_at_runs: pd.DataFrame, runs: pd.DataFrame, dev_names, path) -> None:
    """Warn of a truth loss column that is not on the proxy's scale (mean token loss in nats).

    A trained model's loss and the merged proxy's at the same mixture are close: the median of
    their ratio over the runs is 0.9 to 1.1 for every dev set of the committed tiny and SmolLM2
    grids. A perplexity is at least e times its own loss (e^L / L >= e), so beyond 2 times the
    proxy's wherever the trained loss is at least 0.74 times the proxy's (a bound of e would miss
    it at 0.9 times, for proxy losses of 0.7 to 1.7 nats, as fine-tuning's are); a percentage or a
    summed loss is far beyond, a loss in log10 at 0.43. The calibration would read such a column as
    a level and a slope the runs do not have. A real loss at more than twice the proxy's is more
    likely a mistake than a measurement, and is said as a warning only. The caller leaves out the
    rows of mergeopt train's runs: their losses are the proxy's own measure, and one run's ratio can
    be far from the median's (3.0 for brackets at arith 1/3, markov 2/3 on the tiny grid, a domain
    the run never saw), so a first round of one such run was warned of as a perplexity.
    """
    from mergeopt.errors import warn
    from mergeopt.evaluation.proxy import LOSS_PREFIX

    if len(runs) == 0:  # a grid of only its header line: no run to compare (numpy's median warns)
        return
    for name in dev_names:
        column = f"{LOSS_PREFIX}{name}"
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.median(runs[column].to_numpy(float) / proxy_at_runs[column].to_numpy(float)))
        if np.isfinite(ratio) and not 0.5 <= ratio <= 2.0:
            warn(
                f"{path}: {column} is {ratio:.3g}x the proxy's loss at the same mixtures (median over "
                f"the runs): calibrate expects the mean token loss in nats, as the proxy's (not a "
                "perplexity, a percentage or a summed loss)"
            )


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
    from mergeopt.runtime.rundir import check_apart_from_inputs, check_output_dir, owned

    recipe = load_recipe(args.recipe, args.overrides)
    what = "--out" if args.out is not None else "output_dir"
    out = (
        check_output_dir(args.out, what)
        if args.out is not None
        else Path(check_output_dir(recipe.output_dir, what)) / "calibration"
    )
    check_apart_from_inputs(out, recipe.input_paths(), what, "calibrate")
    writable_dir(out, "--out" if args.out is not None else "output_dir/calibration")
    distributed.init_from_env(resolve_device(recipe.device))  # every rank hears a refused --out
    with saying_where_saved(out / CALIBRATE_CHECKPOINT_DIR), interruptible(), owned(out, "calibrate", what):
        return _run(args, recipe, out)


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
    args: argparse.Namespace,
    recipe,
    resolved,
    out: Path,
    objective: Objective,
    grid: CheckedGrid,
    quiet: bool,
):
    """(problem, candidates, their proxy scores in the candidates' order): the proxy evaluated at
    every candidate not yet in the journal (OUT/calibrate_checkpoint), which a failed first run
    leaves as it found it."""
    from mergeopt.evaluation.proxy import proxy_grid
    from mergeopt.loading.problem import load_problem
    from mergeopt.runtime.fingerprint import input_fingerprints
    from mergeopt.runtime.resume import open_state, recipe_tree
    from mergeopt.worlds.grid_measures import check_measured_tokens

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
        problem = load_problem(resolved, not quiet, objective, trains=False)  # evaluations only
        check_measured_tokens(grid.path, resolved, objective, problem.sets)
        scored = proxy_grid(
            problem, objective, evaluated, not quiet, checkpoint, together=resolved.model.shard == "fsdp"
        )
    except UserError:
        if not resuming and distributed.is_main():  # a user error leaves no state behind
            checkpoint.discard()
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    return problem, candidates, scored.set_axis(_keys(evaluated, names)).loc[_keys(candidates, names)]


def _run(args: argparse.Namespace, recipe, out: Path) -> int:
    from mergeopt.runtime.rundir import staged
    from mergeopt.worlds import resolve_recipe
    from mergeopt.worlds.grid_measures import check_measured_inputs

    spec, names = recipe.calibrate, recipe.expert_names
    objective = Objective.from_recipe(recipe)
    grid = checked_grid(args, recipe, objective)
    quiet = args.quiet or not distributed.is_main()
    with distributed.main_first():
        resolved, world_roots = resolve_recipe(recipe, (lambda _m: None) if quiet else print)
    check_measured_inputs(grid.path, resolved, objective)  # the runs' truth was measured on these records
    problem, candidates, scores = _proxy_scores(args, recipe, resolved, out, objective, grid, quiet)
    if not distributed.is_main():
        return 0
    a = problem.set_weights.double().numpy()
    a = a / a.sum()
    proxy = metric_values(scores, grid.column, objective.dev_names, a)
    truth = metric_values(grid.table, grid.column, objective.dev_names, a)
    if grid.column is None:  # train's runs were measured as the proxy measures: only the other rows
        typed = [i for i in range(len(grid.table)) if i not in set(grid.trained)]
        warn_of_another_scale(scores.iloc[typed], grid.table.iloc[typed], objective.dev_names, grid.path)
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
