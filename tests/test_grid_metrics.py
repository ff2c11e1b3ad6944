"""Metric objective terms in the ground-truth grid and in the rank check, on the real tiny world.

Two experts (arith, reverse) and their midpoint are trained briefly from the tiny base, first for a
recipe without terms, then resumed with an exact-match term and a custom lower-is-better term.
grid.csv's score columns are checked against metrics.exact_match and the custom function called
directly on each saved checkpoint; the resume against the checkpoints' mtimes; rank's proxy
scores at the vertices (where the merge is the expert) against the experts' own grid rows.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.config import recipe_from_dict
from mergeopt.evaluation.rank import rank_grid
from mergeopt.loading.problem import load_problem
from mergeopt.objectives import metrics
from mergeopt.objectives.data import read_jsonl
from mergeopt.objectives.objective import Objective
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.worlds import resolve_recipe
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
