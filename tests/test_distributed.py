"""torchrun with 2 CPU processes (gloo) ends with the mixture one process finds.

Each rank scores half of every batch and the ranks add up token-loss sums, counts and the K-vector
gradient, so the run must match a single-process run up to float summation order (≤ 1e-6 on w).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, recipe_tree, run_module


def _torchrun(recipe_path, *overrides, processes: int = 2):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "mergeopt.fit",
            str(recipe_path),
            *overrides,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    "search",
    [{}, {"strategy": "grid", "grid": {"divisions": 2}}, {"strategy": "cmaes", "budget": 14}],
    ids=["gradient", "grid", "cmaes"],
)
def test_two_processes_find_the_mixture_one_process_finds(random_world, tmp_path, search):
    tree = recipe_tree(random_world, tmp_path / "one", **({"search": search} if search else {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    single = run_module("fit", str(path), "--quiet")
    assert single.returncode == 0, single.stderr
    double = _torchrun(path, f"output_dir={tmp_path / 'two'}")
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "mixture.json").read_text())
    two = json.loads((tmp_path / "two" / "mixture.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for name, w in one["weights"].items():
        assert two["weights"][name] == pytest.approx(w, abs=1e-6)
    assert two["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-6)
    assert two["heldout_loss"] == pytest.approx(one["heldout_loss"], rel=1e-6)
    if search:  # zero-order: the same evaluation log, its candidates split between the ranks
        assert (tmp_path / "two" / "evaluations.csv").is_file()
        log_one = pd.read_csv(tmp_path / "one" / "evaluations.csv").drop(columns="seconds")
        log_two = pd.read_csv(tmp_path / "two" / "evaluations.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(log_one, log_two, rtol=1e-6)
        per_process = two["search"]["evaluations_per_process"]
        assert one["search"]["evaluations_per_process"] == [one["search"]["evaluations"]]
        assert sum(per_process) == two["search"]["evaluations"] and min(per_process) >= 1
        assert max(per_process) - min(per_process) <= two["search"]["evaluations"] // 2
    # one summary, printed by rank 0 only
    assert double.stdout.count("Recommended mixture") == 1


@pytest.mark.parametrize(
    "search,processes",
    # three processes (blocks padded) with the gradient; grid search with two
    [({}, 3), ({"strategy": "grid", "grid": {"divisions": 2}}, 2)],
    ids=["gradient-3", "grid-2"],
)
def test_a_sharded_stack_finds_the_mixture_one_process_finds(random_world, tmp_path, search, processes):
    """model.shard=fsdp: each rank holds a block of rows of every stacked matrix, the ranks gather
    each merged weight and score every batch (and, for grid search, every candidate) together."""
    tree = recipe_tree(random_world, tmp_path / "one", **({"search": search} if search else {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    single = run_module("fit", str(path), "--quiet")
    assert single.returncode == 0, single.stderr
    sharded = _torchrun(path, f"output_dir={tmp_path / 'sharded'}", "model.shard=fsdp", processes=processes)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "mixture.json").read_text())
    many = json.loads((tmp_path / "sharded" / "mixture.json").read_text())
    assert (one["shard"], many["shard"], many["processes"]) == ("none", "fsdp", processes)
    # rank 0's stack: a block of rows of each matrix (the tiny model's vectors stay whole)
    assert many["stack"]["bytes"] < one["stack"]["bytes"] / processes * 1.15
    for name, w in one["weights"].items():
        assert many["weights"][name] == pytest.approx(w, abs=1e-6)
    assert many["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-6)
    assert many["heldout_loss"] == pytest.approx(one["heldout_loss"], rel=1e-6)
    if search:  # every rank scored every candidate
        assert (one["search"]["scoring"], many["search"]["scoring"]) == ("single", "together")
        evaluations = many["search"]["evaluations"]
        assert many["search"]["evaluations_per_process"] == [evaluations] * processes
        log_one = pd.read_csv(tmp_path / "one" / "evaluations.csv").drop(columns="seconds")
        log_many = pd.read_csv(tmp_path / "sharded" / "evaluations.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(
            log_one.drop(columns="process", errors="ignore"),
            log_many.drop(columns="process", errors="ignore"),
            rtol=1e-6,
        )
