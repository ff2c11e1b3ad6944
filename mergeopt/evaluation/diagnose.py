"""``mergeopt diagnose``: is this set of experts one the merged proxy can be trusted with?

The proxy scores a mixture w by the merge θ(w) = θ0 + Σ_i w_i τ_i. It is known to degrade when the
experts leave the region where the loss is close to linear in θ: experts trained long (MergeMix
advises short horizons at a constant learning rate; Berasi et al. found 50k samples per expert
enough) and experts separated by a loss barrier. This module measures both, before any mixture is
fitted, and returns them as a :class:`mergeopt.run_files.DiagnoseFile` (``diagnose.json``):

* the task vectors (:mod:`mergeopt.merging.task_vectors`): ‖τ_i‖/‖θ0‖ per layer, cos(τ_i, τ_j),
  the TIES sign-conflict rate;
* the losses, every one through the proxy's own Evaluator and scorer
  (:func:`mergeopt.evaluation.proxy.proxy_evaluator`): θ0 (the base is stacked as one more expert,
  so w = e_base is θ0 exactly), each expert alone, and N points along each edge (1 − t) e_i + t e_j;
* each edge's barrier and convexity, each expert's share of the dev-loss improvement;
* flags, with the thresholds of :data:`THRESHOLDS` (heuristics: see docs/guides/diagnostics.md).

Call :func:`diagnose_recipe` from Python (point 6 of issue 16 correlates these numbers with the
proxy's Spearman and regret); the CLI (:func:`run`) writes them with diagnose.md and plots.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np

import mergeopt
from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.inputs import torchrun_variable, writable_dir
from mergeopt.run_files import SCHEMA_VERSION, DiagnoseFile, MixtureFile, read_run_file

TARGET = "target"  # the key of the target dev loss beside the dev sets' names
PHASE = "diagnose"
THRESHOLDS = {
    # an expert's ‖τ‖/‖θ0‖ this many times the others' median: trained longer or hotter than they
    "norm_outlier_ratio": 2.0,
    # an edge's barrier this share of its experts' mean loss (Frankle et al. 2020 call two networks
    # linearly connected when the error barrier is within 2 points; the same 2%, of the loss here)
    "barrier_fraction": 0.02,
    # cos(τ_i, τ_j) at or below: the experts pull the shared weights apart
    "conflicting_cosine": -0.1,
    # cos(τ_i, τ_j) at or above: the experts are nearly one, their weights hard to tell apart
    "redundant_cosine": 0.9,
}
CONVEX_TOLERANCE = 1e-6  # relative to the largest loss on the edge: float noise, not curvature
MIN_POINTS = 3
# each point is one evaluation of the dev sets on every edge; --points 100000000000 was a numpy
# MemoryError traceback (the t grid alone), and a million points days of forward passes
MAX_POINTS = 1000


def check_points(points: int) -> None:
    """An edge is scored at ``points`` evenly spaced t; a barrier needs one between the experts."""
    if points < MIN_POINTS:
        raise UserError(
            f"--points {points}: an edge needs at least {MIN_POINTS} points (both experts and one between)"
        )
    if points > MAX_POINTS:
        raise UserError(
            f"--points {points:,}: at most {MAX_POINTS:,} (each point is one evaluation of the dev sets "
            "on every edge between two experts)"
        )


def _num(value: float) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def barrier(t: Sequence[float], losses: Sequence[float]) -> float:
    """max_t [L(t) − ((1 − t) L(0) + t L(1))]: how far the loss rises above the straight line between
    the two experts (0 when it never does; the endpoints are on the line)."""
    t, losses = np.asarray(t, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    chord = (1 - t) * losses[0] + t * losses[-1]
    return float(max(0.0, np.max(losses - chord)))


def second_differences(losses: Sequence[float]) -> np.ndarray:
    """L(t − h) − 2 L(t) + L(t + h) at each interior point of an evenly spaced edge."""
    losses = np.asarray(losses, dtype=np.float64)
    return losses[:-2] - 2 * losses[1:-1] + losses[2:]


def is_convex(losses: Sequence[float]) -> bool:
    """Every second difference ≥ −tolerance (relative to the largest |loss|): convex at the points seen."""
    tolerance = CONVEX_TOLERANCE * max(1.0, float(np.max(np.abs(losses))))
    return bool(np.all(second_differences(losses) >= -tolerance))


def improvement_shares(
    base: Mapping[str, float], experts: Mapping[str, Mapping[str, float]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float | None]]]:
    """(improvement, share) per expert and metric (the target and each dev set).

    improvement_i,m = L_m(θ0) − L_m(θ_i), what expert i alone gains on m over the base. share_i,m =
    max(improvement_i,m, 0) / Σ_k max(improvement_k,m, 0): of the gains the experts make on m, the
    part expert i makes (None when no expert gains). A domain's expert should hold most of its
    domain's share; the shares are of single experts' gains, not a decomposition of a merge's.
    """
    improvement = {e: {m: base[m] - losses[m] for m in base} for e, losses in experts.items()}
    share: dict[str, dict[str, float | None]] = {e: {} for e in experts}
    for m in base:
        gains = {e: max(improvement[e][m], 0.0) for e in experts}
        total = sum(gains.values())
        for e in experts:
            share[e][m] = gains[e] / total if total > 0 else None
    return improvement, share


def _edge_weights(k: int, i: int, j: int, t: float) -> np.ndarray:
    """w = (1 − t) e_i + t e_j over the K experts and the base (last, weight 0)."""
    w = np.zeros(k + 1)
    w[i] += 1 - t
    w[j] += t
    return w


def _losses(problem, objective, points: int, progress: bool):
    """Scores of θ0, of each expert and of each edge's points, through the proxy's Evaluator."""
    from mergeopt.evaluation.proxy import LOSS_PREFIX, proxy_evaluator, target_loss_of

    names = problem.stack.expert_names[:-1]
    k = len(names)
    evaluator = proxy_evaluator(problem, replace(objective, terms=()), progress)
    target = target_loss_of(problem)
    ts = np.linspace(0.0, 1.0, points)
    base_w = np.zeros(k + 1)
    base_w[k] = 1.0
    mixtures = [base_w, *np.eye(k + 1)[:k]]
    mixtures += [_edge_weights(k, i, j, t) for i, j in combinations(range(k), 2) for t in ts]
    with evaluator.running("diagnose", None, evaluator.uncached(mixtures)):
        evaluator.prefetch(mixtures, PHASE)

    def row(w: np.ndarray) -> dict[str, float]:
        scores = evaluator.scores(w, PHASE)
        return {TARGET: target(scores), **{s.name: scores[f"{LOSS_PREFIX}{s.name}"] for s in problem.sets}}

    base = row(base_w)
    experts = {name: row(w) for name, w in zip(names, mixtures[1 : k + 1])}
    edges = {(i, j): [row(_edge_weights(k, i, j, t)) for t in ts] for i, j in combinations(range(k), 2)}
    return ts, base, experts, edges


def _edge(names, i, j, ts, rows) -> dict:
    target = [r[TARGET] for r in rows]
    level = (target[0] + target[-1]) / 2
    height = barrier(ts, target)
    return {
        "experts": [names[i], names[j]],
        "t": [float(t) for t in ts],
        "target": target,
        "per_set": {s: [r[s] for r in rows] for s in rows[0] if s != TARGET},
        "barrier": height,
        "relative_barrier": height / level if level > 0 else None,
        "convex": is_convex(target),
        "min_second_difference": _num(second_differences(target).min()) if len(target) > 2 else None,
    }


def find_flags(
    names: Sequence[str],
    relative_norm: Sequence[float | None],
    cosine: Sequence[Sequence[float | None]],
    edges: Sequence[dict],
    improvement: Mapping[str, Mapping[str, float]],
    thresholds: Mapping[str, float] = THRESHOLDS,
) -> list[dict]:
    """The conditions under which the proxy is known or suspected to degrade, one dict per finding."""
    return [
        *_norm_outliers(names, relative_norm, thresholds["norm_outlier_ratio"]),
        *_large_barriers(edges, thresholds["barrier_fraction"]),
        *_cosine_flags(names, cosine, thresholds["conflicting_cosine"], thresholds["redundant_cosine"]),
        *_no_gain(improvement),
    ]


def _flag(kind: str, experts: list[str], value: float, threshold: float, message: str) -> dict:
    return {"kind": kind, "experts": experts, "value": value, "threshold": threshold, "message": message}


def _norm_outliers(names: Sequence[str], relative_norm: Sequence[float | None], ratio: float) -> list[dict]:
    """Experts whose ‖τ‖/‖θ0‖ is ``ratio`` times the other experts' median or more."""
    flags = []
    for i, name in enumerate(names):
        others = [r for j, r in enumerate(relative_norm) if j != i and r is not None]
        if relative_norm[i] is None or not others or np.median(others) <= 0:
            continue
        value = relative_norm[i] / float(np.median(others))
        if value >= ratio:
            message = (
                f"expert {name}: ‖τ‖/‖θ0‖ is {value:.1f}× the other experts' median; "
                "trained longer or at a higher learning rate? Far from θ0 the merge stops being a "
                "good proxy (MergeMix: short horizons at a constant learning rate)"
            )
            flags.append(_flag("norm_outlier", [name], value, ratio, message))
    return flags


def _large_barriers(edges: Sequence[dict], fraction: float) -> list[dict]:
    """Edges whose loss rises above the straight line by ``fraction`` of the experts' mean loss or more."""
    flags = []
    for edge in edges:
        if edge["relative_barrier"] is not None and edge["relative_barrier"] >= fraction:
            a, b = edge["experts"]
            message = (
                f"edge {a}–{b}: the loss rises {edge['barrier']:.4g} above the straight line, "
                f"{edge['relative_barrier']:.1%} of the experts' mean loss; the proxy scores the mixtures "
                "between them by a merge that is worse than the line, unlike training on them"
            )
            flags.append(_flag("large_barrier", [a, b], edge["relative_barrier"], fraction, message))
    return flags


def _cosine_flags(
    names: Sequence[str], cosine: Sequence[Sequence[float | None]], low: float, high: float
) -> list[dict]:
    """Pairs of experts whose task vectors conflict (cosine ≤ ``low``) or are redundant (≥ ``high``)."""
    flags = []
    for i, j in combinations(range(len(names)), 2):
        c = cosine[i][j]
        if c is not None and c <= low:
            kind, threshold, why = "conflicting_task_vectors", low, "they pull the shared weights apart"
        elif c is not None and c >= high:
            kind, threshold, why = "redundant_experts", high, "their weights are hard to tell apart"
        else:
            continue
        message = f"experts {names[i]} and {names[j]}: cos(τ_i, τ_j) = {c:.2f}; {why}"
        flags.append(_flag(kind, [names[i], names[j]], c, threshold, message))
    return flags


def _no_gain(improvement: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Experts that improve no dev set over θ0 (the target's own row aside)."""
    flags = []
    for name, gains in improvement.items():
        sets = {m: v for m, v in gains.items() if m != TARGET}
        if sets and max(sets.values()) <= 0:
            message = f"expert {name} improves no dev set over θ0: is it the expert you meant?"
            flags.append(_flag("no_gain", [name], max(sets.values()), 0.0, message))
    return flags


def _task_vectors(stats, names: Sequence[str], prepared: bool) -> dict:
    def rows(matrix) -> list:
        return [[_num(v) for v in row] for row in matrix]

    per_layer = stats.relative_norms_per_layer
    return {
        "vectors": "prepared task vectors" if prepared else "task vectors",
        "entries": stats.entries,
        "base_norm": stats.base_norm,
        "norm": {n: float(v) for n, v in zip(names, stats.norms)},
        "relative_norm": {n: _num(v) for n, v in zip(names, stats.relative_norms)},
        "relative_norm_per_layer": {n: [_num(v) for v in per_layer[:, i]] for i, n in enumerate(names)},
        "cosine": rows(stats.cosines),
        "cosine_per_layer": [rows(m) for m in stats.cosines_per_layer],
        "sign_conflicts": {
            "density": stats.density,
            "contested": int(sum(stats.contested)),
            "conflicting": int(sum(stats.conflicting)),
            "rate": _num(stats.conflict_rate),
            "per_layer": [_num(v) for v in stats.conflict_rate_per_layer],
            "pairwise": rows(stats.pairwise_conflict_rate),
        },
    }


def diagnose(problem, objective, recipe: Recipe, points: int = 5, progress: bool = False) -> DiagnoseFile:
    """Every diagnostic of a problem loaded with ``base_expert`` (:func:`load_diagnosed`).

    ``recipe`` names the target, the merge (``merge.density`` is the sign conflicts' trim) and the
    stack dtype; ``points`` per edge, both experts included.
    """
    from mergeopt.merging.task_vectors import task_vector_stats

    check_points(points)
    names = problem.stack.expert_names[:-1]
    stats = task_vector_stats(problem.stack, recipe.merge.density)
    ts, base, experts, edge_rows = _losses(problem, objective, points, progress)
    edges = [_edge(names, i, j, ts, rows) for (i, j), rows in edge_rows.items()]
    improvement, share = improvement_shares(base, experts)
    vectors = _task_vectors(stats, names, problem.stack.method["name"] != "linear")
    cosine = vectors["cosine"]
    flags = find_flags(names, list(vectors["relative_norm"].values()), cosine, edges, improvement)
    record = {
        "schema_version": SCHEMA_VERSION,
        "experts": list(names),
        "dev_sets": [s.name for s in problem.sets],
        "target": recipe.data.target,
        "method": problem.stack.method,
        "stack_dtype": recipe.model.stack_dtype,
        "points": points,
        "layers": list(stats.layers),
        "task_vectors": vectors,
        "losses": {"base": base, "experts": experts, "improvement": improvement, "share": share},
        "edges": edges,
        "flags": flags,
        "thresholds": dict(THRESHOLDS),
        "mergeopt_version": mergeopt.__version__,
    }
    return DiagnoseFile.model_validate(record)


def load_diagnosed(recipe: Recipe, progress: bool = False, log=print):
    """(resolved recipe, problem with θ0 stacked last, objective): what :func:`diagnose` takes."""
    from mergeopt import worlds
    from mergeopt.loading.problem import load_problem
    from mergeopt.merging.task_vectors import BASE_EXPERT
    from mergeopt.objectives.objective import Objective

    if recipe.model.shard != "none":
        raise UserError("diagnose reads the whole stack in one process: set model.shard=none")
    if torchrun_variable("WORLD_SIZE") > 1:
        raise UserError("diagnose runs in one process: start it without torchrun")
    if TARGET in {d.name for d in recipe.data.dev}:
        raise UserError(f"dev set {TARGET!r} has the name diagnose gives the target loss: rename the dev set")
    resolved, _ = worlds.resolve_recipe(recipe, log)
    objective = Objective.from_recipe(resolved)
    return resolved, load_problem(resolved, progress, objective, base_expert=BASE_EXPERT), objective


def diagnose_recipe(
    recipe: Recipe | str | Path, overrides: Sequence[str] = (), points: int = 5
) -> DiagnoseFile:
    """The diagnostics of a recipe (a :class:`Recipe`, or a YAML path with ``key=value`` overrides)."""
    from mergeopt.config import load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    check_points(points)  # before anything is loaded
    resolved, problem, objective = load_diagnosed(recipe, progress=False, log=lambda _m: None)
    return diagnose(problem, objective, resolved, points)


def check_fit_experts(out: str | Path, recipe: Recipe) -> None:
    """A fit's mixture.json in ``out`` over other experts than the recipe's is refused, as ``mergeopt
    rank`` refuses it: report.md would set that fit beside diagnostics of other experts."""
    path = Path(out) / MixtureFile.FILE
    if not path.is_file():
        return
    names = read_run_file(MixtureFile, out).names
    if set(names) != set(recipe.model.experts):
        raise UserError(
            f"{path}: its weights name {sorted(names)} but the recipe's experts are "
            f"{sorted(recipe.model.experts)}: give diagnose another --out"
        )


def run(args: argparse.Namespace) -> int:
    """``mergeopt diagnose``: diagnose.json, diagnose.md and plots in --out (default: output_dir)."""
    from mergeopt.config import load_recipe
    from mergeopt.reporting.diagnostics import FILES, write_diagnostics
    from mergeopt.reporting.run_report import check_report_inputs, write_report
    from mergeopt.runtime.rundir import check_apart_from_inputs, owned, staged

    recipe = load_recipe(args.recipe, args.overrides)
    check_points(args.points)
    target = args.out if args.out is not None else recipe.output_dir
    check_apart_from_inputs(target, recipe.input_paths(), "--out" if args.out else "output_dir", "diagnose")
    writable_dir(args.out or recipe.output_dir, "--out" if args.out else "output_dir")
    log = (lambda _m: None) if args.quiet else print
    what = "--out" if args.out is not None else "output_dir"
    with owned(args.out if args.out is not None else recipe.output_dir, "diagnose", what) as out:
        check_report_inputs(out, FILES)  # report.md is rewritten from them: refused now, not after the work
        check_fit_experts(out, recipe)
        resolved, problem, objective = load_diagnosed(recipe, not args.quiet, log)
        record = diagnose(problem, objective, resolved, args.points, progress=not args.quiet)
        # published in one swap; a fit's or rank's files in the directory are kept
        with staged(out, (*FILES, "report.md", "simplex.png")) as staging:
            files = write_diagnostics(record, staging.path)
            staging.carry_over()  # report.md gains its Diagnostics section and keeps a fit's
            write_report(staging.path, name=out.name)
    for flag in record.flags:
        print(f"flag {flag.kind}: {flag.message}")
    if not record.flags:
        print("no flags: nothing in these experts is known to degrade the proxy")
    print(f"Wrote {', '.join(files)}, report.md to {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt diagnose`` from Python, with its command-line arguments."""
    from mergeopt.cli import run_command

    return run_command("diagnose", argv)
