"""The recipe's search strategy run on a loaded problem, with one result whichever strategy it is.

The gradient strategy steps on the mixture's logits through the merged model; a zero-order one
scores candidate mixtures through an Evaluator and then scores every objective term at the
closing mixtures. What ``mergeopt fit`` does next (the closing evaluations, mixture.json, the run
directory) reads a :class:`SearchOutcome` and never asks which strategy ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mergeopt.merging.weights import initial_logits, start_weights
from mergeopt.runtime import distributed
from mergeopt.search.gradient import fit_gradient

if TYPE_CHECKING:
    from mergeopt.config import OptimSection, SearchSection
    from mergeopt.loading.problem import Problem
    from mergeopt.merging.constraints import FeasibleSet
    from mergeopt.merging.groups import Groups
    from mergeopt.objectives.objective import Objective
    from mergeopt.runtime.resume import RunState


@dataclass
class SearchOutcome:
    """What a search hands the closing evaluations and mixture.json, whichever strategy ran."""

    weights: torch.Tensor  # the chosen mixture
    trace: list[dict]  # trace.csv (gradient) or evaluations.csv (zero-order)
    info: dict  # mixture.json's "search"
    logits: torch.Tensor | None = None  # gradient: the fitted logits
    stepped_levels: bool = False  # gradient: the logits are a hierarchy's two levels
    scores: dict | None = None  # zero-order: every objective term at the closing mixtures


def run_strategy(
    problem: Problem,
    objective: Objective,
    search: SearchSection,
    optim: OptimSection,
    init: Mapping[str, float] | None,
    seed: int,
    checkpoint: RunState,
    progress: bool,
    *,
    together: bool,
    feasible: FeasibleSet | None,
    groups: Groups | None,
    on_step: Callable,
    on_evaluation: Callable,
) -> SearchOutcome:
    """``search.strategy`` on ``problem`` from ``init`` (``weights.init``; None: uniform).

    ``together``: every rank scores each candidate (a sharded stack); ``feasible``: the constraints
    (None: the whole simplex); ``groups``: the hierarchy (None: flat); ``on_step`` and
    ``on_evaluation``: the tracker's.
    """
    if search.strategy == "gradient":
        return _gradient(problem, optim, init, seed, checkpoint, progress, feasible, groups, on_step)
    return _zero_order(
        problem,
        objective,
        search,
        init,
        seed,
        checkpoint,
        progress,
        together,
        feasible,
        groups,
        on_evaluation,
    )


def _gradient(problem, optim, init, seed, checkpoint, progress, searched, groups, on_step) -> SearchOutcome:
    """The gradient strategy from the recipe's start (the hierarchy's, or projected onto ``searched``)."""
    names = problem.stack.expert_names
    if groups is None:
        z0 = initial_logits(names, init)
    else:  # both levels of the hierarchy
        z0 = groups.initial_logits(None if init is None else torch.from_numpy(start_weights(names, init)))
    stepped = groups  # the logits Adam steps on: both levels, or flat under constraints
    if searched is not None:  # uniform, init or the hierarchy's start, onto the feasible set's logits
        if groups is not None:  # a held expert would still move its group's logit (search.gradient)
            z0, stepped = torch.log(groups.weights(z0)), None
        z0 = torch.from_numpy(searched.project_logits(z0.numpy()))
    result = fit_gradient(
        problem.model,
        problem.stack,
        problem.sets,
        problem.set_weights,
        optim,
        z0,
        seed,
        problem.pad_id,
        problem.device,
        progress=progress,
        checkpoint=checkpoint,
        loss_chunk=problem.loss_chunk,
        on_step=on_step,
        feasible=searched,
        groups=stepped,
    )
    chosen = result.weights
    if searched is not None:  # exact bounds: a weight pinned at 0 is 1e-300 in softmax(z)
        chosen = torch.from_numpy(searched.project(chosen.double().numpy()))
    info = {
        "steps": result.steps_run,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        **({} if result.non_finite is None else {"non_finite": result.non_finite}),
    }
    # mixture.json: the logits that were stepped on
    return SearchOutcome(chosen, result.trace, info, logits=result.logits, stepped_levels=stepped is not None)


def _better_expert(names, scores, utility, searched, value: float) -> dict | None:
    """The feasible expert alone that scores best on the fit part, when it beats the search's best
    mixture (which then never evaluated it: a lattice or a few draws can miss the vertices): the
    answer may be one domain alone, and the user must hear that the search did not find it."""
    from mergeopt.search.zero_order import utility_of

    best = None
    for name, row in zip(names, np.eye(len(names))):
        if searched is not None and not searched.contains(row.tolist()):
            continue
        alone = utility_of(utility, scores[f"{name} only"]["fit"])
        if alone is not None and math.isfinite(alone) and alone < value and (best is None or alone < best[1]):
            best = (name, alone)
    return None if best is None else {"expert": best[0], "value": value, "expert_value": best[1]}


def _zero_order(
    problem, objective, search, init, seed, checkpoint, progress, together, searched, groups, on_evaluation
) -> SearchOutcome:
    """A zero-order strategy, and every objective term scored at the closing mixtures."""
    from mergeopt.search.zero_order import report_scores, run_search, utility_of

    names = problem.stack.expert_names
    found, evaluator, utility = run_search(
        problem,
        objective,
        search,
        seed,
        None if init is None else start_weights(names, init),
        progress,
        checkpoint,
        on_evaluation,
        together=together,
        feasible=searched,
        groups=groups,
    )
    evaluator_processes = distributed.process_rank_and_size()[1]
    scores = report_scores(problem, objective, evaluator, found.weights)
    heldout_value = utility_of(utility, scores["fitted"]["heldout"])
    info = {
        "evaluations": found.evaluations,
        "budget": search.budget,
        "value": found.value,
        "heldout_value": None if heldout_value is None or not math.isfinite(heldout_value) else heldout_value,
        # under torchrun the ranks split the candidates, or (a sharded stack) score each together
        "scoring": "together" if evaluator.together else ("split" if evaluator_processes > 1 else "single"),
        "evaluations_per_process": evaluator.per_process(evaluator_processes),
        **{k: v for k, v in found.info.items() if k != "strategy"},
    }
    uniform = utility_of(utility, scores["uniform"]["fit"])  # scored for the report, not by the search
    feasible_uniform = searched is None or searched.contains([1.0 / len(names)] * len(names))
    finished = "non_finite" not in found.info  # a search a NaN stopped says so already
    if (
        finished
        and feasible_uniform
        and uniform is not None
        and math.isfinite(uniform)
        and found.value > uniform
    ):
        info["worse_than_uniform"] = {"value": found.value, "uniform_value": uniform}
    if finished and (better := _better_expert(names, scores, utility, searched, found.value)) is not None:
        info["worse_than_expert"] = better
    return SearchOutcome(torch.tensor(found.weights, dtype=torch.float64), found.log, info, scores=scores)
