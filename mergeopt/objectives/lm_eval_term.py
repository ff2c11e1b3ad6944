"""lm-eval-harness tasks as objective terms, scored on the merged model in memory (extra ``[lm-eval]``).

Teams already write their benchmarks as lm-eval tasks. mergekit-evolve writes every candidate
merge to disk and runs lm-eval on it; here lm-eval's ``HFLM`` wraps the model object itself, whose
parameters hold the merge at w (the stack merges into them), so a candidate costs one evaluation
and no checkpoint. The task index is built once per process. Local tasks (a YAML with
``dataset_path: json`` over your files) come from ``include_path``; the task's own split is
scored, so fit and held-out parts of the dev sets do not apply to these terms. lm-eval seeds
Python, numpy and torch's global generators at every evaluation (its ``simple_evaluate`` does).
"""

from __future__ import annotations

import functools
import logging

import torch

from mergeopt.config import ObjectiveTerm
from mergeopt.errors import UserError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "objective terms of kind lm_eval need lm-eval-harness: pip install 'mergeopt[lm-eval]'"
        ) from None
    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # it warns about the model object it is given
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval, HFLM, TaskManager


def result_key(metric: str) -> str:
    """lm-eval names results '<metric>,<filter>'; a bare metric means the 'none' filter."""
    return metric if "," in metric else f"{metric},none"


@functools.cache
def _task_manager(include_path: str | None):
    """Indexing lm-eval's own tasks takes seconds: once per process and include path."""
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=include_path, include_defaults=include_path is None)


def check_task(term: ObjectiveTerm) -> None:
    """The task exists (before any model is loaded or merged)."""
    if term.task not in _task_manager(term.include_path).all_tasks:
        where = f"in {term.include_path}" if term.include_path else "among lm-eval's tasks"
        raise UserError(f"objective term {term.label!r}: no lm-eval task {term.task!r} {where}")


def lm_eval_score(
    term: ObjectiveTerm, model: torch.nn.Module, tokenizer, batch_size: int, device: torch.device | str
) -> float:
    """The term's metric for ``model`` as it is now (holding the merge at w) on the term's task."""
    lm_eval, HFLM, _ = _lm_eval()
    check_task(term)
    wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results = lm_eval.simple_evaluate(
        model=wrapper,
        tasks=[term.task],
        task_manager=_task_manager(term.include_path),
        limit=term.limit,
        log_samples=False,
        verbosity="ERROR",
    )["results"][term.task]
    name = result_key(term.metric)
    if name not in results:
        known = sorted(k for k in results if "," in k and "_stderr" not in k)
        raise UserError(
            f"objective term {term.label!r}: task {term.task!r} reports no metric {name!r} "
            f"(it reports {', '.join(known)})"
        )
    return float(results[name])
