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


def _torchrun(recipe_path, *overrides):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
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
