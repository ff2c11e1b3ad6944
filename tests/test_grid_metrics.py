"""Metric objective terms in the ground-truth grid and in the rank check, on the real tiny world.

Two experts (arith, reverse) and their midpoint are trained briefly from the tiny base, first for a
recipe without terms, then resumed with an exact-match term and a custom lower-is-better term.
grid.csv's score columns are checked against metrics.exact_match and the custom function called
directly on each saved checkpoint; the resume against the checkpoints' mtimes; rank's proxy
scores at the vertices (where the merge is the expert) against the experts' own grid rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.cli import main
from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.evaluation.rank import rank_grid
from mergeopt.loading.problem import load_problem
from mergeopt.objectives import metrics
from mergeopt.objectives.data import read_jsonl
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.term_scores import load_dev_sets
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.runtime.fingerprint import digest
from mergeopt.worlds import resolve_recipe
from mergeopt.worlds.grid_measures import (
    check_measured_inputs,
    check_measured_tokens,
    measured_path,
    token_digest,
)
from mergeopt.worlds.run_records import RUN_MARKER
from mergeopt.worlds.train import train

EXPERTS = ("arith", "reverse")
MAX_EXAMPLES = 48
MAX_NEW_TOKENS = 8
EM, NLL = "exact_match:arith", "nll, reverse"  # the comma makes the CSV writer quote the header
TERMS = [
    {"kind": "exact_match", "dev": "arith", "max_new_tokens": MAX_NEW_TOKENS},
    {
        "kind": "custom",
        "dev": "reverse",
        "name": NLL,
        "function": "tests.test_grid_metrics:completion_nll",
        "higher_is_better": False,
    },
]


@torch.no_grad()
def completion_nll(model, tokenizer, records) -> float:
    """Mean summed NLL of each completion given its prompt, one record at a time (no batching)."""
    total = 0.0
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = torch.tensor([prompt + tokenizer(record["completion"], add_special_tokens=False)["input_ids"]])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
        total -= float(logp[positions, ids[0, len(prompt) :]].sum())
    return total / len(records)


def grid_tree(tiny_world, tmp) -> dict:
    return {
        "seed": 0,
        "output_dir": str(tmp / "fit"),
        "device": "cpu",
        "world": {"cache_dir": str(tiny_world.parent)},
        "model": {"base": "tiny://base", "experts": {n: str(tmp / "experts" / n) for n in EXPERTS}},
        "data": {
            "dev": [{"name": n, "path": f"tiny://dev/{n}.jsonl"} for n in EXPERTS],
            "max_length": 64,
            "max_examples": MAX_EXAMPLES,
        },
        "optim": {"eval_batch_size": 64},
        "rank": {"bootstrap": 0, "k": 1},
        "train": {
            "data": {n: f"tiny://train/{n}.jsonl" for n in EXPERTS},
            "output_dir": str(tmp / "grid"),
            "steps": 60,
            "batch_tokens": 256,
            "lr": 2e-3,
            "max_length": 64,
            "mixtures": {"kind": "lattice", "divisions": 2},
        },
    }


def checkpoint_mtimes(tmp) -> dict:
    files = [*tmp.rglob(RUN_MARKER), *tmp.rglob("model.safetensors")]
    return {p: p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def grids(tiny_world, tmp_path_factory):
    """The grid trained without terms, then the same grid resumed with the two terms."""
    tmp = tmp_path_factory.mktemp("grid_metrics")
    plain = grid_tree(tiny_world, tmp)
    grid = train(recipe_from_dict(plain), progress=False, log=lambda _m: None)
    before, mtimes = read_csv(grid), checkpoint_mtimes(tmp)
    scored = json.loads(json.dumps(plain))
    scored["objective"] = {"terms": TERMS}
    scored["search"] = {"strategy": "grid"}
    train(recipe_from_dict(scored), progress=False, log=lambda _m: None)
    return {"tmp": tmp, "tree": scored, "before": before, "mtimes": mtimes, "grid": grid}


def dev_records(tiny_world, name: str) -> list[dict]:
    return read_jsonl(tiny_world / "dev" / f"{name}.jsonl")[:MAX_EXAMPLES]


def test_grid_scores_equal_the_metrics_of_each_saved_checkpoint(grids, tiny_world):
    table = read_csv(grids["grid"])
    header = grids["grid"].read_text().splitlines()[0]
    assert header.endswith(f',score_{EM},"score_{NLL}",tokens')  # quoted by the writer, read back by pandas
    assert list(table.columns)[-3:] == [f"score_{EM}", f"score_{NLL}", "tokens"]
    arith, reverse = dev_records(tiny_world, "arith"), dev_records(tiny_world, "reverse")
    for _, row in table.iterrows():
        model = AutoModelForCausalLM.from_pretrained(row["path"], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(row["path"])
        expected = metrics.exact_match(model, tokenizer, arith, MAX_NEW_TOKENS, 64, "cpu")
        assert row[f"score_{EM}"] == expected
        assert row[f"score_{NLL}"] == pytest.approx(completion_nll(model, tokenizer, reverse), rel=1e-5)
    assert table[f"score_{EM}"].nunique() > 1  # the runs differ, so equality above is a real check
    assert table[f"score_{NLL}"].nunique() == len(table)


def test_resuming_with_a_new_term_fills_its_column_without_retraining(grids):
    before, after = grids["before"], read_csv(grids["grid"])
    assert not [c for c in before.columns if c.startswith("score_")]
    assert checkpoint_mtimes(grids["tmp"]) == grids["mtimes"]
    assert len(grids["mtimes"]) == 2 * 3  # run.json and weights of 2 experts + 1 mixture run
    pd.testing.assert_frame_equal(after[before.columns], before)  # losses, tokens: the same runs
    assert after[[f"score_{EM}", f"score_{NLL}"]].notna().all().all()


@pytest.fixture(scope="module")
def ranked(grids):
    recipe, _ = resolve_recipe(recipe_from_dict(grids["tree"]), log=lambda _m: None)
    objective = Objective.from_recipe(recipe)
    problem = load_problem(recipe, progress=False, objective=objective)
    report, pairs, proxy, _ = rank_grid(
        problem, objective, grids["grid"], recipe.rank, recipe.seed, progress=False
    )
    return report, pairs, proxy, read_csv(grids["grid"])


def test_proxy_scores_at_the_vertices_are_the_experts_truth(ranked):
    """w = e_i merges to expert i, and the grid's row for e_i is that very expert: equal scores."""
    _, _, proxy, table = ranked
    vertices = (table[[f"w_{n}" for n in EXPERTS]] == 1.0).any(axis=1)
    assert vertices.sum() == 2
    em = f"score_{EM}"
    pd.testing.assert_series_equal(proxy.loc[vertices, em], table.loc[vertices, em], check_names=False)
    np.testing.assert_allclose(
        proxy.loc[vertices, f"score_{NLL}"], table.loc[vertices, f"score_{NLL}"], rtol=1e-5
    )
    midpoint = ~vertices
    assert proxy.loc[midpoint, f"score_{NLL}"].item() != pytest.approx(
        table.loc[midpoint, f"score_{NLL}"].item()
    )


def test_rank_reports_each_term_in_its_direction_and_keeps_the_target(ranked):
    report, pairs, _, table = ranked
    assert list(report["metrics"]) == ["arith", "reverse", EM, NLL, "target"]
    em, nll = report["metrics"][EM], report["metrics"][NLL]
    assert em["higher_is_better"] and not nll["higher_is_better"]
    assert em["true_best_row"] == int(np.argmax(table[f"score_{EM}"]))  # ties: the first row, as rank
    assert nll["true_best_row"] == int(np.argmin(table[f"score_{NLL}"]))
    np.testing.assert_array_equal(pairs[NLL][1], table[f"score_{NLL}"])
    target = table[["loss_arith", "loss_reverse"]].mean(axis=1)  # data.target 'all', equal weights
    np.testing.assert_allclose(pairs["target"][1], target, rtol=1e-12)


# --- what grid.csv's columns measured (grid.measured.json) and the readers' checks of it ---


def measures(grids) -> dict:
    return json.loads(measured_path(grids["grid"]).read_text())["columns"]


def changed_tree(grids, tmp_path, *changes) -> dict:
    """The recipe that scored the grid, with rank.grid set and the output elsewhere, then
    ``changes`` as (section, key, value)."""
    tree = json.loads(json.dumps(grids["tree"]))
    tree["rank"]["grid"] = str(grids["grid"])
    tree["output_dir"] = str(tmp_path / "out")
    for section, key, value in changes:
        if section == "term":
            tree["objective"]["terms"][0][key] = value
        else:
            tree[section][key] = value
    return tree


def resolved_of(tree):
    recipe, _ = resolve_recipe(recipe_from_dict(tree), log=lambda _m: None)
    return recipe, Objective.from_recipe(recipe)


def test_train_writes_what_each_column_measured(grids, tiny_world):
    columns = measures(grids)
    assert set(columns) == {"loss_arith", "loss_reverse", f"score_{EM}", f"score_{NLL}"}
    arith = columns["loss_arith"]["dev_set"]
    assert arith["digest"] == digest(tiny_world / "dev" / "arith.jsonl")
    assert (arith["records"], arith["max_examples"], arith["max_length"]) == (MAX_EXAMPLES, MAX_EXAMPLES, 64)
    assert columns[f"score_{EM}"]["dev_set"] == arith  # the records its score was measured on
    assert columns[f"score_{EM}"]["term"] == {
        "kind": "exact_match",
        "dev": "arith",
        "max_new_tokens": MAX_NEW_TOKENS,
        "stop": ["\n"],
    }
    # the tokens the proxy scores for the same recipe are the ones the runs were measured on
    recipe, objective = resolved_of(changed_tree(grids, grids["tmp"]))
    sets = load_dev_sets(recipe.data, recipe.seed, AutoTokenizer.from_pretrained(recipe.model.base))
    assert [token_digest(s) for s in sets] == [columns[f"loss_{n}"]["dev_set"]["tokens"] for n in EXPERTS]
    check_measured_inputs(grids["grid"], recipe, objective)
    check_measured_tokens(grids["grid"], recipe, objective, sets)
    sets[0].heldout = sets[0].heldout[1:]  # one example fewer: other tokens
    with pytest.raises(UserError, match="other tokens of dev set 'arith' than this recipe scores"):
        check_measured_tokens(grids["grid"], recipe, objective, sets)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            [("data", "max_examples", 24)],
            "its loss_arith was measured on 48 records of dev set 'arith' (data.max_examples 48), "
            "and this recipe reads 24 records (data.max_examples 24): rerun mergeopt train",
        ),
        (
            [("data", "max_examples", None)],
            "measured on 48 records of dev set 'arith' (data.max_examples 48), and this recipe reads",
        ),
        (
            [("term", "max_new_tokens", 16)],
            f"its score_{EM} was scored with max_new_tokens 8, and objective term '{EM}' has 16 now",
        ),
        (
            [("term", "stop", [])],
            f"its score_{EM} was scored with stop [\"\\n\"], and objective term '{EM}' has [] now",
        ),
    ],
)
def test_a_recipe_measuring_other_records_is_refused_before_any_model_is_loaded(
    grids, tmp_path, changes, message
):
    recipe, objective = resolved_of(changed_tree(grids, tmp_path, *changes))
    with pytest.raises(UserError) as err:
        check_measured_inputs(grids["grid"], recipe, objective)
    assert message in str(err.value)


def test_a_dev_set_is_compared_by_its_contents(grids, tiny_world, tmp_path):
    lines = (tiny_world / "dev" / "arith.jsonl").read_text().splitlines(keepends=True)
    same, edited = tmp_path / "same.jsonl", tmp_path / "edited.jsonl"
    same.write_text("".join(lines))  # another path, the same records: measured alike
    edited.write_text("".join(lines[1:]))  # the first record gone: other records
    for path, refused in ((same, False), (edited, True)):
        tree = changed_tree(grids, tmp_path)
        tree["data"]["dev"][0]["path"] = str(path)
        recipe, objective = resolved_of(tree)
        if not refused:
            check_measured_inputs(grids["grid"], recipe, objective)
            continue
        with pytest.raises(
            UserError, match=rf"its loss_arith was measured on another file than dev set 'arith' \({path};"
        ):
            check_measured_inputs(grids["grid"], recipe, objective)


def test_a_cap_that_reads_the_same_records_passes(grids, tmp_path):
    """data.max_examples differs, but both read every record of the file: the same records."""
    grid = tmp_path / "grid.csv"
    grid.write_text(grids["grid"].read_text())
    content = json.loads(measured_path(grids["grid"]).read_text())
    everything = len(read_jsonl(Path(content["columns"]["loss_arith"]["dev_set"]["path"])))
    for column in content["columns"].values():
        column.get("dev_set", {}).update(max_examples=10**6, records=everything)
    measured_path(grid).write_text(json.dumps(content))
    recipe, objective = resolved_of(changed_tree(grids, tmp_path, ("data", "max_examples", None)))
    check_measured_inputs(grid, recipe, objective)
    # a grid without the file (made elsewhere, or by an earlier mergeopt) is not checked
    measured_path(grid).unlink()
    recipe, objective = resolved_of(changed_tree(grids, tmp_path, ("data", "max_examples", 24)))
    check_measured_inputs(grid, recipe, objective)


@pytest.mark.parametrize("verb", ["rank", "calibrate", "fit"])
def test_each_reader_of_the_grid_refuses_in_one_line_and_writes_nothing(grids, tmp_path, capsys, verb):
    tree = changed_tree(grids, tmp_path, ("data", "max_examples", 24))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main([verb, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was measured on 48 records of dev set 'arith'" in err[0], err
    # a fit can go on without its rank check
    assert err[0].endswith("; or set rank.grid: null to fit without the rank check") == (verb == "fit")
    assert not (tmp_path / "out").exists()


def test_a_terms_direction_is_not_what_it_measured(grids, tmp_path):
    """higher_is_better says how a score is read, not what was scored: flipping it is no refusal."""
    tree = changed_tree(grids, tmp_path)
    tree["objective"]["terms"][1]["higher_is_better"] = True
    recipe, objective = resolved_of(tree)
    check_measured_inputs(grids["grid"], recipe, objective)


def test_a_shorter_max_length_is_refused_once_the_dev_sets_are_read(grids, tmp_path, capsys):
    tree = changed_tree(grids, tmp_path, ("data", "max_length", 16))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["rank", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # arith's records are shorter than 16 tokens: the same tokens, not refused; reverse's are cut
    assert (
        "its loss_reverse was measured on other tokens of dev set 'reverse' than this recipe scores "
        in err[0]
    )
    assert "(data.max_length 16 now, 64 then)" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_rerun_without_a_term_keeps_what_its_column_measured(grids, tmp_path):
    """Score columns carried over from an earlier grid.csv keep their entries; the rest are new."""
    shutil.copytree(grids["tmp"] / "grid", tmp_path / "grid")
    copied = tmp_path / "grid" / "grid.csv"  # its mixture runs' paths, in the copy
    copied.write_text(copied.read_text().replace(str(grids["tmp"] / "grid"), str(tmp_path / "grid")))
    tree = json.loads(json.dumps(grids["tree"]))
    tree["train"]["output_dir"] = str(tmp_path / "grid")
    before = measures(grids)
    tree.pop("objective")
    tree["data"]["max_examples"] = 24  # the losses are measured again, on fewer records
    grid = train(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    after = json.loads(measured_path(grid).read_text())["columns"]
    assert after[f"score_{EM}"] == before[f"score_{EM}"]  # measured on 48 records, and says so
    assert after["loss_arith"]["dev_set"]["records"] == 24


def test_a_kill_while_grid_csv_is_replaced_leaves_no_stale_measures(grids, tmp_path, monkeypatch):
    from mergeopt.worlds import grid_table

    grid = tmp_path / "grid.csv"
    grid.write_text(grids["grid"].read_text())
    measured_path(grid).write_text(measured_path(grids["grid"]).read_text())

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_table, "write_csv_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        grid_table.write_grid(grid, [], EXPERTS, [], [], {})
    assert grid.read_text() == grids["grid"].read_text() and not measured_path(grid).exists()


def test_a_grid_of_train_runs_without_its_measures_is_said_once(grids, tmp_path, capsys):
    """grid.csv copied or renamed (calibrate's runs.csv) without grid.measured.json: its runs are
    mergeopt train's, so the unchecked columns are said in one warning; a damaged file once too."""
    recipe, objective = resolved_of(changed_tree(grids, tmp_path, ("data", "max_examples", 24)))
    capsys.readouterr()
    for name in ("grid.csv", "runs.csv"):
        grid = tmp_path / "copy" / name
        grid.parent.mkdir(exist_ok=True)
        shutil.copy(grids["grid"], grid)
        check_measured_inputs(grid, recipe, objective)  # not refused: nothing says what it measured
        check_measured_tokens(grid, recipe, objective, [])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert (
            f"{grid}: its runs were trained by mergeopt train, but no {measured_path(grid).name} is" in err[0]
        )  # the file to copy, named: the one train wrote beside its runs' grid.csv
        assert (
            f"(copy {measured_path(grids['grid'])}, written with its runs, to {measured_path(grid)})"
            in err[0]
        )
        measured_path(grid).write_text("{")  # damaged: one warning, not one per reading
        check_measured_inputs(grid, recipe, objective)
        check_measured_tokens(grid, recipe, objective, [])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not readable" in err[0], err
    shutil.copy(measured_path(grids["grid"]), measured_path(grid))  # with its file: refused as the grid
    with pytest.raises(UserError, match="measured on 48 records of dev set 'arith'"):
        check_measured_inputs(grid, recipe, objective)
    # a table whose runs are not on this disk (made elsewhere) is taken without a word
    table = read_csv(grids["grid"]).assign(path="/nowhere/run")
    table.to_csv(tmp_path / "elsewhere.csv", index=False)
    check_measured_inputs(tmp_path / "elsewhere.csv", recipe, objective)
    assert capsys.readouterr().err == ""


def test_the_same_records_in_another_layout_or_order_pass(grids, tiny_world, tmp_path):
    """A dev set rewritten (other spacing, key order, order of the records read) holds the records
    the grid was measured on: its losses are the same means, so it is not refused as another file."""
    records = read_jsonl(tiny_world / "dev" / "arith.jsonl")
    compact, reordered, reversed_all = (tmp_path / f"{n}.jsonl" for n in ("compact", "reordered", "reversed"))
    compact.write_text("".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records))
    first = records[:MAX_EXAMPLES][::-1] + records[MAX_EXAMPLES:]  # the 48 read, in another order
    reordered.write_text("".join(json.dumps(r) + "\n" for r in first))
    reversed_all.write_text("".join(json.dumps(r) + "\n" for r in records[::-1]))  # other 48 first
    for path in (compact, reordered, reversed_all):
        tree = changed_tree(grids, tmp_path)
        tree["data"]["dev"][0]["path"] = str(path)
        if path != reversed_all:
            check_measured_inputs(grids["grid"], *resolved_of(tree))
            continue
        with pytest.raises(
            UserError, match="its loss_arith was measured on another file than dev set 'arith'"
        ):
            check_measured_inputs(grids["grid"], *resolved_of(tree))


def test_a_dev_set_not_on_disk_is_not_said_to_differ(tmp_path):
    """A mistyped dev set path was refused as 'measured on another file ... whose contents differ'
    with the advice to rerun mergeopt train: the loader's 'not found' names the real mistake."""
    from mergeopt.worlds.grid_measures import KIND, VERSION, records_digest

    dev = tmp_path / "math.jsonl"
    dev.write_text('{"text": "one two"}\n{"text": "three four"}\n')
    tree = {
        "model": {"base": "/ckpt/base", "experts": {"math": "/ckpt/math", "code": "/ckpt/code"}},
        "data": {"dev": [{"name": "math", "path": str(dev)}]},
    }
    grid = tmp_path / "grid.csv"
    grid.write_text("run,path,w_math,w_code,loss_math,tokens\na,,1,0,1.5,10\nb,,0,1,1.7,10\n")
    entry = {"path": str(dev), "digest": digest(dev), "max_examples": None, "records": 2}
    entry["records_digest"] = records_digest(dev, None)
    columns = {"loss_math": {"dev_set": entry}}
    measured_path(grid).write_text(json.dumps({"kind": KIND, "version": VERSION, "columns": columns}))
    recipe = recipe_from_dict(tree)
    check_measured_inputs(grid, recipe, Objective.from_recipe(recipe))  # measured on this very file
    tree["data"]["dev"][0]["path"] = str(tmp_path / "maths.jsonl")  # a typo
    typo = recipe_from_dict(tree)
    check_measured_inputs(grid, typo, Objective.from_recipe(typo))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "five six"}\n{"text": "seven"}\n')
    tree["data"]["dev"][0]["path"] = str(other)
    changed = recipe_from_dict(tree)
    with pytest.raises(UserError, match="measured on another file than dev set 'math'"):
        check_measured_inputs(grid, changed, Objective.from_recipe(changed))


def test_the_measures_to_copy_are_those_of_the_grid_not_of_its_experts_train(tmp_path, capsys):
    """A second train (another train.output_dir, the first round's experts reused): its grid's vertex
    rows name experts that lie beside the first round's grid.measured.json. The warning named that
    file to copy (the first row's), though the grid's own lies beside its mixture runs."""
    from mergeopt.worlds.grid_measures import read_measures

    first, second = tmp_path / "round1", tmp_path / "round2"
    runs = [first / "experts" / "a", first / "experts" / "b", second / "mixtures" / "002"]
    for run in runs:
        run.mkdir(parents=True)
        (run / "run.json").write_text("{}")
    for out in (first, second):
        (out / "grid.measured.json").write_text("{}")
    grid = tmp_path / "runs.csv"
    pd.DataFrame({"path": [str(r) for r in runs], "w_a": [1, 0, 0.5], "w_b": [0, 1, 0.5]}).to_csv(
        grid, index=False
    )
    assert read_measures(grid) is None
    err = capsys.readouterr().err
    assert (
        f"(copy {second / 'grid.measured.json'}, written with its runs, to {measured_path(grid)})" in err
    ), err


def test_an_lm_eval_columns_task_files_are_compared_by_their_contents(random_world, tmp_path):
    """An lm-eval term's include_path was compared as a string: a grid moved to another disk with
    its task directory was refused ('scored with include_path /a/tasks ... has /b/tasks now'), and a
    task YAML edited in place, which changes every score, passed. train now records a digest of the
    directory: the same tasks elsewhere pass, edited ones are refused; a file written before it
    recorded one compares the path as before. A checkpoint's fingerprints include the directory."""
    from mergeopt.worlds.grid_measures import INCLUDE_DIGEST, grid_measures, write_measures
    from tests.conftest import recipe_tree

    def recipe_of(tasks: Path):
        tree = recipe_tree(random_world, tmp_path / "out", search={"strategy": "grid"})
        tree["objective"] = {"terms": [{"kind": "lm_eval", "task": "mine", "include_path": str(tasks)}]}
        return recipe_from_dict(tree)

    def checked(tasks: Path) -> None:
        recipe = recipe_of(tasks)
        check_measured_inputs(grid, recipe, Objective.from_recipe(recipe))

    old, new = tmp_path / "a" / "tasks", tmp_path / "b" / "tasks"
    old.mkdir(parents=True)
    (old / "mine.yaml").write_text("task: mine\ndataset_path: json\n")
    (old / "utils.py").write_text("def process(doc):\n    return doc\n")
    grid = tmp_path / "grid.csv"
    grid.write_text("w_arith,w_markov,score_lm_eval_mine\n1,0,0.5\n")
    terms = Objective.from_recipe(recipe_of(old)).metric_terms
    write_measures(grid, grid_measures(recipe_of(old), [], terms), [], None)
    (entry,) = json.loads(measured_path(grid).read_text())["columns"].values()
    assert entry["term"][INCLUDE_DIGEST] == digest(old)
    checked(old)
    new.parent.mkdir()
    shutil.move(old, new)
    checked(new)  # moved with the grid: the same tasks
    (new / "utils.py").write_text("def process(doc):\n    return {**doc, 'q': doc['q'].upper()}\n")
    with pytest.raises(UserError, match=rf"scored with other lm-eval task files than objective term .*{new}"):
        checked(new)
    # the directory gone from the path it was scored at: said so, not taken for edited task files
    with pytest.raises(UserError, match=rf"'lm_eval:mine': its include_path {old} does not exist"):
        checked(old)
    # a file of an earlier mergeopt, without the digest: the path is compared, as it was
    content = json.loads(measured_path(grid).read_text())
    for entry in content["columns"].values():
        del entry["term"][INCLUDE_DIGEST]
    measured_path(grid).write_text(json.dumps(content))
    with pytest.raises(UserError, match=r"scored with include_path .*a/tasks"):
        checked(new)
    # a fit's, rank's or calibrate's state records the tasks too: resumed on edited tasks, refused
    from mergeopt.runtime.fingerprint import input_fingerprints

    assert input_fingerprints(recipe_of(new))[str(new)] == digest(new)
