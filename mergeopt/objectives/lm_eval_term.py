"""lm-eval-harness tasks as objective terms, scored on the merged model in memory (extra ``[lm-eval]``).

Teams already write their benchmarks as lm-eval tasks. mergekit-evolve writes every candidate
merge to disk and runs lm-eval on it; here lm-eval's ``HFLM`` wraps the model object itself, whose
parameters hold the merge at w (the stack merges into them), so a candidate costs one evaluation
and no checkpoint. The task index is built once per process. Local tasks (a YAML with
``dataset_path: json`` over your files) come from ``include_path``; the task's own split is
scored, so fit and held-out parts of the dev sets do not apply to these terms. lm-eval seeds
Python, numpy and torch's global generators at every evaluation (its ``simple_evaluate`` does).

Under torchrun each process scores its own candidates, or, with a sharded stack
(``model.shard: fsdp``), every rank scores each candidate together. lm-eval is told it is one
process either way (a model object makes ``HFLM`` rank 0 of 1), so it never splits requests over
the ranks: with a sharded stack every rank runs the whole task, the same forward passes in the
same order, which is what keeps the ranks' weight gathers in step (lm-eval runs tensor-parallel
models the same way). Generation is kept in step by ``generate(synced_gpus=True)`` too, as
:func:`mergeopt.objectives.metrics.greedy_continuations` does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import torch

from mergeopt.config import ObjectiveTerm
from mergeopt.errors import UserError, did_you_mean
from mergeopt.merging.sharded_merge import is_sharded


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
    known = _task_manager(term.include_path).all_tasks
    if term.task not in known:
        where = f"in {term.include_path}" if term.include_path else "among lm-eval's tasks"
        raise UserError(
            f"objective term {term.label!r}: no lm-eval task {term.task!r} {where}"
            f"{did_you_mean(term.task, known)}"
        )


@functools.cache
def _build_task(task: str, include_path: str | None) -> dict:
    """Build ``task`` once per process (its data loaded): fit, rank and train check it alike; the
    task names map to their built tasks. datasets' bars ("Generating validation split") are kept
    off the console, as for the dev sets. ``TaskManager.load`` builds it where lm-eval has it
    (0.4.12 on: its ``get_task_dict``, all that 0.4.8 to 0.4.11 offer, is deprecated there and
    will be removed)."""
    from mergeopt.objectives.data_files import quiet_datasets

    manager = _task_manager(include_path)
    with quiet_datasets():
        if hasattr(manager, "load"):
            return manager.load([task])["tasks"]
        from lm_eval.tasks import get_task_dict

        return get_task_dict([task], manager)


def check_task_loads(term: ObjectiveTerm) -> None:
    """The task exists and lm-eval can build it, which loads its dataset: a data file that is not
    there or a hub dataset out of reach is said in one line before any model is loaded, not at the
    first evaluation, after the experts are stacked. The dataset is then in datasets' cache."""
    check_task(term)
    try:
        built = _build_task(term.task, term.include_path)
    except Exception as error:  # datasets and lm-eval raise many kinds for data they cannot read
        reason = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, FileNotFoundError):
            hint = ""
        elif (problem := _template_problem(error)) is not None:  # the data loaded; a template failed
            hint = f"; a doc_to_text, doc_to_target or doc_to_choice template of the task {problem}"
        else:
            hint = "; a hub dataset needs the network once, then HF_DATASETS_OFFLINE=1 reads datasets' cache"
        raise UserError(
            f"objective term {term.label!r}: lm-eval task {term.task!r} could not load its data "
            f"({type(error).__name__}: {reason}){hint}"
        ) from error
    check_direction(term, built.get(term.task))


def _template_problem(error: BaseException) -> str | None:
    """What is wrong with the task's own templates, when ``error`` is theirs (``{{question}}`` over
    records that have no ``question``, a Jinja syntax error, an error raised by the template's
    code), which the advice about hub datasets and the network would only mislead; else None."""
    try:
        from jinja2 import TemplateError, UndefinedError
    except ImportError:  # pragma: no cover - lm-eval requires jinja2
        return None
    if isinstance(error, UndefinedError):
        return "names a field its records lack"
    if isinstance(error, TemplateError):  # a syntax error, an unknown filter or test
        return "is not valid Jinja"
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":  # Jinja's code of a template from a string
            return "fails on the task's records"
        tb = tb.tb_next
    return None


def check_direction(term: ObjectiveTerm, task) -> None:
    """Refuse a term whose metric its task does not declare, or whose direction contradicts the
    one the task declares for it.

    ``higher_is_better`` defaults to true, and lm-eval's own tasks say which way each metric is
    better (perplexity: lower): a term on perplexity that leaves the default would make the search
    maximise it and return the worst mixture without a word. A misspelt metric would otherwise be
    found at the first evaluation, after the experts are stacked; it is refused here only for a
    task that reports no other metrics (:func:`_reports_declared_only`). A group or tag (no single
    task) is left as it is.
    """
    declared = getattr(task, "higher_is_better", None)
    if declared is None:
        return
    directions = declared() or {}
    metric = term.metric.partition(",")[0]
    if directions and metric not in directions and _reports_declared_only(task):
        raise UserError(
            f"objective term {term.label!r}: task {term.task!r} has no metric {metric!r} "
            f"(it has {', '.join(sorted(directions))}); set the term's metric to one of them"
        )
    better = directions.get(metric)
    if better is not None and bool(better) != term.higher_is_better:
        said, way = ("true", "higher") if term.higher_is_better else ("false", "lower")
        raise UserError(
            f"objective term {term.label!r}: task {term.task!r} declares {metric} better "
            f"{'higher' if better else 'lower'}, but the term has higher_is_better: {said} and would "
            f"seek it {way}; set higher_is_better: {str(bool(better)).lower()} on the term"
        )


def _reports_declared_only(task) -> bool:
    """Whether the task reports no metric but those it declares: each of its metrics is one of
    lm-eval's registered ones (one number per document). A function of the task's own or of HF
    evaluate may return several results (HumanEval's pass_at_k reports pass@1), which lm-eval
    declares only once it has run, and a task's own process_results may report any keys."""
    # METRIC_REGISTRY: a dict up to lm-eval 0.4.10, an alias of the Registry ``metric_registry``
    # (which older versions lack) since; both answer ``in`` and ``get``
    from lm_eval.api.registry import METRIC_REGISTRY

    functions = getattr(task, "_metric_fn_list", None) or {}
    return bool(functions) and all(
        fn is not None and name in METRIC_REGISTRY and fn is METRIC_REGISTRY.get(name)
        for name, fn in functions.items()
    )


def scored_splits(term: ObjectiveTerm) -> list[tuple[str, str, str]]:
    """``(task, kind, split)`` for every task lm-eval runs for the term: kind ``test`` when the
    task's config has a ``test_split`` (lm-eval's ``eval_docs`` then scores it), else ``validation``.

    Read from the task YAMLs (includes, group and tag members and their overrides resolved) without
    building a task: building one loads its dataset. A task whose config names neither split (a
    Python-defined task that chooses in code) is left out.
    """
    check_task(term)
    return _splits(term.task, _task_manager(term.include_path).task_index, {})


def _config(entry) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return dict(load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg or {})


def _splits(name: str, index: dict, overrides: dict, cfg: dict | None = None) -> list[tuple[str, str, str]]:
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if cfg is None and entry is not None and entry.kind == Kind.TAG:
        return [s for task in sorted(entry.tags) for s in _splits(task, index, overrides)]
    if cfg is None:
        cfg = _config(entry) if entry is not None else {}
    if (entry is not None and entry.kind == Kind.GROUP) or "group" in cfg:
        inherited = {**{k: v for k, v in cfg.items() if k not in GROUP_FIELD_NAMES}, **overrides}
        found = []
        for item in cfg.get("task") or []:
            if isinstance(item, str):
                found += _splits(item, index, inherited)
            elif "group" in item and item["group"] in index:
                found += _splits(item["group"], index, {**inherited, **_without(item, "group")})
            elif "group" in item:
                found += _splits(item["group"], index, inherited, cfg=item)
            else:
                member = {**inherited, **item}
                known = item["task"] in index
                found += _splits(item["task"], index, member, cfg=None if known else member)
        return found
    task = {**cfg, **overrides}
    for kind in ("test", "validation"):
        if task.get(f"{kind}_split") is not None:
            return [(name, kind, str(task[f"{kind}_split"]))]
    return []


def _without(item: dict, key: str) -> dict:
    return {k: v for k, v in item.items() if k != key}


def check_test_split(term: ObjectiveTerm) -> None:
    """Refuse a term whose task lm-eval scores on its test split (before any model is loaded)."""
    for task, kind, split in scored_splits(term):
        if kind == "test":
            within = f" (in {term.task!r})" if task != term.task else ""
            raise UserError(
                f"objective term {term.label!r}: task {task!r}{within} is scored on its test split "
                f"{split!r}; a mixture tuned on it reports a score it will not get. Point the task at "
                "validation data (a local task YAML with validation_split and no test_split, via "
                "include_path) or set allow_test_split: true"
            )


@functools.cache
def _model_class(HFLM):
    """lm-eval's ``HFLM``, with generation kept in step over the ranks of a sharded stack."""

    class MergedModelLM(HFLM):
        synced_generation = False  # set per instance: the model reads weights gathered from the ranks

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.synced_generation:
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return MergedModelLM


@contextlib.contextmanager
def _results_here():
    """lm-eval's ``simple_evaluate`` returns its results only in the process whose ``LOCAL_RANK``
    is 0 (unset counts as 0): it takes any other torchrun rank for a copy of a tensor-parallel
    evaluation whose results rank 0 reports. mergeopt's ranks evaluate for themselves (their own
    candidates, or all of them the same candidate with a sharded stack), and each needs its number,
    so ``LOCAL_RANK`` reads 0 for the call and is restored after it."""
    saved = os.environ.get("LOCAL_RANK")
    if saved in (None, "0"):
        yield
        return
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        os.environ["LOCAL_RANK"] = saved


# what lm-eval's simple_evaluate records beside its results on every call: the environment (torch's
# collect_env, which runs `pip list` and other programs: on a small model, most of the call) and the
# git commit (a `git describe`); a fit reads one metric per candidate and discards them
RUN_METADATA = {"add_env_info": lambda results: None, "get_git_commit_hash": lambda: None}


@contextlib.contextmanager
def _without_run_metadata():
    """simple_evaluate with the collectors of :data:`RUN_METADATA` standing down (its results are
    unchanged: they are written into a separate ``config`` entry), restored after the call. lm-eval
    offers no option for it; a version without these names is left as it is."""
    evaluator = importlib.import_module("lm_eval.evaluator")
    saved = {name: getattr(evaluator, name) for name in RUN_METADATA if hasattr(evaluator, name)}
    for name in saved:
        setattr(evaluator, name, RUN_METADATA[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(evaluator, name, original)


def lm_eval_score(
    term: ObjectiveTerm, model: torch.nn.Module, tokenizer, batch_size: int, device: torch.device | str
) -> float:
    """The term's metric for ``model`` as it is now (holding the merge at w) on the term's task."""
    lm_eval, HFLM, _ = _lm_eval()
    check_task(term)
    wrapper = _model_class(HFLM)(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device)
    )
    wrapper.synced_generation = is_sharded(model)
    with _results_here(), _without_run_metadata():
        results = lm_eval.simple_evaluate(
            model=wrapper,
            tasks=[term.task],
            task_manager=_task_manager(term.include_path),
            limit=term.limit,
            # the point estimate is the objective; a bootstrap of its stderr (lm-eval's default:
            # 100,000 resamples in a pool of processes, for perplexity and other non-mean metrics)
            # would cost more than the evaluation and fork every torchrun rank
            bootstrap_iters=0,
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
