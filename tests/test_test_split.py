"""No fitting on test sets: a test-split lm-eval task or dev set is refused unless allow_test_split.

The split an lm-eval term is scored on is checked against lm-eval's own task object (its
``eval_docs`` over local files whose records differ by split), not against a copy of the rule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergeopt.config import ObjectiveTerm, load_recipe, recipe_from_dict, says_test_split
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.objectives.lm_eval_term import _task_manager, check_test_split, scored_splits
from tests.conftest import (
    lm_eval_expert_scores,
    lm_eval_task_yaml,
    lm_eval_tree,
    recipe_tree,
    run_in_process,
    write_jsonl,
)

REFUSED = [
    ("arith", "data/test.jsonl", "its file name 'test.jsonl'"),
    ("arith", "data/gsm8k_test.jsonl", "its file name 'gsm8k_test.jsonl'"),
    ("arith", "hub/test-00000-of-00001.parquet", "its file name 'test-00000-of-00001.parquet'"),
    ("arith", "data/GSM8K.Test.jsonl", "its file name 'GSM8K.Test.jsonl'"),
    ("arith", "mmlu/test/x.jsonl", "its folder 'test'"),
    ("arith", "mmlu/TEST/x.jsonl", "its folder 'TEST'"),
    ("math-test", "data/math.jsonl", "its name 'math-test'"),
    ("test", "data/math.jsonl", "its name 'test'"),
]
ALLOWED = [
    ("arith", "data/contest.jsonl"),
    ("arith", "data/latest.jsonl"),
    ("arith", "data/testing.jsonl"),
    ("arith", "tests/dev.jsonl"),
    ("arith", "runs/test_fit0/dev.jsonl"),  # a folder is refused only when it is named 'test'
    ("contest", "data/attestation.jsonl"),
    ("arith", "tiny://dev/arith.jsonl"),
]


def _tree(name: str, path: str) -> dict:
    """A recipe whose first dev set is (name, path); validating it reads no file."""
    return {
        "model": {"base": "base", "experts": {"a": "a", "b": "b"}},
        "data": {"dev": [{"name": name, "path": path}, {"name": "other", "path": "data/dev.jsonl"}]},
    }


@pytest.mark.parametrize(("name", "path", "where"), REFUSED)
def test_a_dev_set_marked_test_is_refused_by_the_recipe(name, path, where):
    assert says_test_split(name, path) == where
    tree = _tree(name, path)
    with pytest.raises(UserError) as err:
        recipe_from_dict(tree, "recipe.yaml")
    assert str(err.value) == (
        f"recipe.yaml: dev set {name!r} ({path}) looks like a benchmark's test split ({where}); a "
        "mixture tuned on it reports a score it will not get. Fit on a validation split, or set "
        "allow_test_split: true"
    )
    assert recipe_from_dict({**tree, "allow_test_split": True}).data.dev[0].path == path


@pytest.mark.parametrize(("name", "path"), ALLOWED)
def test_a_dev_set_not_marked_test_is_accepted(name, path):
    assert says_test_split(name, path) is None
    assert recipe_from_dict(_tree(name, path)).data.dev[0].name == name


def test_the_cli_refuses_a_test_dev_set_and_fits_it_when_allowed(random_world, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    shutil.copy(random_world["dev"]["arith"], folder / "arith.jsonl")
    tree = recipe_tree(random_world, tmp_path / "out")
    tree["data"]["dev"][0]["path"] = str(folder / "arith.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    refused = run_in_process("fit", str(recipe), "--quiet")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2, refused.stderr
    assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), refused.stderr
    assert f"dev set 'arith' ({folder / 'arith.jsonl'}) looks like a benchmark's test split" in lines[0]
    assert "allow_test_split: true" in lines[0]
    assert not (tmp_path / "out").exists()
    allowed = run_in_process("fit", str(recipe), "--quiet", "allow_test_split=true")
    assert allowed.returncode == 0, allowed.stderr
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert mixture["status"] == "complete"
    assert sum(mixture["weights"].values()) == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- lm-eval terms

SPLIT_RECORDS = {
    "validation": [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(3)],
    "test": [{"prompt": f"{i}+2=", "completion": str(i + 2)} for i in range(5)],
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Local tasks: on test only, on validation only, on both; two groups over them."""
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("split_tasks")
    data = root / "data"
    data.mkdir()
    for split, records in SPLIT_RECORDS.items():
        write_jsonl(data / f"{split}.jsonl", records)
    (root / "tasks").mkdir()
    for name, splits in {
        "mo_test_only": ("test",),
        "mo_val_only": ("validation",),
        "mo_both": ("validation", "test"),
    }.items():
        files = {split: data / f"{split}.jsonl" for split in splits}
        (root / "tasks" / f"{name}.yaml").write_text(lm_eval_task_yaml(name, files))
    (root / "tasks" / "mo_group.yaml").write_text(
        "group: mo_group\ntask:\n  - mo_val_only\n  - mo_both\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    (root / "tasks" / "mo_val_group.yaml").write_text(
        "group: mo_val_group\ntask:\n  - mo_val_only\n  - task: mo_both\n    test_split: null\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    return root


def _term(tasks: Path, task: str) -> ObjectiveTerm:
    return ObjectiveTerm(kind="lm_eval", task=task, include_path=str(tasks / "tasks"), limit=2)


def _lm_eval_docs(tasks: Path, name: str) -> dict[str, list[dict]]:
    """The documents lm-eval's own task objects score (eval_docs), task by task."""
    loaded = _task_manager(str(tasks / "tasks")).load(name)["tasks"]
    return {
        task: [{"prompt": d["prompt"], "completion": d["completion"]} for d in obj.eval_docs]
        for task, obj in loaded.items()
    }


def _read_as_scored(tasks: Path, name: str) -> dict[str, list[dict]]:
    return {task: SPLIT_RECORDS[split] for task, _, split in scored_splits(_term(tasks, name))}


@pytest.mark.parametrize(
    ("task", "split"), [("mo_test_only", "test"), ("mo_val_only", "validation"), ("mo_both", "test")]
)
def test_the_split_read_is_the_one_lm_eval_scores(tasks, task, split):
    assert scored_splits(_term(tasks, task)) == [(task, split, split)]
    assert _lm_eval_docs(tasks, task) == _read_as_scored(tasks, task)


@pytest.mark.parametrize("task", ["mo_test_only", "mo_both"])
def test_a_task_scored_on_its_test_split_is_refused(tasks, task):
    with pytest.raises(UserError) as err:
        check_test_split(_term(tasks, task))
    assert str(err.value) == (
        f"objective term 'lm_eval:{task}': task {task!r} is scored on its test split 'test'; a mixture "
        "tuned on it reports a score it will not get. Point the task at validation data (a local task "
        "YAML with validation_split and no test_split, via include_path) or set allow_test_split: true"
    )


def test_a_task_on_validation_data_is_accepted(tasks):
    check_test_split(_term(tasks, "mo_val_only"))  # returns: its only split is validation


def test_group_members_are_checked_with_the_groups_overrides(tasks):
    assert scored_splits(_term(tasks, "mo_group")) == [
        ("mo_val_only", "validation", "validation"),
        ("mo_both", "test", "test"),
    ]
    assert _lm_eval_docs(tasks, "mo_group") == _read_as_scored(tasks, "mo_group")
    with pytest.raises(UserError, match=r"task 'mo_both' \(in 'mo_group'\) is scored on its test split"):
        check_test_split(_term(tasks, "mo_group"))
    # mo_val_group sets mo_both's test_split to null: lm-eval then scores its validation records
    assert scored_splits(_term(tasks, "mo_val_group")) == [
        ("mo_val_only", "validation", "validation"),
        ("mo_both", "validation", "validation"),
    ]
    assert _lm_eval_docs(tasks, "mo_val_group") == _read_as_scored(tasks, "mo_val_group")
    check_test_split(_term(tasks, "mo_val_group"))


def _lm_eval_recipe(tiny_world: Path, tasks: Path, out: Path, task: str) -> Path:
    term = {"task": task, "include_path": str(tasks / "tasks"), "limit": 2}
    path = out.parent / f"{task}.yaml"
    path.write_text(yaml.safe_dump(lm_eval_tree(tiny_world, out, term, divisions=1)))
    return path


def test_the_cli_refuses_a_test_split_task_before_loading_anything(tiny_world, tasks, tmp_path, monkeypatch):
    import mergeopt.fit

    def no_loading(*_a, **_k):
        raise AssertionError("the world was resolved before the task was refused")

    monkeypatch.setattr(mergeopt.fit.worlds, "resolve_recipe", no_loading)
    recipe = _lm_eval_recipe(tiny_world, tasks, tmp_path / "out", "mo_both")
    result = run_in_process("fit", str(recipe), "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == [
        "mergeopt: error: objective term 'lm_eval:mo_both': task 'mo_both' is scored on its test split "
        "'test'; a mixture tuned on it reports a score it will not get. Point the task at validation data "
        "(a local task YAML with validation_split and no test_split, via include_path) or set "
        "allow_test_split: true"
    ]
    assert not (tmp_path / "out").exists()


def test_allow_test_split_fits_on_the_test_split(tiny_world, tasks, tmp_path):
    recipe = load_recipe(_lm_eval_recipe(tiny_world, tasks, tmp_path / "out", "mo_test_only"))
    with pytest.raises(UserError, match="is scored on its test split 'test'"):
        fit(recipe, progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()
    allowed = recipe.model_copy(update={"allow_test_split": True})
    scores = fit(allowed, progress=False, log=lambda _m: None)["objective"]["scores"]
    term = _term(tasks, "mo_test_only")
    for name, expected in lm_eval_expert_scores(tiny_world, term).items():
        assert scores[f"{name} only"]["fit"][term.label] == pytest.approx(expected, abs=1e-12)
