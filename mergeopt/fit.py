"""Fit a data mixture: ``python -m mergeopt.fit RECIPE [key=value ...] [--quiet] [--debug]``.

Loads the base and the experts, checks they can be merged, stacks the task vectors, fits the
mixture weights on the dev sets by gradient descent through the merged model, and writes the run
directory: mixture.json, trace.csv, recipe.yaml and loss_curve.png. Every input is validated
before anything is written, so a mistake leaves no half-made run behind.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from mergeopt import worlds
from mergeopt.cli import alias, run_command
from mergeopt.config import Recipe, load_recipe, recipe_to_yaml
from mergeopt.errors import UserError, warn
from mergeopt.inputs import writable_dir
from mergeopt.loading.devices import resolve_device
from mergeopt.loading.feasible import constraints_record, feasible_set, source_sizes
from mergeopt.loading.problem import Problem, load_problem
from mergeopt.memory import measured
from mergeopt.merging.groups import groups_of
from mergeopt.objectives.objective import Objective
from mergeopt.reporting import tracking
from mergeopt.reporting.fit_outputs import output_files, owned_files, write_outputs
from mergeopt.reporting.mixture_record import mixture_record
from mergeopt.reporting.outcome_warnings import warning_lines
from mergeopt.reporting.report import summary
from mergeopt.runtime import determinism, distributed
from mergeopt.runtime.fingerprint import input_fingerprints
from mergeopt.runtime.interrupts import interruptible, saying_where_saved
from mergeopt.runtime.resume import (
    CHECKPOINT_DIR,
    RunState,
    moved_by_name,
    open_state,
    recipe_tree,
    what_it_computes,
)
from mergeopt.runtime.rundir import check_apart_from_inputs, check_output_dir, owned, staged
from mergeopt.search import grid as grid_search
from mergeopt.search.strategy import run_strategy

# how a fit refused for its rank.grid goes on: a grid measured otherwise can be left out
WITHOUT_RANK = "; or set rank.grid: null to fit without the rank check"


def _checkpoint(recipe: Recipe, resume: str, resolved: Recipe | None = None) -> tuple[RunState, bool]:
    """The run's checkpoint and whether this run resumes it (``resume``: auto, require or restart);
    it records what the run reads (``resolved``: world paths resolved), and refuses to resume on
    inputs that changed."""
    inputs = input_fingerprints(resolved or recipe)
    return open_state(recipe.output_dir, recipe_tree(recipe), resume, inputs=inputs)


def fit(
    recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print, resume: str = "auto"
) -> dict:
    """Run the whole fit and write the run directory; returns the content of mixture.json.

    A checkpoint in ``recipe.output_dir`` from the same recipe is resumed (``resume``: ``auto``;
    ``require`` insists on one, ``restart`` ignores it). SIGINT/SIGTERM save the state and raise
    :class:`mergeopt.errors.Interrupted`.
    """
    with interruptible():
        determinism.apply(recipe.deterministic)  # before anything runs on the GPU
        distributed.init_from_env(resolve_device(recipe.device))  # every rank hears a refused output_dir
        with owned(recipe.output_dir, "fit", "output_dir"):
            return _fit(recipe, progress, log, resume)


def _fit(recipe: Recipe, progress: bool, log: Callable[[str], None], resume: str) -> dict:
    from mergeopt.reporting.run_report import check_report_inputs

    tracking.check_installed(recipe.logging)  # a missing tracker library is said before any work
    tracking.check_can_start(recipe)  # so is an unreachable MLflow server, or a logging.dir under a file
    # report.md sums up the other commands' files kept there: one this mergeopt cannot read is refused now
    check_report_inputs(recipe.output_dir, owned_files(recipe))
    for line in recipe.merge.unused_options() if distributed.is_main() else ():
        warn(f"{line}: the fit scores a {recipe.merge.method} merge (set merge.method to use it)")
    for line in recipe.search.unused_options() if distributed.is_main() else ():
        warn(f"{line} (set search.strategy to use it)")
    for line in recipe.logging.unused_options() if distributed.is_main() else ():
        warn(f"{line}: nothing is logged there (add it to logging.backends)")
    if not recipe.allow_test_split:  # before a world is built or a model loaded
        for term in recipe.objective.terms:
            if term.kind == "lm_eval":
                from mergeopt.objectives.lm_eval_term import check_test_split

                check_test_split(term)
    torch.manual_seed(recipe.seed)
    distributed.init_from_env(resolve_device(recipe.device))  # joined already by fit()
    measured.reset(distributed.local_device(resolve_device(recipe.device)))  # this fit's peak, on CUDA
    if not distributed.is_main():
        log, progress = (lambda _m: None), False
    with distributed.main_first():  # one rank builds a world into the cache, the others reuse it
        resolved, world_roots = worlds.resolve_recipe(recipe, log)
    check_apart_from_inputs(recipe.output_dir, resolved.input_paths(), "output_dir", "the fit")
    objective = Objective.from_recipe(resolved)  # the one reading of the recipe's objective
    grid_search.check_budget(resolved)  # a lattice larger than the budget, before any model is loaded
    if resolved.rank.grid is not None:  # a bad grid table is reported before any work
        from mergeopt.evaluation.proxy import check_grid_unit, check_truth, read_grid
        from mergeopt.worlds.grid_measures import check_measured_inputs
        from mergeopt.worlds.run_records import grid_run_records

        table = read_grid(resolved.rank.grid, resolved.expert_names)
        check_truth(table, objective, resolved.rank.grid)
        check_grid_unit(
            grid_run_records(table, resolved.rank.grid), resolved.rank.grid, resolved.weights.unit
        )
        check_measured_inputs(resolved.rank.grid, resolved, objective, WITHOUT_RANK)
    sizes = source_sizes(resolved, log)  # repetition caps' source sizes in weights.unit (None without a cap)
    feasible = feasible_set(resolved, sizes) if resolved.weights.constrained else None
    record = None if feasible is None else constraints_record(resolved, feasible, sizes)
    # a mismatched checkpoint is refused before loading
    checkpoint, resuming = _checkpoint(recipe, resume, resolved)
    if resuming:  # a tracked run resumed in another project or store would be split, before loading
        tracking.check_resumed(recipe, checkpoint)
    problem = load_problem(resolved, progress, objective)
    if resolved.rank.grid is not None:  # the grid's truth was measured on the tokens the proxy scores
        from mergeopt.worlds.grid_measures import check_measured_tokens

        check_measured_tokens(resolved.rank.grid, resolved, objective, problem.sets, WITHOUT_RANK)
    if resuming:
        changed = f", with {', '.join(checkpoint.changed)}" if checkpoint.changed else ""
        log(f"resuming from {checkpoint.dir}{changed}")
    else:  # a previous run's outputs stay until this run's replace them, all at once
        checkpoint.start_lazily()
    try:
        with tracking.tracked(recipe, checkpoint, resuming, log) as tracker:
            return _search_and_write(
                recipe,
                resolved,
                objective,
                problem,
                checkpoint,
                progress,
                log,
                world_roots,
                tracker,
                feasible,
                record,
            )
    except UserError:
        if not resuming and distributed.is_main():  # a user error writes nothing: undo this run's state
            checkpoint.discard()
            out = Path(recipe.output_dir)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def _search_and_write(
    recipe, resolved, objective, problem, checkpoint, progress, log, world_roots, tracker, feasible, record
) -> dict:
    """The search, the closing evaluations and the run directory, once the problem is loaded.

    ``feasible``: the recipe's constraints (None: none), ``record`` their mixture.json entry; a
    set that is the whole simplex is searched exactly as without constraints.
    """
    names = problem.stack.expert_names
    searched = None if feasible is None or feasible.trivial else feasible
    groups = groups_of(names, resolved.weights.groups)  # None: a flat mixture
    log(_stack_line(problem))
    found = run_strategy(
        problem,
        objective,
        resolved.search,
        resolved.optim,
        resolved.weights.init,
        resolved.seed,
        checkpoint,
        progress,
        together=resolved.model.shard == "fsdp",  # a sharded stack: every rank scores each mixture
        feasible=searched,
        groups=groups,
        on_step=tracker.step,
        on_evaluation=tracker.evaluation,
    )
    mixture = mixture_record(resolved, objective, problem, found, groups, record, world_roots)
    rank_outputs = None
    if resolved.rank.grid is not None:
        rank_outputs = _rank_on_grid(resolved, objective, problem, mixture, progress, checkpoint)
    memory = measured.peak_report(resolved, problem.model, problem.device)  # every rank: a collective
    if memory is not None:
        log(memory[0])
    if distributed.is_main():  # under torchrun every rank holds the same result; rank 0 writes it
        # staged, then published in one swap that also drops the checkpoint: a kill before it
        # leaves the previous outputs and the checkpoint to resume from, after it the new outputs
        with staged(recipe.output_dir, owned_files(resolved)) as staging:
            if rank_outputs is not None:
                from mergeopt.evaluation.proxy import read_grid
                from mergeopt.evaluation.rank_report import write_outputs as write_rank_outputs

                report, pairs, baselines = rank_outputs
                grid = read_grid(resolved.rank.grid, names)[[f"w_{n}" for n in names]]
                write_rank_outputs(report, pairs, staging.path, grid, baselines)
            write_outputs(recipe, mixture, found.trace, names, staging)
            tracker.finish(mixture, memory[1] if memory is not None else {})
        checkpoint.clear()  # finished: mixture.json is the record now (a no-op: the swap dropped it)
    return mixture


def _stack_line(problem: Problem) -> str:
    """What was stacked, where, in one log line."""
    stack, names = problem.stack, problem.stack.expert_names
    # model.shard: fsdp keeps 1/N of every matrix on each rank, and the counts are this rank's
    where = f"on {problem.device}"
    if stack.shard is not None:
        where = f"on this rank ({problem.device}), which holds 1/{stack.shard[1]} of each matrix"
    return (
        f"stacked {len(stack.deltas)} tensors ({stack.num_stacked_parameters():,} parameters x {len(names)} experts, "
        f"{stack.nbytes() / 2**20:,.1f} MiB) {where}; "
        f"{len(stack.excluded)} excluded, {len(stack.unchanged) + len(stack.shared)} equal in every expert"
        + (
            f"; {len(stack.lowrank.modules)} modules with LoRA experts kept low-rank"
            + (
                f", and {len(stack.lowrank.parameters)} whole parameters (fused expert weights, routers)"
                if stack.lowrank.parameters
                else ""
            )
            if stack.lowrank is not None
            else ""
        )
    )


def _rank_on_grid(resolved, objective, problem, mixture, progress, checkpoint) -> tuple:
    """rank.grid: the proxy ranked against the grid's real runs; adds mixture.json's ``rank`` entry
    and returns what rank_report.json and its plots are written from."""
    from mergeopt.evaluation.rank import rank_grid

    report, pairs, _, baselines = rank_grid(
        problem,
        objective,
        resolved.rank.grid,
        resolved.rank,
        resolved.seed,
        mixture,
        progress,
        checkpoint,  # the grid's evaluations are journaled beside the search's
        together=resolved.model.shard == "fsdp",
    )
    target = report["metrics"]["target"]
    mixture["rank"] = {
        "grid": resolved.rank.grid,
        "n_mixtures": report["n_mixtures"],
        **{key: target[key] for key in ("spearman", "kendall", "pairwise_accuracy", "regret")},
        "fitted_regret": report["fitted_mixture"]["regret"],
        "baselines": {  # the same numbers for what a team gets without the proxy
            name: {key: stats["target"][key] for key in ("spearman", "regret")}
            for name, stats in report["baselines"].items()
        },
    }
    return report, pairs, baselines


def check_not_complete(recipe: Recipe, state: Path, mode: str) -> None:
    """Refuse to fit a recipe again over its own complete run without --restart: a retried job or
    a recalled command line would spend the whole fit once more and replace the answer (``mergeopt
    merge`` asks for --overwrite, ``train`` skips finished runs). A fit of another recipe into the
    directory replaces the run as before (iterating on overrides into one directory), and a
    checkpoint beside a complete run (an interrupted fit over an older result) is resumed. A run
    copied with its inputs to other paths, the old ones gone, is still this recipe's."""
    out = Path(recipe.output_dir)
    if not (out / "mixture.json").is_file() or state.is_dir():
        return
    if mode == "require":
        raise UserError(f"--resume: {out} holds a complete run (mixture.json) and no checkpoint to resume")
    try:
        saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # no readable record of what ran: nothing says it is this recipe's
    now = yaml.safe_load(recipe_to_yaml(recipe, absolute_paths=True))
    # the run copied with its inputs to another disk (the old paths gone) is still this recipe's:
    # fitted again, it would spend the whole fit once more on what it already holds
    if isinstance(saved, dict) and what_it_computes(moved_by_name(saved, now)) == what_it_computes(now):
        raise UserError(
            f"{out} already holds this recipe's complete run (mixture.json): pass --restart to fit "
            "again and replace it, or choose another output_dir"
        )


def run(args: argparse.Namespace) -> int:
    """``mergeopt fit``: the parsed command line (:mod:`mergeopt.cli`) to a run directory."""
    if args.world_size is not None and not args.dry_run:
        raise UserError("--world-size plans a --dry-run; a fit takes its world size from torchrun")
    if args.device_memory is not None and not args.dry_run:
        raise UserError("--device-memory plans a --dry-run; a fit uses the memory its device has")
    if args.json and not args.dry_run:
        raise UserError("--json prints the plan of a --dry-run; a fit's result is output_dir/mixture.json")
    if args.dry_run:
        from mergeopt.memory.dry_run import run as plan

        return plan(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.resume and args.restart:
        raise UserError("--resume and --restart contradict each other")
    writable_dir(recipe.output_dir, "output_dir")  # before the fit, not after it
    log = (lambda _msg: None) if args.quiet else print
    mode = "require" if args.resume else "restart" if args.restart else "auto"
    state = Path(recipe.output_dir) / CHECKPOINT_DIR
    if mode != "restart":
        check_output_dir(recipe.output_dir, "output_dir")  # a bad output_dir is said first
        check_not_complete(recipe, state, mode)
    with saying_where_saved(state, "Rerun the same command to continue (or add --resume)."):
        mixture = fit(recipe, progress=not args.quiet, log=log, resume=mode)
    if distributed.is_main():  # the answer, printed under --quiet too
        print(summary(mixture, recipe.output_dir, output_files(recipe)))
        for line in warning_lines(mixture):
            warn(line)
        for line in kept_of_other_experts(recipe.output_dir):
            warn(line)
    return 0


def kept_of_other_experts(out: str | Path) -> list[str]:
    """Another command's files kept in the fit's directory that are of other experts than the fit's
    (a fit of another recipe replaced the run): report.md leaves them out and the fit says so."""
    from mergeopt.reporting.analysis import load_run, of_other_experts
    from mergeopt.reporting.run_report import other_experts_line

    commands = {"diagnose.json": "diagnose", "rank_report.json": "rank"}
    other = of_other_experts(load_run(out))
    return [
        other_experts_line(str(Path(out) / f), names, commands[f]) + " (report.md leaves it out)"
        for f, names in other.items()
    ]


def main(argv: Sequence[str]) -> int:
    """``mergeopt fit`` from Python: ``main(["recipes/tiny.yaml", "optim.steps=5"])``."""
    return run_command("fit", argv)


if __name__ == "__main__":
    alias("fit")
