"""Run a zero-order strategy on a loaded problem: scorer, utility, evaluator, search, scores to report.

The strategies in :mod:`mergeopt.search` see only a black box ``w -> scores``; this module builds
that box from the run's :class:`mergeopt.objectives.objective.Objective` (the merged model scored on the ``fit`` part of the dev sets), folds the
scores into one utility, scores the K experts first when the utility is normalised over them, and
afterwards scores the chosen, uniform and single-expert mixtures on both dev parts for the report.
Every evaluation goes through one cache, so a mixture the search already scored costs nothing here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from mergeopt.config import SearchSection
from mergeopt.errors import UserError
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.groups import Groups
from mergeopt.objectives.data import has_heldout
from mergeopt.objectives.metrics import Utility
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.scoring import make_scorer
from mergeopt.runtime import faults
from mergeopt.runtime.interrupts import stop_if_any_rank_interrupted
from mergeopt.search import STRATEGIES, Evaluator, SearchResult
from mergeopt.search.evaluator import NonFiniteScore


def make_evaluator(
    problem,
    objective: Objective,
    search: SearchSection,
    progress: bool,
    checkpoint=None,
    observe=None,
    together: bool = False,
    feasible: FeasibleSet | None = None,
    groups: Groups | None = None,
) -> tuple[Evaluator, Utility]:
    """The evaluator of the objective's utility on the fit part, experts scored first when normalising.

    With a :class:`mergeopt.runtime.resume.RunState` every real evaluation is journaled (by rank 0) and a
    resumed run's journal answers the strategy's first requests. ``observe`` sees each new
    evaluation's row (:class:`mergeopt.search.evaluator.Evaluator`). ``together``: a sharded stack
    (``model.shard: fsdp``), every rank scores each mixture.
    """
    from mergeopt.runtime.distributed import is_main

    utility = Utility(objective.terms, objective.normalize)
    names = problem.stack.expert_names
    evaluator = Evaluator(
        names,
        make_scorer(problem, objective, "fit"),
        utility,
        budget=search.budget,
        key=json.dumps(problem.stack.method, sort_keys=True),
        progress=progress,
        journal=checkpoint.append_evaluation if checkpoint is not None and is_main() else None,
        replay=checkpoint.read_evaluations() if checkpoint is not None else (),
        together=together,
        observe=observe,
        feasible=feasible,
        groups=groups,
    )
    if utility.needs_reference:
        if search.budget is not None and search.budget < len(names):
            raise UserError(
                f"search.budget {search.budget} cannot even score the {len(names)} experts that "
                "objective.normalize 'experts' needs"
            )
        evaluator.prefetch(np.eye(len(names)), "expert")
        utility.set_reference([evaluator.scores(row, "expert") for row in np.eye(len(names))])
    return evaluator, utility


def run_search(
    problem,
    objective: Objective,
    search: SearchSection,
    seed: int,
    start: np.ndarray | None = None,
    progress: bool = True,
    checkpoint=None,
    observe=None,
    together: bool = False,
    feasible: FeasibleSet | None = None,
    groups: Groups | None = None,
) -> tuple[SearchResult, Evaluator, Utility]:
    """``search.strategy`` from ``start`` (``weights.init``; None: the strategy's own start), within
    ``feasible`` (the recipe's constraints; None: the whole simplex), drawing by ``groups`` (a
    hierarchical mixture's; None: flat)."""
    evaluator, utility = make_evaluator(
        problem, objective, search, progress, checkpoint, observe, together, feasible, groups
    )
    strategy = STRATEGIES[search.strategy]
    try:
        return strategy(evaluator, search, seed, progress, start), evaluator, utility
    except NonFiniteScore as stop:  # the search ends there; what it scored before still counts
        try:
            result = evaluator.result({"strategy": search.strategy})
        except RuntimeError:  # nothing (feasible) was scored before it: there is nothing to keep
            raise stop from None
        result.info["non_finite"] = stop.record
        return result, evaluator, utility


def report_scores(
    problem, objective: Objective, evaluator: Evaluator, chosen: np.ndarray
) -> dict[str, dict[str, dict[str, float] | None]]:
    """Term scores of the chosen mixture, the uniform one and each expert, on the fit and held-out parts.

    Fit-part scores come from the evaluator's cache when the search already made them (reporting
    does not count against the search budget); held-out scores are new evaluations, None when the
    dev sets hold nothing out.
    """
    names = problem.stack.expert_names
    k = len(names)
    points = {"fitted": chosen, "uniform": np.full(k, 1.0 / k)}
    points.update({f"{n} only": row for n, row in zip(names, np.eye(k))})
    fit_score = make_scorer(problem, objective, "fit")
    held_out = has_heldout(problem.sets)
    held_score = make_scorer(problem, objective, "heldout") if held_out else None
    out = {}
    for index, (label, w) in enumerate(points.items(), 1):
        faults.reached("scores", index)  # tests only (MERGEOPT_FAULT): the index-th closing mixture's scores
        # under torchrun the dev-set loop does not check for a signal: the ranks agree here, before
        # each mixture (a Ctrl-C was ignored through these evaluations, lm-eval tasks included)
        name = f"{label[: -len(' only')]} alone" if label.endswith(" only") else f"the {label} mixture"
        stop_if_any_rank_interrupted(f"the closing evaluation of {name}")
        key = evaluator.cache_key(w)
        fit = dict(evaluator.cache[key]) if key in evaluator.cache else fit_score(w)
        out[label] = {"fit": fit, "heldout": held_score(w) if held_score else None}
    return out


def utility_of(utility: Callable, scores: dict | None) -> float | None:
    return None if scores is None else float(utility(scores))


def evaluation_columns(names: Sequence[str], rows: Sequence[dict]) -> list[str]:
    """The evaluations.csv columns: index, phase, weights, every score, value, seconds."""
    fixed = ["index", "phase", *(f"w_{n}" for n in names)]
    scores = [c for c in (rows[0] if rows else {}) if c not in fixed and c not in ("value", "seconds")]
    return [*fixed, *scores, "value", "seconds"]
