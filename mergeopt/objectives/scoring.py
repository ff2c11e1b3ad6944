"""Scores of the merged model at a mixture w: the black box the zero-order strategies search.

One call evaluates the model at w (each layer merges as it runs: losses cost forward passes only;
generation holds the merged weights for the call), computing every objective term of the recipe on one part of the dev sets: losses in one
pass over the data, exact match by greedy generation, choice accuracy by option log-likelihoods,
and user metrics called by import path. The zero-order strategies search on the ``fit`` part; the
chosen mixture is then scored on the held-out part, as the gradient strategy's early stopping does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mergeopt.config import ObjectiveTerm, Recipe
from mergeopt.objectives.loss import evaluate, target_loss
from mergeopt.objectives.term_scores import load_custom, score_terms

Scorer = Callable[[np.ndarray], dict[str, float]]


def objective_terms(recipe: Recipe) -> tuple[ObjectiveTerm, ...]:
    """The recipe's terms; without any, the dev loss of ``data.target`` (the differentiable default)."""
    if recipe.objective.terms:
        return recipe.objective.terms
    return (ObjectiveTerm(kind="loss", dev=recipe.data.target),)


def data_weights(recipe: Recipe) -> torch.Tensor:
    """d_s: each dev set's weight in a loss term over 'all' sets."""
    return torch.tensor([d.weight for d in recipe.data.dev], dtype=torch.float32)


def loss_set_weights(recipe: Recipe) -> torch.Tensor:
    """a_s such that Σ_s a_s L_s / Σ a_s is the recipe's objective, when every term is a loss.

    Without terms this is data.target's weighting (the data weights of the targeted sets). With
    loss terms, term j (weight u_j) puts u_j on its set, or u_j · d_s / Σ d over all sets for 'all',
    so the gradient strategy fits the same weighted macro-average the zero-order ones search.
    """
    names = [d.name for d in recipe.data.dev]
    d = data_weights(recipe)
    terms = objective_terms(recipe)
    if any(t.kind != "loss" for t in terms):
        raise ValueError("loss_set_weights needs an objective made of loss terms only")
    a = torch.zeros(len(names), dtype=torch.float32)
    for term in terms:
        if term.dev == "all":
            a += term.weight * d / d.sum()
        else:
            a[names.index(term.dev)] += term.weight
    return a


def make_scorer(problem, recipe: Recipe, part: str, progress: bool = False) -> Scorer:
    """``score(w) -> {term label: score}`` on ``part`` ('fit', 'heldout' or 'all') of the dev sets.

    Custom metric functions are imported here, before any evaluation, so a bad import path fails
    at once rather than after an hour of search.
    """
    terms = objective_terms(recipe)
    metric_terms = [t for t in terms if t.kind != "loss"]
    custom = load_custom(metric_terms)
    index = {s.name: i for i, s in enumerate(problem.sets)}
    all_sets = data_weights(recipe)
    batch = recipe.optim.eval_batch_size
    model, device = problem.model, problem.device

    def score(weights: np.ndarray) -> dict[str, float]:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        out: dict[str, float] = {}
        if any(t.kind == "loss" for t in terms):
            means = evaluate(
                model, problem.stack, w, problem.sets, part, batch, problem.pad_id, device, problem.loss_chunk
            )
            for term in terms:
                if term.kind == "loss" and term.dev == "all":
                    out[term.label] = float(target_loss(means, torch.ones_like(means), all_sets))
                elif term.kind == "loss":
                    out[term.label] = float(means[index[term.dev]])
        if metric_terms:
            with problem.stack.at(w.to(device)) as merged:
                out.update(
                    score_terms(
                        merged, problem.tokenizer, problem.sets, metric_terms, custom, batch, device, part
                    )
                )
        return {t.label: out[t.label] for t in terms}  # in the recipe's order

    return score
