"""The grid proxy through the searches' Evaluator: the same numbers, resumable, split over torchrun ranks.

``mergeopt.evaluation.proxy.proxy_grid`` scores each grid mixture through
:class:`mergeopt.search.evaluator.Evaluator`. Checked here: its losses and metric scores against a
direct ``evaluate_sums`` loop and the metric function called on the merge; ``mergeopt rank`` and a
fit's rank check killed mid-grid (``MERGEOPT_FAULT``) and rerun replay the finished rows (the rerun
carries a fault at an evaluation number it only reaches if it scores those rows again) and write
what an uninterrupted run (in this process) writes; two gloo processes write one process's table.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mergeopt.config import recipe_from_dict
from mergeopt.evaluation.proxy import proxy_grid
from mergeopt.loading.problem import load_problem
from mergeopt.objectives.loss import evaluate_sums
from mergeopt.objectives.objective import Objective
from mergeopt.runtime.resume import (
    CHECKPOINT_DIR,
    EVALUATIONS,
    PROXY_EVALUATIONS,
    RANK_CHECKPOINT_DIR,
    RunState,
)
from tests.conftest import recipe_tree, run_forked, run_in_process, run_module, run_ranks
from tests.test_grid_metrics import completion_nll

NLL = {
    "kind": "custom",
    "dev": "arith",
    "name": "nll",
    "function": "tests.test_grid_metrics:completion_nll",
    "higher_is_better": False,
}
TERMS = [{"kind": "loss", "dev": "all"}, NLL]


def grid_table() -> pd.DataFrame:
    """The step-1/3 lattice over three experts (10 mixtures) and one repeated row, with made-up truths."""
    rows = [(i / 3, j / 3, (3 - i - j) / 3) for i in range(4) for j in range(4 - i)]
    rows.append(rows[4])
    table = pd.DataFrame(rows, columns=["w_alpha", "w_beta", "w_gamma"])
    table["loss_arith"] = np.linspace(3.0, 2.0, len(table))
    table["loss_markov"] = np.linspace(2.0, 4.0, len(table)) ** 2 % 3
    table["score_nll"] = np.arange(len(table), dtype=float)[::-1] % 4
    return table


def test_the_evaluator_path_equals_a_direct_evaluate_sums_loop(random_world, tmp_path):
    tree = recipe_tree(
        random_world, tmp_path / "out", objective={"terms": TERMS}, search={"strategy": "grid"}
    )
    tree["data"]["max_examples"] = 8  # both sides score the same 8 records of each set
    recipe = recipe_from_dict(tree)
    objective = Objective.from_recipe(recipe)
    problem = load_problem(recipe, progress=False, objective=objective)
    table = grid_table()
    proxy = proxy_grid(problem, objective, table, progress=False)
    assert list(proxy.columns) == ["loss_arith", "loss_markov", "score_nll"]
    arith = [ex.record for ex in problem.sets[0].all]
    for i, row in table.iterrows():
        w = torch.tensor(row[["w_alpha", "w_beta", "w_gamma"]].to_numpy(dtype=np.float64))
        w = w / w.sum()
        sums, counts = evaluate_sums(
            problem.model, problem.stack, w, problem.sets, "all", 16, problem.pad_id, problem.device
        )
        np.testing.assert_allclose(proxy.loc[i, ["loss_arith", "loss_markov"]], sums / counts, rtol=1e-6)
        with problem.stack.at(w) as merged:
            assert proxy.loc[i, "score_nll"] == pytest.approx(
                completion_nll(merged, problem.tokenizer, arith), rel=1e-6
            )
    assert proxy["loss_arith"].nunique() == len(table) - 1  # every mixture its own loss: a real check
    assert proxy.iloc[-1].equals(proxy.iloc[4])  # the repeated row: scored once, answered from the cache


def _write(world: dict, tmp_path) -> tuple[str, str]:
    """A grid-search recipe with the loss and a custom term, and the grid table, written to files."""
    tree = recipe_tree(world, tmp_path / "fit", objective={"terms": TERMS}, search={"strategy": "grid"})
    recipe, grid = tmp_path / "recipe.yaml", tmp_path / "grid.csv"
    recipe.write_text(yaml.safe_dump(tree))
    grid_table().to_csv(grid, index=False)
    return str(recipe), str(grid)


def _rank(recipe: str, grid: str, out, fault: str) -> subprocess.CompletedProcess:
    """A rank run in a forked process that signals itself at ``fault`` (if it gets that far)."""
    return run_forked("rank", recipe, "--grid", grid, "--out", str(out), "--quiet", fault=fault)


@pytest.fixture(scope="module")
def ranked_once(random_world, tmp_path_factory):
    """The grid recipe and table, and one uninterrupted single-process rank of them (in this process)."""
    tmp = tmp_path_factory.mktemp("ranked_once")
    recipe, grid = _write(random_world, tmp)
    whole = run_in_process("rank", recipe, "--grid", grid, "--out", str(tmp / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    return recipe, grid, tmp / "whole"


def _journal(path) -> int:
    return len(path.read_text().splitlines())


def test_rank_killed_mid_grid_resumes_without_scoring_a_finished_row_again(ranked_once, tmp_path):
    recipe, grid, whole = ranked_once
    out = tmp_path / "killed"
    killed = _rank(recipe, grid, out, fault="sigkill@evaluation:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _journal(out / RANK_CHECKPOINT_DIR / PROXY_EVALUATIONS) == 4  # the rows finished before it
    assert not (out / "rank_report.json").exists()
    # evaluation 2 is only reached again if the resumed run scores the journaled rows anew
    resumed = _rank(recipe, grid, out, fault="sigkill@evaluation:2")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("rank_report.json", "rank_pairs.csv"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (out / RANK_CHECKPOINT_DIR).exists()  # finished: the report is the record


@pytest.mark.parametrize("workers", [1, 2])
def test_rank_stopped_in_its_baselines_says_where_its_state_is_and_resumes(ranked_once, tmp_path, workers):
    """SIGINT during the baselines' leave-one-out fits (every grid row journaled already), in this
    process and in a pool of 2: the run stops there, saying where its state is, and publishes
    nothing (it fitted every baseline first, published and exited 0 as if never asked to stop;
    in a pool a Ctrl-C, which reaches the workers too, was a bare "interrupted"); the rerun replays
    the journal and writes the uninterrupted run's report."""
    recipe, grid, whole = ranked_once
    out = tmp_path / "stopped"
    args = ("rank", recipe, "--grid", grid, "--out", str(out), "--quiet", f"rank.workers={workers}")
    # new processes (not run_forked): a pool's fork server started from a forked child hung
    stopped = run_module(*args, fault="sigint@baseline:3")
    assert stopped.returncode == 130, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == (
        "mergeopt: interrupted (SIGINT at the baselines' leave-one-out fits); the state is saved in "
        f"{out / RANK_CHECKPOINT_DIR}. Rerun the same command to continue."
    ), stopped.stderr
    assert _journal(out / RANK_CHECKPOINT_DIR / PROXY_EVALUATIONS) == len(grid_table()) - 1  # a row repeats
    assert not (out / "rank_report.json").exists()
    resumed = run_module(*args)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("rank_report.json", "rank_pairs.csv"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (out / RANK_CHECKPOINT_DIR).exists()


def test_a_fits_rank_check_killed_mid_grid_resumes_from_the_fits_checkpoint(random_world, tmp_path):
    """A gradient fit makes no other evaluation, so evaluation N is the rank check's Nth grid row."""
    trees = {}
    for run in ("whole", "killed"):
        trees[run] = recipe_tree(random_world, tmp_path / run, rank={"grid": str(tmp_path / "grid.csv")})
    grid_table().drop(columns="score_nll").to_csv(tmp_path / "grid.csv", index=False)
    paths = {run: tmp_path / f"{run}.yaml" for run in trees}
    for run, tree in trees.items():
        paths[run].write_text(yaml.safe_dump(tree))
    assert run_in_process("fit", str(paths["whole"]), "--quiet").returncode == 0
    out = tmp_path / "killed"
    killed = run_forked("fit", str(paths["killed"]), "--quiet", fault="sigkill@evaluation:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _journal(out / CHECKPOINT_DIR / PROXY_EVALUATIONS) == 3
    assert not (out / CHECKPOINT_DIR / EVALUATIONS).exists()  # the search's journal is another file
    resumed = run_forked("fit", str(paths["killed"]), "--quiet", fault="sigkill@evaluation:2")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "mixture.json").read_bytes() == (tmp_path / "whole" / "mixture.json").read_bytes()
    assert (out / "rank_pairs.csv").read_bytes() == (tmp_path / "whole" / "rank_pairs.csv").read_bytes()


def test_a_restart_reads_nothing_the_old_run_left(tmp_path):
    """A state started lazily (a new run, or --restart) reads as empty until its first save, which
    replaces the old files: the old run's journals and gradient state never answer the new run."""
    old = RunState(tmp_path, {"seed": 0})
    old.start()
    old.append_evaluation({"w": [1.0]})
    old.append_evaluation({"w": [0.5]}, journal=PROXY_EVALUATIONS)
    old.save_gradient({"next_step": 4})
    new = RunState(tmp_path, {"seed": 1})
    new.start_lazily()
    assert new.read_evaluations() == [] and new.read_evaluations(PROXY_EVALUATIONS) == []
    assert new.load_gradient() is None
    new.append_evaluation({"w": [0.25]}, journal=PROXY_EVALUATIONS)
    assert new.read_evaluations(PROXY_EVALUATIONS) == [{"w": [0.25]}]
    assert new.read_evaluations() == [] and new.load_gradient() is None
    assert json.loads((new.dir / "meta.json").read_text()) == {"recipe": {"seed": 1}, "processes": 1}


def test_two_gloo_processes_write_one_process_table(ranked_once, tmp_path):
    recipe, grid, one = ranked_once
    double = run_ranks("rank", recipe, "--grid", grid, "--out", str(tmp_path / "two"), "--quiet", processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("Wrote rank_report.json") == 1  # rank 0 writes and prints
    one = pd.read_csv(one / "rank_pairs.csv")
    two = pd.read_csv(tmp_path / "two" / "rank_pairs.csv")
    assert one["proxy_nll"].nunique() > 1
    pd.testing.assert_frame_equal(one, two, rtol=1e-6)


def test_three_sharded_ranks_rank_a_grid_without_splitting_a_training_batch(random_world, tmp_path):
    """``mergeopt rank`` only evaluates mixtures, but with ``model.shard: fsdp`` over 3 ranks it
    refused a gradient recipe's training micro-batch (optim.batch_size 4 x 2 dev sets = 8, not a
    multiple of 3) in one line, as the fit must; it splits no micro-batch and ranks as one process."""
    recipe, grid = tmp_path / "recipe.yaml", tmp_path / "grid.csv"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, tmp_path / "fit")))  # gradient
    grid_table().drop(columns=["score_nll"]).to_csv(grid, index=False)
    args = ("--grid", str(grid), "--quiet", "--out")
    one = run_in_process("rank", str(recipe), *args, str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    job = run_ranks("rank", str(recipe), "model.shard=fsdp", *args, str(tmp_path / "three"), processes=3)
    assert job.returncode == 0, job.stderr[-3000:]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "one" / "rank_pairs.csv"),
        pd.read_csv(tmp_path / "three" / "rank_pairs.csv"),
        rtol=1e-6,
    )
