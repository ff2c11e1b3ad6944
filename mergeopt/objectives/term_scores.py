"""Metric objective terms of a whole model on whole dev sets: the ``score_<label>`` columns of grid.csv.

A rank check is only fair if the truth (a model trained on mixture w) and the proxy (the merge at
w) are scored the same way. Both sides therefore read their dev sets with :func:`load_dev_sets`,
which reads them exactly as :func:`mergeopt.loading.problem.load_problem` does (same truncation, cap, split
and order), and score every non-loss term of the objective with :func:`score_terms` on *all* records
of the term's set, with a model that already holds the weights to score. Losses are not terms
here: grid.csv has one ``loss_<dev set>`` column per dev set already.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeopt.config import DataSection, ObjectiveTerm
from mergeopt.errors import UserError
from mergeopt.objectives import chat, metrics
from mergeopt.objectives.data import DevSet, load_dev_set
from mergeopt.objectives.metrics import MetricFn
from mergeopt.runtime.distributed import all_reduce_sum, shard

SCORE_PREFIX = "score_"


def score_column(term: ObjectiveTerm) -> str:
    """The grid.csv column of a term; the label is kept verbatim (the CSV writer quotes it if needed)."""
    return f"{SCORE_PREFIX}{term.label}"


def load_custom(terms: Sequence[ObjectiveTerm]) -> dict[str, MetricFn]:
    """Import every custom metric up front, so a typo in its path fails before any training or merging."""
    return {t.label: metrics.load_metric_function(t.function) for t in terms if t.kind == "custom"}


RECORD_FIELDS = {
    "exact_match": (
        "prompt/completion, prompt/choices/answer or conversation (ending with the assistant's answer)",
        lambda r: chat.answerable(r) if chat.is_chat(r) else "prompt" in r,
    ),
    "choice_accuracy": ("prompt/choices/answer", lambda r: "choices" in r),
}


def check_term_records(sets: Sequence[DevSet], terms: Sequence[ObjectiveTerm]) -> None:
    """Refuse a term whose dev set holds records it cannot score (or whose lm-eval task does not
    exist or cannot load its data, or whose custom function does not import), before any model is
    loaded: fit loads the dev sets before it stacks the experts, which takes minutes on a large model."""
    by_name = {s.name: s for s in sets}
    for term in terms:
        if term.kind == "custom":
            metrics.load_metric_function(term.function)
        if term.kind == "lm_eval":
            from mergeopt.objectives.lm_eval_term import check_task_loads

            check_task_loads(term)
        if term.kind not in RECORD_FIELDS:
            continue
        needs, suits = RECORD_FIELDS[term.kind]
        for ex in by_name[term.dev].all:
            if not suits(ex.record):
                raise UserError(
                    f"objective term {term.label!r}: {term.kind} needs {needs} records, but dev set "
                    f"{term.dev!r} has a record with the fields {sorted(ex.record)}"
                )


def load_dev_sets(
    data: DataSection, seed: int, tokenizer, terms: Sequence[ObjectiveTerm] = ()
) -> list[DevSet]:
    """The dev sets as fit's problem loads them, so the truth is scored on the proxy's records, in its order.

    ``seed`` is the recipe's (it draws the held-out split). Each metric term's records are checked
    to suit it (:func:`check_term_records`). Records in the same order make the batches of both
    sides identical, so at a vertex of the simplex (where the merge is the expert) the two scores
    agree to rounding, not just in law.
    """
    sets = [
        load_dev_set(
            d.name,
            d.path,
            d.weight,
            tokenizer,
            data.max_length,
            data.heldout_fraction,
            seed,
            data.max_examples,
        )
        for d in data.dev
    ]
    check_term_records(sets, terms)
    return sets


def _split_over_ranks(term, records, model, tokenizer, batch_size, device) -> float:
    """A per-record accuracy: each torchrun rank scores its share; hits and counts are summed."""
    mine = shard(records)
    if not mine:
        hits = 0.0
    elif term.kind == "exact_match":
        hits = len(mine) * metrics.exact_match(
            model, tokenizer, mine, term.max_new_tokens, batch_size, device, term.stop
        )
    else:
        hits = len(mine) * metrics.choice_accuracy(
            model, tokenizer, mine, term.length_normalize, batch_size, device
        )
    total = all_reduce_sum(torch.tensor([hits, len(mine)], dtype=torch.float64))
    return float(total[0] / total[1])


def score_terms(
    model: torch.nn.Module,
    tokenizer,
    sets: Sequence[DevSet],
    terms: Sequence[ObjectiveTerm],
    custom: dict[str, MetricFn],
    batch_size: int,
    device: torch.device | str,
    part: str = "all",
) -> dict[str, float]:
    """``{label: score}`` of each metric term on ``part`` of its dev set ('all': fit and held-out).

    ``custom`` comes from :func:`load_custom`. The model must already hold the weights to score:
    a trained run's checkpoint, or the merge written into the model's own parameters.
    """
    by_name = {s.name: s for s in sets}
    out = {}
    for term in terms:
        if term.kind == "lm_eval":  # the task's own data: parts do not apply
            from mergeopt.objectives.lm_eval_term import lm_eval_score

            out[term.label] = lm_eval_score(term, model, tokenizer, batch_size, device)
            continue
        records = [ex.record for ex in getattr(by_name[term.dev], part)]
        if term.kind in ("exact_match", "choice_accuracy"):
            value = _split_over_ranks(term, records, model, tokenizer, batch_size, device)
        elif term.kind == "custom":
            value = metrics.call_metric(custom[term.label], term.label, model, tokenizer, records)
        else:
            raise ValueError(f"{term.label}: a {term.kind} term has no score column (use loss_<dev set>)")
        out[term.label] = value
    return out
