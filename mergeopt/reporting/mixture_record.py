"""mixture.json's content, the record of a finished fit: the chosen weights, the closing
evaluations (the fitted mixture, the uniform one and each expert alone, on the whole dev sets and
their held-out parts) and what produced them (strategy, objective, merge, stack, seed, device).

Why apart from the command: what mixture.json says is the product's answer; every field is set
here, in one place, and no timing enters it (the same recipe and seed give a byte-identical file).
"""

from __future__ import annotations

import math

import torch

import mergeopt
from mergeopt.loading.problem import Problem
from mergeopt.merging.weights import as_mapping
from mergeopt.objectives.data import has_heldout
from mergeopt.objectives.loss import evaluate_sums, target_loss
from mergeopt.run_files import SCHEMA_VERSION
from mergeopt.runtime import distributed, faults
from mergeopt.runtime.interrupts import stop_if_any_rank_interrupted
from mergeopt.search.strategy import SearchOutcome


def mixture_record(resolved, objective, problem, found: SearchOutcome, groups, record, world_roots) -> dict:
    """mixture.json's content: the chosen weights, the closing evaluations (the fitted mixture, the
    uniform one, each expert alone) and what produced them."""
    names, stack, search = problem.stack.expert_names, problem.stack, resolved.search
    fitted, uniform, singles = _closing_losses(problem, found.weights, objective.batch_size)
    closing = {"fitted": fitted, "uniform": uniform, **{f"{n} only": singles[n] for n in names}}
    not_finite = [  # JSON has no NaN: such a number is recorded as null, and the user warned
        label
        for label in closing
        if _nulled(closing[label]) | (search.strategy != "gradient" and _nulled(found.scores[label]))
    ]
    search_info = found.info
    if not_finite:
        search_info["non_finite_closing"] = not_finite
    chosen = found.weights
    weights = as_mapping(names, chosen.double() / chosen.double().sum())
    mixture = {
        "schema_version": SCHEMA_VERSION,  # mergeopt.run_files.MixtureFile
        "status": "complete",
        "weights": weights,
        "unit": resolved.weights.unit,
        **({} if record is None else {"constraints": record}),
        **(
            {}
            if groups is None
            else {
                "groups": groups.record(
                    list(weights.values()), found.logits if found.stepped_levels else None
                )
            }
        ),
        "target": resolved.data.target,
        "dev_loss": fitted["dev"],
        "heldout_loss": fitted["heldout"],
        "uniform_dev_loss": uniform["dev"],
        "uniform_heldout_loss": uniform["heldout"],
        "expert_dev_loss": {n: singles[n]["dev"] for n in names},
        "expert_heldout_loss": {n: singles[n]["heldout"] for n in names},
        "per_set_dev_loss": {
            "fitted": fitted["per_set"],
            "uniform": uniform["per_set"],
            **{f"{n} only": singles[n]["per_set"] for n in names},
        },
        "strategy": search.strategy,
        "search": search_info,
        "method": stack.method,
        "objective": {
            "terms": [t.record() for t in objective.terms],
            "normalize": objective.normalize,
        },
        "seed": resolved.seed,
        "device": str(problem.device),
        "processes": distributed.process_rank_and_size()[1],
        "shard": resolved.model.shard,  # fsdp: each rank held 1/N of the stack's matrices
        "stack": stack.record(resolved.model.stack_dtype),
        "worlds": {name: str(root) for name, root in world_roots.items()},
        "mergeopt_version": mergeopt.__version__,
    }  # no timings: the same recipe and seed give a byte-identical mixture.json
    if search.strategy == "gradient":
        flat = groups.flat_logits(found.logits) if found.stepped_levels else found.logits
        mixture["logits"] = as_mapping(names, flat)  # per expert, softmax(logits) = weights
    else:
        mixture["objective"]["scores"] = found.scores
    if not all(math.isfinite(v) for v in weights.values()):
        raise RuntimeError(f"fit produced non-finite weights {weights}")
    return mixture


def _closing_losses(problem, weights: torch.Tensor, batch: int) -> tuple[dict, dict, dict[str, dict]]:
    """The losses of the fitted mixture, the uniform one and each expert alone, on every dev set:
    what mixture.json and the summary set the pick against."""
    names = problem.stack.expert_names
    fitted = _closing(problem, weights, batch, "the fitted mixture", 1)
    uniform = _closing(problem, torch.full((len(names),), 1.0 / len(names)), batch, "the uniform mixture", 2)
    singles = {
        n: _closing(problem, torch.eye(len(names))[i], batch, f"{n} alone", 3 + i)
        for i, n in enumerate(names)
    }
    return fitted, uniform, singles


def _closing(problem: Problem, weights: torch.Tensor, batch_size: int, label: str, index: int) -> dict:
    """:func:`_losses`, once the ranks agree that none received a signal (every rank makes the same
    closing evaluations in the same order; a single process reads its own flag). Under torchrun the
    dev-set loop does not check the flag (the ranks stop together), so a SIGTERM or Ctrl-C during the
    closing evaluations was ignored until the fit ended, or torchrun's agent killed the ranks."""
    faults.reached("closing", index)  # tests only (MERGEOPT_FAULT): the index-th closing evaluation starts
    stop_if_any_rank_interrupted(f"the closing evaluation of {label}")
    return _losses(problem, weights, batch_size)


def _losses(problem: Problem, weights: torch.Tensor, batch_size: int) -> dict:
    """Target and per-set losses over the whole dev sets and over their held-out parts."""
    args = (problem.model, problem.stack, weights, problem.sets)
    kwargs = {
        "batch_size": batch_size,
        "pad_id": problem.pad_id,
        "device": problem.device,
        "loss_chunk": problem.loss_chunk,
    }
    fit_s, fit_c = evaluate_sums(*args, "fit", **kwargs)
    held_s, held_c = evaluate_sums(*args, "heldout", **kwargs)
    all_means = (fit_s + held_s) / (fit_c + held_c).clamp_min(1)
    ones = torch.ones_like(all_means)
    out = {
        "dev": float(target_loss(all_means, ones, problem.set_weights)),
        "per_set": {s.name: float(v) for s, v in zip(problem.sets, all_means)},
        "heldout": None,
    }
    if has_heldout(problem.sets, problem.set_weights.tolist()):
        out["heldout"] = float(target_loss(held_s / held_c.clamp_min(1), ones, problem.set_weights))
    return out


def _nulled(numbers: dict) -> bool:
    """Replace, in place, every non-finite float in ``numbers`` (nested dicts) by None; whether any was."""
    found = False
    for key, value in numbers.items():
        if isinstance(value, dict):
            found |= _nulled(value)
        elif isinstance(value, float) and not math.isfinite(value):
            numbers[key], found = None, True
    return found
