"""Scores of the merged model at a mixture w: the black box the zero-order strategies search.

One call evaluates the model at w (each layer merges as it runs: losses cost forward passes only;
generation holds the merged weights for the call), computing every objective term on one part of the dev sets: losses in one
pass over the data, exact match by greedy generation, choice accuracy by option log-likelihoods,
and user metrics called by import path. The zero-order strategies search on the ``fit`` part; the
chosen mixture is then scored on the held-out part, as the gradient strategy's early stopping does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mergeopt.objectives.loss import evaluate, target_loss
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.term_scores import load_custom, score_terms

Scorer = Callable[[np.ndarray], dict[str, float]]


def set_losses(problem, objective: Objective, w: torch.Tensor, part: str) -> torch.Tensor:
    """Mean token loss of each dev set on ``part`` of it, of the model at w."""
    return evaluate(
        problem.model,
        problem.stack,
        w,
        problem.sets,
        part,
        objective.batch_size,
        problem.pad_id,
        problem.device,
        problem.loss_chunk,
    )


def metric_scores(problem, objective: Objective, w: torch.Tensor, part: str, custom) -> dict[str, float]:
    """``{label: score}`` of each metric term on ``part`` of its dev set, the merge at w held for the call.

    ``custom`` comes from :func:`mergeopt.objectives.term_scores.load_custom`.
    """
    terms = objective.metric_terms
    if not terms:
        return {}
    with problem.stack.at(w.to(problem.device)) as merged:
        return score_terms(
            merged, problem.tokenizer, problem.sets, terms, custom, objective.batch_size, problem.device, part
        )


def make_scorer(problem, objective: Objective, part: str) -> Scorer:
    """``score(w) -> {term label: score}`` on ``part`` ('fit', 'heldout' or 'all') of the dev sets.

    Custom metric functions are imported here, before any evaluation, so a bad import path fails
    at once rather than after an hour of search.
    """
    terms = objective.terms
    custom = load_custom(objective.metric_terms)
    index = {s.name: i for i, s in enumerate(problem.sets)}
    all_sets = objective.data_weights()

    def score(weights: np.ndarray) -> dict[str, float]:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        out: dict[str, float] = {}
        if any(t.kind == "loss" for t in terms):
            means = set_losses(problem, objective, w, part)
            for term in terms:
                if term.kind == "loss" and term.dev == "all":
                    out[term.label] = float(target_loss(means, torch.ones_like(means), all_sets))
                elif term.kind == "loss":
                    out[term.label] = float(means[index[term.dev]])
        out.update(metric_scores(problem, objective, w, part, custom))
        return {t.label: out[t.label] for t in terms}  # in the recipe's order

    return score
