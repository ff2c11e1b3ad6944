"""Resuming a fit after kill -9, SIGTERM or SIGINT ends where an uninterrupted run ends.

Gradient strategy: bit-identical mixture.json and trace.csv on CPU. Zero-order strategies: the same
evaluation log (the replayed evaluations keep their logged seconds; the new ones are timed anew,
so the ``seconds`` column is left out of the comparison). Each fit runs as a real subprocess that is
killed at a random moment after its first checkpoint, then rerun with the same command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from mergeopt.runtime.resume import CHECKPOINT_DIR, EVALUATIONS, GRADIENT_STATE, RunState
from tests.conftest import REPO, recipe_tree, run_module

GRADIENT = {
    "optim": {"steps": 800, "batch_size": 4, "eval_every": 10, "patience": 100, "checkpoint_every": 2}
}
SEARCHES = {
    "grid": {"strategy": "grid", "grid": {"divisions": 4}},
    "cmaes": {"strategy": "cmaes", "budget": 24},
    "dirichlet": {"strategy": "dirichlet", "dirichlet": {"samples": 20}},
    "spsa": {"strategy": "spsa", "budget": 30},
    "surrogate": {
        "strategy": "surrogate",
        "budget": 14,
        "surrogate": {"seeds": 10, "verify": 3, "candidates": 500},
    },
}


def _recipe(world, tmp_path, out, **sections) -> str:
    tree = recipe_tree(world, out)
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _start(recipe: str, *extra: str) -> subprocess.Popen:
    # the same environment as run_module (thread counts change float summation order)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mergeopt.fit", recipe, "--quiet", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_after_first_checkpoint(
    recipe, out, marker: str, sig: int, seed: int, latest: float = 0.4
) -> subprocess.Popen:
    """Start a fit, wait for its first checkpoint, send ``sig`` at a random moment up to ``latest`` s after it."""
    process = _start(recipe)
    deadline = time.monotonic() + 240
    while not (out / CHECKPOINT_DIR / marker).is_file():
        assert process.poll() is None, f"the fit ended before its first checkpoint: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, latest))
    if process.poll() is None:
        process.send_signal(sig)
    process.wait(timeout=240)
    return process


def _mixture(out) -> dict:
    return json.loads((out / "mixture.json").read_text())


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_fit_resumed_after_kill_9_is_bit_identical(random_world, tmp_path, seed):
    whole = tmp_path / "whole"
    assert run_module("fit", _recipe(random_world, tmp_path, whole, **GRADIENT), "--quiet").returncode == 0
    out = tmp_path / "killed"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    killed = _interrupt_after_first_checkpoint(recipe, out, GRADIENT_STATE, signal.SIGKILL, seed, latest=0.1)
    assert (
        killed.returncode == -signal.SIGKILL
    )  # killed mid-run: 800 steps take seconds, the kill lands ≤ 0.1 s after step 2
    assert not (out / "mixture.json").exists()  # a killed run never looks finished
    resumed = run_module("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "mixture.json").read_bytes() == (whole / "mixture.json").read_bytes()
    assert (out / "trace.csv").read_bytes() == (whole / "trace.csv").read_bytes()
    assert not (out / CHECKPOINT_DIR).exists()  # finished: the checkpoint is removed


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_zero_order_fit_resumed_after_kill_9_has_the_same_log(random_world, tmp_path, strategy):
    # a 50 ms custom term beside the loss: every evaluation takes long enough to be killed inside
    slow = {
        "kind": "custom",
        "dev": "arith",
        "function": "tests.slow_metric:slow_weight_mean",
        "weight": 0.01,
    }
    search = {"search": SEARCHES[strategy], "objective": {"terms": [{"kind": "loss", "dev": "all"}, slow]}}
    whole = tmp_path / "whole"
    assert run_module("fit", _recipe(random_world, tmp_path, whole, **search), "--quiet").returncode == 0
    out = tmp_path / "killed"
    recipe = _recipe(random_world, tmp_path, out, **search)
    killed = _interrupt_after_first_checkpoint(recipe, out, EVALUATIONS, signal.SIGKILL, 3, latest=0.2)
    assert killed.returncode == -signal.SIGKILL
    logged = len((out / CHECKPOINT_DIR / EVALUATIONS).read_text().splitlines())
    resumed = run_module("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a = pd.read_csv(whole / "evaluations.csv").drop(columns="seconds")
    b = pd.read_csv(out / "evaluations.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert logged < len(b)  # it really was interrupted mid-search
    assert _mixture(out) == _mixture(whole)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_and_say_how_to_resume(random_world, tmp_path, sig, code):
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    stopped = _interrupt_after_first_checkpoint(recipe, out, GRADIENT_STATE, sig, 5, latest=0.1)
    stderr = stopped.stderr.read()
    assert stopped.returncode == code, stderr
    assert "Rerun the same command to continue" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert (out / CHECKPOINT_DIR / GRADIENT_STATE).is_file() and not (out / "mixture.json").exists()
    again = run_module("fit", recipe, "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    whole = tmp_path / "whole"
    assert run_module("fit", _recipe(random_world, tmp_path, whole, **GRADIENT), "--quiet").returncode == 0
    assert (out / "mixture.json").read_bytes() == (whole / "mixture.json").read_bytes()


def test_checkpoint_of_another_recipe_is_refused(random_world, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    killed = _interrupt_after_first_checkpoint(recipe, out, GRADIENT_STATE, signal.SIGKILL, 7)
    assert killed.returncode == -signal.SIGKILL
    changed = run_module("fit", recipe, "optim.lr=0.05", "--quiet")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"mergeopt: error: {out / CHECKPOINT_DIR} belongs to a run with another recipe (optim.lr differs); "
        "rerun with that recipe, pass --restart to start over, or use another output_dir"
    ]
    assert not (out / "mixture.json").exists()
    assert run_module("fit", recipe, "optim.lr=0.05", "--restart", "--quiet").returncode == 0


def test_resume_without_a_checkpoint_is_one_line(random_world, tmp_path):
    out = tmp_path / "run"
    result = run_module("fit", _recipe(random_world, tmp_path, out, **GRADIENT), "--resume", "--quiet")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"mergeopt: error: --resume: {out / CHECKPOINT_DIR} holds no checkpoint to resume"
    )
    assert not out.exists()


def test_same_recipe_and_seed_give_the_same_mixture_json(random_world, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = run_module("fit", _recipe(random_world, tmp_path, out, search=SEARCHES["cmaes"]), "--quiet")
        assert result.returncode == 0, result.stderr
    assert (first / "mixture.json").read_bytes() == (second / "mixture.json").read_bytes()


def test_torn_journal_line_is_dropped(tmp_path):
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    state.append_evaluation({"phase": "grid", "w": [1.0, 0.0], "scores": {"loss": 1.5}, "seconds": 0.1})
    with open(tmp_path / CHECKPOINT_DIR / EVALUATIONS, "a") as handle:
        handle.write('{"phase": "grid", "w": [0.5, ')  # what kill -9 leaves mid-write
    assert [e["w"] for e in state.read_evaluations()] == [[1.0, 0.0]]
    state.append_evaluation({"phase": "grid", "w": [0.0, 1.0], "scores": {"loss": 2.5}, "seconds": 0.1})
    assert [e["w"] for e in state.read_evaluations()] == [[1.0, 0.0], [0.0, 1.0]]


def test_train_resumed_after_kill_9_saves_the_same_models(random_world, tmp_path):
    """mergeopt.worlds.train killed inside a run resumes from that run's step checkpoint, bit-identically."""
    from safetensors.torch import load_file

    from tests.test_train import train_tree

    def recipe(root):
        tree = train_tree(random_world, root)
        tree["train"].update(steps=120, checkpoint_every=3)
        tree["train"]["mixtures"] = {"kind": "list", "weights": [{"alpha": 0.5, "beta": 0.5, "gamma": 0.0}]}
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = run_module("train", recipe(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    path = recipe(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, "-m", "mergeopt.train", path, "--quiet"], cwd=REPO, env=env)
    checkpoint = tmp_path / "killed" / "experts" / ".beta.checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file():  # inside the second expert's run
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "experts" / "beta" / "run.json").exists()
    resumed = run_module("train", path, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for run in ("experts/alpha", "experts/beta", "experts/gamma", "grid/mixtures/000"):
        a = load_file(str(tmp_path / "whole" / run / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / run / "model.safetensors"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), run
    grids = [
        pd.read_csv(tmp_path / r / "grid" / "grid.csv").drop(columns="path") for r in ("whole", "killed")
    ]
    pd.testing.assert_frame_equal(*grids, check_exact=True)
    assert not list((tmp_path / "killed").glob("**/.*.checkpoint"))


def test_sigterm_inside_a_search_batch_keeps_every_finished_evaluation(random_world, tmp_path):
    slow = {
        "kind": "custom",
        "dev": "arith",
        "function": "tests.slow_metric:slow_weight_mean",
        "weight": 0.01,
    }
    sections = {"search": SEARCHES["grid"], "objective": {"terms": [{"kind": "loss", "dev": "all"}, slow]}}
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **sections)
    stopped = _interrupt_after_first_checkpoint(recipe, out, EVALUATIONS, signal.SIGTERM, 11, latest=0.2)
    stderr = stopped.stderr.read()
    assert stopped.returncode == 143, stderr
    assert "SIGTERM at evaluation" in stderr and "Rerun the same command to continue" in stderr
    logged = len((out / CHECKPOINT_DIR / EVALUATIONS).read_text().splitlines())
    assert 1 <= logged < 15  # the grid's 15 mixtures are one batch: its finished part was kept
    assert run_module("fit", recipe, "--quiet").returncode == 0
    whole = tmp_path / "whole"
    assert run_module("fit", _recipe(random_world, tmp_path, whole, **sections), "--quiet").returncode == 0
    a = pd.read_csv(whole / "evaluations.csv").drop(columns="seconds")
    b = pd.read_csv(out / "evaluations.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_clearing_removes_a_temporary_file_a_kill_left_mid_save(tmp_path):
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    (tmp_path / CHECKPOINT_DIR / ".gradient.pt.abc123.tmp").write_bytes(b"half a save")
    state.clear()
    assert not (tmp_path / CHECKPOINT_DIR).exists()


def test_ranks_that_disagree_on_the_checkpoint_are_refused_in_one_line(random_world, tmp_path, monkeypatch):
    """Across nodes each rank reads output_dir itself: a node that does not see the checkpoint
    rank 0 resumes would start over and part from it, so the fit stops before loading anything."""
    from mergeopt import fit
    from mergeopt.config import load_recipe
    from mergeopt.errors import UserError
    from mergeopt.runtime import distributed

    out = tmp_path / "run"
    recipe = load_recipe(_recipe(random_world, tmp_path, out, **GRADIENT))
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [value, False, value])
    monkeypatch.setattr(RunState, "exists", lambda self: True)
    monkeypatch.setattr(RunState, "check_matches", lambda self: None)
    with pytest.raises(UserError, match=r"not by rank\(s\) 1: under torchrun over several nodes, output_dir"):
        fit._checkpoint(recipe, "auto")
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [value, value])
    assert fit._checkpoint(recipe, "auto")[1] is True  # every rank sees it: resumed
