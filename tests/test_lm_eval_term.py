"""lm-eval-harness tasks as objective terms: lm-eval's own numbers on the in-memory merge.

The reference is lm-eval-harness itself and mergeopt's exact match: on a local loglikelihood task
over the tiny world's arith dev set, lm-eval's ``acc`` (is the reference the greedy continuation)
must equal mergeopt's exact match without stop strings, record for record the same question; and
a zero-order fit with the lm_eval term must report, at each expert, lm-eval's number for that
expert's checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.config import ObjectiveTerm, recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.objectives import metrics
from mergeopt.objectives.lm_eval_term import lm_eval_score
from tests.conftest import lm_eval_expert_scores, lm_eval_task_yaml, lm_eval_tree

pytest.importorskip("lm_eval")

TASK = "mergeopt_tiny_arith"


@pytest.fixture(scope="module")
def task_dir(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    # on validation data: fit refuses a task scored on its test split
    dev = tiny_world / "dev" / "arith.jsonl"
    (root / "arith.yaml").write_text(lm_eval_task_yaml(TASK, {"validation": dev}))
    return root


def _term(task_dir, **extra) -> ObjectiveTerm:
    return ObjectiveTerm(kind="lm_eval", task=TASK, include_path=str(task_dir), **extra)


@pytest.mark.parametrize("expert", ["arith", "markov"])
def test_lm_eval_greedy_accuracy_equals_mergeopts_exact_match(tiny_world, task_dir, expert):
    path = tiny_world / "experts" / expert
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    records = [json.loads(line) for line in (tiny_world / "dev" / "arith.jsonl").read_text().splitlines()]
    ours = metrics.exact_match(model, tokenizer, records, 6, 32, "cpu", stop=())
    theirs = lm_eval_score(_term(task_dir), model, tokenizer, 32, "cpu")
    assert theirs == pytest.approx(ours, abs=1e-12)
    if expert == "arith":
        assert theirs > 0.3  # the arith expert adds; the number is not vacuous


def test_fit_scores_the_in_memory_merge_with_lm_eval(tiny_world, task_dir, tmp_path):
    term = {"task": TASK, "include_path": str(task_dir), "limit": 64}
    tree = lm_eval_tree(tiny_world, tmp_path / "run", term, divisions=2)
    mixture = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    scores = mixture["objective"]["scores"]
    label = f"lm_eval:{TASK}"
    for name, expected in lm_eval_expert_scores(tiny_world, _term(task_dir, limit=64)).items():
        assert scores[f"{name} only"]["fit"][label] == pytest.approx(expected, abs=1e-12)
    assert scores["fitted"]["fit"][label] == max(s["fit"][label] for s in scores.values())


def test_every_torchrun_rank_gets_lm_evals_number(tiny_world, task_dir, monkeypatch):
    """lm-eval returns results only where LOCAL_RANK is 0; a torchrun rank scoring its own
    candidate gets the number all the same, and LOCAL_RANK is restored after the call."""
    path = tiny_world / "experts" / "arith"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    term = _term(task_dir, limit=16)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = lm_eval_score(term, model, tokenizer, 32, "cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert lm_eval_score(term, model, tokenizer, 32, "cpu") == expected
    assert os.environ["LOCAL_RANK"] == "1"
    assert expected > 0.3  # the arith expert adds: not a vacuous zero


def test_lm_evals_number_without_its_run_metadata(tiny_world, task_dir, monkeypatch):
    """simple_evaluate collects the environment (torch's collect_env: `pip list` and more, about
    1.5 s a call) beside its results; mergeopt's call skips it and gets lm-eval's own number, and
    lm-eval's collectors are back in place after the call."""
    import lm_eval
    import lm_eval.evaluator
    import torch.utils.collect_env as collect_env
    from lm_eval.models.huggingface import HFLM

    from mergeopt.objectives.lm_eval_term import _task_manager

    collected = []
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: collected.append(1) or "")
    originals = (lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash)
    path = tiny_world / "experts" / "arith"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours = lm_eval_score(_term(task_dir, limit=16), model, tokenizer, 32, "cpu")
    assert collected == []
    assert (lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash) == originals
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, device="cpu"),
        tasks=[TASK],
        task_manager=_task_manager(str(task_dir)),
        limit=16,
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    assert collected == [1]  # lm-eval's own call collects it: the check above can fail
    assert theirs["results"][TASK]["acc,none"] == ours and ours > 0.3


def test_unknown_task_and_metric_are_named(tiny_world, task_dir):
    path = tiny_world / "experts" / "arith"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bad_task = ObjectiveTerm(kind="lm_eval", task="no_such_task", include_path=str(task_dir))
    with pytest.raises(UserError, match="no lm-eval task 'no_such_task' in"):
        lm_eval_score(bad_task, model, tokenizer, 32, "cpu")
    with pytest.raises(UserError, match=r"reports no metric 'f1,none' \(it reports acc,none\)"):
        lm_eval_score(_term(task_dir, metric="f1", limit=4), model, tokenizer, 32, "cpu")


def test_missing_lm_eval_says_how_to_install(monkeypatch, task_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    from mergeopt.objectives.lm_eval_term import _lm_eval

    with pytest.raises(UserError, match=r"pip install 'mergeopt\[lm-eval\]'"):
        _lm_eval()


def test_lm_eval_terms_take_no_dev_set():
    with pytest.raises(ValueError, match="leave dev unset"):
        ObjectiveTerm(kind="lm_eval", task="x", dev="arith")
    with pytest.raises(ValueError, match="needs task"):
        ObjectiveTerm(kind="lm_eval")
    with pytest.raises(ValueError, match="only for kind 'lm_eval'"):
        ObjectiveTerm(kind="exact_match", dev="arith", task="x")
    assert ObjectiveTerm(kind="lm_eval", task="gsm8k").label == "lm_eval:gsm8k"


def test_a_term_against_its_tasks_declared_direction_is_refused(tiny_world, tmp_path):
    """A perplexity task declares lower is better: a term that keeps the default higher_is_better
    would maximise it and pick the worst mixture, so it is refused before any model is loaded."""
    from mergeopt.objectives.lm_eval_term import check_task_loads

    name = "mergeopt_tiny_arith_ppl"
    dev = tiny_world / "dev" / "arith.jsonl"
    (tmp_path / "ppl.yaml").write_text(lm_eval_task_yaml(name, {"validation": dev}, "perplexity"))
    term = {"kind": "lm_eval", "task": name, "include_path": str(tmp_path), "metric": "perplexity"}
    with pytest.raises(UserError, match="declares perplexity better lower.*set higher_is_better: false"):
        check_task_loads(ObjectiveTerm(**term))
    check_task_loads(ObjectiveTerm(**term, higher_is_better=False))


def test_a_metric_the_task_does_not_have_is_refused_before_a_model_is_loaded(tiny_world, tmp_path):
    """A misspelt metric (``f1`` for a task that computes ``acc``) is said while the task is
    checked, not at the first evaluation after the experts are stacked; a metric with its filter
    (``acc,none``) is the metric before the comma."""
    from mergeopt.objectives.lm_eval_term import check_task_loads

    name = "mergeopt_tiny_arith_acc"
    dev = tiny_world / "dev" / "arith.jsonl"
    (tmp_path / "acc.yaml").write_text(lm_eval_task_yaml(name, {"validation": dev}, "acc"))
    term = {"kind": "lm_eval", "task": name, "include_path": str(tmp_path)}
    with pytest.raises(UserError, match=r"has no metric 'f1' \(it has acc\); set the term's metric"):
        check_task_loads(ObjectiveTerm(**term, metric="f1"))
    check_task_loads(ObjectiveTerm(**term, metric="acc,none"))
    check_task_loads(ObjectiveTerm(**term))


def test_a_template_naming_a_field_the_records_lack_is_said_as_such(tiny_world, tmp_path):
    """``doc_to_text: "{{question}}"`` over prompt/completion records: lm-eval's Jinja error when
    the task is built. The line said to reach the network for a hub dataset, which a local file
    that loaded does not need; it names the template instead."""
    from mergeopt.objectives.lm_eval_term import check_task_loads

    name = "mergeopt_tiny_arith_question"
    dev = tiny_world / "dev" / "arith.jsonl"
    text = lm_eval_task_yaml(name, {"validation": dev}).replace("{{prompt}}", "{{question}}")
    (tmp_path / "question.yaml").write_text(text)
    term = ObjectiveTerm(kind="lm_eval", task=name, include_path=str(tmp_path))
    with pytest.raises(UserError) as refused:
        check_task_loads(term)
    line = str(refused.value)
    assert "'question' is undefined" in line, line
    assert line.endswith(
        "a doc_to_text, doc_to_target or doc_to_choice template of the task names a field its records lack"
    ), line
    assert "network" not in line, line


@pytest.mark.parametrize(
    "old, new, error, problem",
    [
        ("{{prompt}}", "{{prompt", "TemplateSyntaxError", "is not valid Jinja"),
        ("{{prompt}}", "{{prompt | nosuchfilter}}", "TemplateAssertionError", "is not valid Jinja"),
        ("{{completion}}", "{{ 1 / 0 }}", "ZeroDivisionError", "fails on the task's records"),
    ],
)
def test_a_template_that_is_broken_otherwise_is_not_said_to_name_a_missing_field(
    tiny_world, tmp_path, old, new, error, problem
):
    """A Jinja syntax error or an unknown filter in a doc_to_* template was said to name a field
    the records lack, and an error the template's code raised (a division by zero) sent the user
    to the network for a hub dataset: each says what is wrong with the template."""
    from mergeopt.objectives.lm_eval_term import check_task_loads

    name = f"mergeopt_tiny_arith_broken_{error.lower()}"
    dev = tiny_world / "dev" / "arith.jsonl"
    (tmp_path / "broken.yaml").write_text(lm_eval_task_yaml(name, {"validation": dev}).replace(old, new))
    with pytest.raises(UserError) as refused:
        check_task_loads(ObjectiveTerm(kind="lm_eval", task=name, include_path=str(tmp_path)))
    line = str(refused.value)
    assert f"({error}: " in line, line
    assert line.endswith(f"a doc_to_text, doc_to_target or doc_to_choice template of the task {problem}"), (
        line
    )
    assert "records lack" not in line and "network" not in line, line


def test_a_metric_a_task_function_reports_is_not_refused_before_it_has_run(tiny_world, tmp_path):
    """A metric function of the task's own may return several results (HumanEval's pass_at_k
    reports pass@1), which lm-eval declares only once it has run: a term on one of them is left to
    the first evaluation rather than refused as undeclared."""
    from mergeopt.objectives.lm_eval_term import check_task_loads

    name = "mergeopt_tiny_dict_metric"
    dev = tiny_world / "dev" / "arith.jsonl"
    (tmp_path / "scores.py").write_text(
        "def scores(references, predictions, **kwargs):\n"
        "    return {'pass@1': float(references[0] == predictions[0])}\n"
    )
    (tmp_path / "dict.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {dev}\n"
        "validation_split: validation\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{completion}}"\n'
        "generation_kwargs:\n  until: ['.']\n"
        "metric_list:\n  - metric: !function scores.scores\n    aggregation: mean\n    higher_is_better: true\n"
    )
    check_task_loads(ObjectiveTerm(kind="lm_eval", task=name, include_path=str(tmp_path), metric="pass@1"))


def test_a_misspelt_metric_is_refused_with_the_dict_registry_of_older_lm_eval(monkeypatch):
    """lm-eval 0.4.8 to 0.4.10 (pyproject allows >=0.4.8) keep their metrics in the dict
    METRIC_REGISTRY and have no ``metric_registry``: the check of a term's metric raised
    ImportError there, a traceback instead of the line naming the task's metrics."""
    import lm_eval.api.metrics  # noqa: F401  (registers acc)
    import lm_eval.api.registry as registry

    from mergeopt.objectives.lm_eval_term import check_direction

    acc = registry.METRIC_REGISTRY.get("acc")
    monkeypatch.setattr(registry, "METRIC_REGISTRY", {"acc": acc})  # 0.4.8's registry: a dict
    monkeypatch.delattr(registry, "metric_registry")

    class Task:  # what check_direction reads of a built lm-eval task
        _metric_fn_list = {"acc": acc}

        def higher_is_better(self):
            return {"acc": True}

    with pytest.raises(UserError, match=r"task 'arith' has no metric 'f1' \(it has acc\)"):
        check_direction(ObjectiveTerm(kind="lm_eval", task="arith", metric="f1"), Task())
    check_direction(ObjectiveTerm(kind="lm_eval", task="arith", metric="acc"), Task())


@pytest.mark.parametrize("loader", ["TaskManager.load", "get_task_dict"])
def test_a_task_is_built_by_the_loader_its_lm_eval_offers(tiny_world, tmp_path, monkeypatch, loader):
    """lm-eval 0.4.12 on builds tasks with ``TaskManager.load`` and deprecates ``get_task_dict``
    (to be removed); 0.4.8 to 0.4.11 have only ``get_task_dict``. The task check uses the first
    where it exists, so no deprecated loader is called, and still checks the metric on the older
    ones."""
    import warnings

    from lm_eval.tasks import TaskManager

    from mergeopt.objectives.lm_eval_term import check_task_loads

    if loader == "get_task_dict":
        monkeypatch.delattr(TaskManager, "load")
    name = "mergeopt_tiny_arith_loader"
    dev = tiny_world / "dev" / "arith.jsonl"
    (tmp_path / "loader.yaml").write_text(lm_eval_task_yaml(name, {"validation": dev}, "acc"))
    term = {"kind": "lm_eval", "task": name, "include_path": str(tmp_path)}
    with warnings.catch_warnings():
        if loader == "TaskManager.load":
            warnings.filterwarnings("error", message=".*get_task_dict is deprecated")
        check_task_loads(ObjectiveTerm(**term))
    with pytest.raises(UserError, match=r"has no metric 'f1' \(it has acc\)"):
        check_task_loads(ObjectiveTerm(**term, metric="f1"))


def test_a_tasks_bytecode_cache_is_not_an_edit_of_its_task_files(tiny_world, tmp_path, monkeypatch):
    """Loading a task whose YAML names ``!function`` code imports it, and Python writes
    ``__pycache__`` into ``include_path``. The directory's digest counted it: a fit's checkpoint
    (fingerprinted before the task first loads) was refused on resume as reading other data, and a
    grid's tasks copied without their caches (a git checkout) as edited task files."""
    import sys

    from mergeopt.objectives.lm_eval_term import check_task_loads
    from mergeopt.runtime.fingerprint import first_changed, input_fingerprints
    from mergeopt.worlds.grid_measures import INCLUDE_DIGEST, term_settings

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # Python's default (not PYTHONDONTWRITEBYTECODE)
    name, tasks = "mergeopt_tiny_bytecode", tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "scores.py").write_text(
        "def scores(references, predictions, **kwargs):\n"
        "    return {'pass@1': float(references[0] == predictions[0])}\n"
    )
    (tasks / "code.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tiny_world / 'dev' / 'arith.jsonl'}\n"
        "validation_split: validation\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{completion}}"\n'
        "generation_kwargs:\n  until: ['.']\n"
        "metric_list:\n  - metric: !function scores.scores\n    aggregation: mean\n    higher_is_better: true\n"
    )
    term = ObjectiveTerm(kind="lm_eval", task=name, include_path=str(tasks), metric="pass@1")
    terms = {"task": name, "include_path": str(tasks), "metric": "pass@1"}
    recorded = input_fingerprints(recipe_from_dict(lm_eval_tree(tiny_world, tmp_path / "out", terms, 2)))
    assert str(tasks) in recorded
    settings = term_settings(term)
    check_task_loads(term)
    assert list((tasks / "__pycache__").iterdir())  # the import wrote its bytecode there
    assert term_settings(term)[INCLUDE_DIGEST] == settings[INCLUDE_DIGEST]
    assert first_changed(recorded) is None
