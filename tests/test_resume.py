"""Resuming a fit after kill -9, SIGTERM or SIGINT ends where an uninterrupted run ends.

Gradient strategy: bit-identical mixture.json and trace.csv on CPU. Zero-order strategies: the same
evaluation log (the replayed evaluations keep their logged seconds; the new ones are timed anew,
so the ``seconds`` column is left out of the comparison). Each interrupted fit runs in a process of
its own that signals itself at a named step or evaluation (``MERGEOPT_FAULT``,
:mod:`mergeopt.runtime.faults`), then is rerun with the same command: no test waits for a clock, so
none races one. That process is forked from the test's (``run_forked``: torch is imported already);
the uninterrupted and resumed runs go through the same ``mergeopt`` entry point in the test's process
(``run_in_process``), with the same single thread.
"""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest
import yaml

from mergeopt.runtime import interrupts
from mergeopt.runtime.resume import CHECKPOINT_DIR, EVALUATIONS, GRADIENT_STATE, RunState
from tests.conftest import free_port, join_gloo, recipe_tree, run_forked, run_in_process, run_module

GRADIENT = {"optim": {"steps": 40, "batch_size": 4, "eval_every": 10, "patience": 100, "checkpoint_every": 2}}
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


def _mixture(out) -> dict:
    return json.loads((out / "mixture.json").read_text())


@pytest.fixture(scope="module")
def whole_gradient(random_world, tmp_path_factory):
    """The uninterrupted gradient fit every interrupted one is compared with, run once per module."""
    root = tmp_path_factory.mktemp("whole")
    result = run_in_process("fit", _recipe(random_world, root, root / "whole", **GRADIENT), "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "whole"


@pytest.mark.parametrize("step", [5, 12])  # after step 4's checkpoint; just before step 12's
def test_gradient_fit_resumed_after_kill_9_is_bit_identical(random_world, whole_gradient, tmp_path, step):
    whole = whole_gradient
    out = tmp_path / "killed"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    killed = run_forked("fit", recipe, "--quiet", fault=f"sigkill@step:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "mixture.json").exists()  # a killed run never looks finished
    saved = RunState(out, {}).load_gradient()
    assert saved["next_step"] == (step - 1) // 2 * 2  # the last checkpoint before the kill
    resumed = run_in_process("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "mixture.json").read_bytes() == (whole / "mixture.json").read_bytes()
    assert (out / "trace.csv").read_bytes() == (whole / "trace.csv").read_bytes()
    assert not (out / CHECKPOINT_DIR).exists()  # finished: the checkpoint is removed


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_zero_order_fit_resumed_after_kill_9_has_the_same_log(random_world, tmp_path, strategy):
    # a custom term beside the loss: its scores are journaled and replayed too
    term = {"kind": "custom", "dev": "arith", "function": "tests.weight_metric:weight_mean", "weight": 0.01}
    search = {"search": SEARCHES[strategy], "objective": {"terms": [{"kind": "loss", "dev": "all"}, term]}}
    whole = tmp_path / "whole"
    assert run_in_process("fit", _recipe(random_world, tmp_path, whole, **search), "--quiet").returncode == 0
    out = tmp_path / "killed"
    recipe = _recipe(random_world, tmp_path, out, **search)
    killed = run_forked("fit", recipe, "--quiet", fault="sigkill@evaluation:7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    logged = len((out / CHECKPOINT_DIR / EVALUATIONS).read_text().splitlines())
    assert logged == 6  # killed as the 7th evaluation began: the six before it are journaled
    resumed = run_in_process("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a = pd.read_csv(whole / "evaluations.csv").drop(columns="seconds")
    b = pd.read_csv(out / "evaluations.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert logged < len(b)  # it really was interrupted mid-search
    assert _mixture(out) == _mixture(whole)


def test_a_search_resumed_on_fewer_ranks_than_it_was_killed_under_finishes(random_world, tmp_path):
    """A zero-order search killed under torchrun with 3 ranks and rerun with fewer (a requeued job on
    a smaller allocation, or one process): its journal holds evaluations that ranks 1 and 2 scored.
    Every rerun resumed, replayed the log and ended with an IndexError traceback as it counted the
    evaluations per process, so the search could never finish. The journal of a 3-rank run is
    this process's with the ranks of each round (0, 1, 2, 0, ...) written in."""
    search = {"search": SEARCHES["dirichlet"]}
    whole = tmp_path / "whole"
    assert run_in_process("fit", _recipe(random_world, tmp_path, whole, **search), "--quiet").returncode == 0
    out = tmp_path / "killed"
    recipe = _recipe(random_world, tmp_path, out, **search)
    assert run_forked("fit", recipe, "--quiet", fault="sigkill@evaluation:7").returncode == -signal.SIGKILL
    journal = out / CHECKPOINT_DIR / EVALUATIONS
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps({**e, "process": i % 3}) + "\n" for i, e in enumerate(entries)))
    resumed = run_in_process("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    search_info = _mixture(out)["search"]
    # six replayed, two by each of the 3 ranks; every later one scored by this process, rank 0
    assert search_info["evaluations_per_process"] == [search_info["evaluations"] - 4, 2, 2]
    assert _mixture(out)["weights"] == _mixture(whole)["weights"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_and_say_how_to_resume(random_world, whole_gradient, tmp_path, sig, code):
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    stopped = run_forked("fit", recipe, "--quiet", fault=f"{signal.Signals(sig).name.lower()}@step:5")
    stderr = stopped.stderr
    assert stopped.returncode == code, stderr
    assert f"{signal.Signals(sig).name} at step 5" in stderr  # saved at the step the signal arrived in
    assert "Rerun the same command to continue" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert (out / CHECKPOINT_DIR / GRADIENT_STATE).is_file() and not (out / "mixture.json").exists()
    again = run_in_process("fit", recipe, "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    assert (out / "mixture.json").read_bytes() == (whole_gradient / "mixture.json").read_bytes()


@pytest.mark.parametrize("fault", ["sigterm@closing:2", "sigkill@closing:4", "sigint@publish:1"])
def test_a_fit_stopped_after_its_search_resumes_to_the_same_outputs(
    random_world, whole_gradient, tmp_path, fault
):
    """Stopped in the closing evaluations (the fitted, uniform and single-expert mixtures scored for
    mixture.json, ``closing:N``): SIGTERM says where the state is in one line, kill -9 leaves it, and
    neither leaves a mixture.json; the rerun ends with the uninterrupted run's files. A SIGINT once
    every output is staged lets them be published (exit 0, nothing left to resume)."""
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    stopped = run_forked("fit", recipe, "--quiet", fault=fault)
    if fault.startswith("sigint@publish"):
        assert stopped.returncode == 0, stopped.stderr
        assert not (out / CHECKPOINT_DIR).exists()
    else:
        assert stopped.returncode in (143, -signal.SIGKILL), stopped.stderr
        if fault.startswith("sigterm"):
            assert stopped.stderr.strip().splitlines() == [
                "mergeopt: interrupted (SIGTERM at the closing evaluation of the uniform mixture); the "
                f"state is saved in {out / CHECKPOINT_DIR}. Rerun the same command to continue (or add --resume)."
            ]
        assert (out / CHECKPOINT_DIR / GRADIENT_STATE).is_file() and not (out / "mixture.json").exists()
        again = run_in_process("fit", recipe, "--quiet")
        assert again.returncode == 0, again.stderr
    for name in ("mixture.json", "trace.csv"):
        assert (out / name).read_bytes() == (whole_gradient / name).read_bytes(), name


def test_a_fit_stopped_in_its_closing_evaluations_does_not_run_its_search_again(
    random_world, whole_gradient, tmp_path
):
    """The search's end is saved before the closing evaluations: with checkpoint_every above the
    steps run, a stop there said 'nothing was saved yet' and the rerun ran all 40 steps again. The
    rerun here is killed at its first step if it runs one; it runs none and ends with the
    uninterrupted run's weights and trace."""
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, optim={**GRADIENT["optim"], "checkpoint_every": 1000})
    stopped = run_forked("fit", recipe, "--quiet", fault="sigterm@closing:2")
    assert stopped.returncode == 143, stopped.stderr
    assert f"the state is saved in {out / CHECKPOINT_DIR}" in stopped.stderr
    again = run_forked("fit", recipe, "--quiet", fault="sigkill@step:1")
    assert again.returncode == 0, again.stderr
    assert (out / "trace.csv").read_bytes() == (whole_gradient / "trace.csv").read_bytes()
    assert _mixture(out)["weights"] == _mixture(whole_gradient)["weights"]


def test_checkpoint_of_another_recipe_is_refused(random_world, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    killed = run_forked("fit", recipe, "--quiet", fault="sigkill@step:7")
    assert killed.returncode == -signal.SIGKILL
    changed = run_in_process("fit", recipe, "optim.lr=0.05", "--quiet")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"mergeopt: error: {out / CHECKPOINT_DIR} belongs to a run with another recipe (optim.lr differs: "
        "0.1 in the checkpoint, 0.05 now); "
        "rerun with that recipe, pass --restart to start over, or use another output_dir"
    ]
    assert not (out / "mixture.json").exists()
    assert run_in_process("fit", recipe, "optim.lr=0.05", "--restart", "--quiet").returncode == 0


def test_how_a_run_runs_may_change_on_resume_and_what_it_computes_may_not(
    random_world, whole_gradient, tmp_path
):
    """A job restarted on a smaller machine may lower the evaluation batch, checkpoint activations or
    save less often: the resume says what changed and ends on the uninterrupted run's weights; a
    key that changes the numbers (the learning rate) is still refused."""
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    assert run_forked("fit", recipe, "--quiet", fault="sigkill@step:7").returncode == -signal.SIGKILL
    refused = run_in_process("fit", recipe, "optim.lr=0.05", "--quiet")
    assert refused.returncode == 2 and "optim.lr differs" in refused.stderr
    changes = ["optim.eval_batch_size=3", "optim.activation_checkpointing=true", "optim.checkpoint_every=3"]
    resumed = run_in_process("fit", recipe, *changes)
    assert resumed.returncode == 0, resumed.stderr
    said = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming from"))
    assert (
        "optim.eval_batch_size 3 (was 16)" in said
        and "optim.activation_checkpointing true (was false)" in said
    )
    ours, whole = _mixture(out), _mixture(whole_gradient)
    assert ours["weights"].keys() == whole["weights"].keys()
    for name, w in whole["weights"].items():
        assert ours["weights"][name] == pytest.approx(w, abs=1e-6)


def test_a_resume_under_another_number_of_processes_says_so(random_world, whole_gradient, tmp_path):
    """A fit killed under torchrun with 3 ranks and rerun with 1 (or 2) resumes, and its numbers move
    in their last bits (each batch is split and summed in another order), but the resume line said
    only ``resuming from ...``, as if nothing had changed. The checkpoint records the number of
    processes; a 3-rank job's is this process's with 3 written in."""
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    assert run_forked("fit", recipe, "--quiet", fault="sigkill@step:7").returncode == -signal.SIGKILL
    meta_path = out / CHECKPOINT_DIR / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "processes": 3}))
    resumed = run_in_process("fit", recipe)
    assert resumed.returncode == 0, resumed.stderr
    said = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming from"))
    assert said.endswith("checkpoint, with 1 process (was 3)"), said


def test_a_list_entry_that_differs_is_named_with_both_values():
    """A dev set's weight changed: the message names data.dev.0.weight and both values, not data.dev."""
    from mergeopt.runtime.resume import UNSET, _first_difference

    saved = {"data": {"dev": [{"name": "a", "weight": 1.0}, {"name": "b"}]}, "optim": {"steps": 40}}
    now = {"data": {"dev": [{"name": "a", "weight": 2.0}, {"name": "b"}]}, "optim": {"steps": 40}}
    assert _first_difference(saved, now) == ("data.dev.0.weight", 1.0, 2.0)
    assert _first_difference(saved, saved) is None
    assert _first_difference({"optim": {}}, {"optim": {"lr": 0.1}}) == ("optim.lr", UNSET, 0.1)
    longer = {"data": {"dev": [{"name": "a", "weight": 1.0}]}}
    assert _first_difference(saved, longer)[0] == "data.dev"  # another number of sets: the list


def test_a_complete_run_is_not_fitted_again_without_restart(random_world, whole_gradient, tmp_path):
    """Rerunning a finished fit's command is refused in one line, the result untouched (a retried
    job would spend the fit again and replace it); --resume says the run is complete; --restart
    fits again and writes the same mixture; another recipe replaces the run without --restart."""
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **GRADIENT)
    assert run_in_process("fit", recipe, "--quiet").returncode == 0
    before = (out / "mixture.json").stat()
    again = run_in_process("fit", recipe, "--quiet")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"mergeopt: error: {out} already holds this recipe's complete run (mixture.json): pass "
        "--restart to fit again and replace it, or choose another output_dir"
    ]
    resumed = run_in_process("fit", recipe, "--resume", "--quiet")
    assert (
        resumed.returncode == 2 and "holds a complete run (mixture.json) and no checkpoint" in resumed.stderr
    )
    after = (out / "mixture.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert run_in_process("fit", recipe, "--restart", "--quiet").returncode == 0
    assert (out / "mixture.json").read_bytes() == (whole_gradient / "mixture.json").read_bytes()
    # another recipe into the directory (iterating on overrides) replaces the run, as before
    assert run_in_process("fit", recipe, "optim.lr=0.05", "--quiet").returncode == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 0.05


def test_a_complete_run_copied_with_its_inputs_is_not_fitted_again(random_world, tmp_path):
    """A finished run copied with its base, experts and dev sets to another disk (the old paths
    gone) and its command rerun there was taken for another recipe's (model.base differs) and
    fitted again from scratch, hours at 8B, replacing the answer it held. It is this recipe's
    complete run: refused without --restart. Inputs whose old paths are still there are other
    inputs: that run is replaced, as before."""
    import shutil

    old, new = tmp_path / "a", tmp_path / "b"
    old.mkdir()
    for name in ["base", *random_world["experts"]]:
        shutil.copytree(random_world["root"] / name, old / name)
    for name in random_world["dev"]:
        shutil.copy(random_world["dev"][name], old / f"{name}.jsonl")

    def world(root):
        return {
            "root": root,
            "base": str(root / "base"),
            "experts": {name: str(root / name) for name in random_world["experts"]},
            "dev": {name: str(root / f"{name}.jsonl") for name in random_world["dev"]},
        }

    steps = {"optim": {**GRADIENT["optim"], "steps": 4}}
    assert run_in_process("fit", _recipe(world(old), old, old / "run", **steps), "--quiet").returncode == 0
    shutil.copytree(old, new)
    before = (new / "run" / "mixture.json").stat()
    here = _recipe(world(new), new, new / "run", **steps)
    shutil.rmtree(old)
    again = run_in_process("fit", here, "--quiet")
    assert again.returncode == 2, again.stderr
    assert f"{new / 'run'} already holds this recipe's complete run" in again.stderr
    after = (new / "run" / "mixture.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    shutil.copytree(new, old)  # the old inputs back: the copy's recipe reads other files
    assert run_in_process("fit", here, "--quiet").returncode == 0
    assert (new / "run" / "mixture.json").stat().st_ino != before.st_ino


def test_resume_without_a_checkpoint_is_one_line(random_world, tmp_path):
    out = tmp_path / "run"
    result = run_in_process("fit", _recipe(random_world, tmp_path, out, **GRADIENT), "--resume", "--quiet")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"mergeopt: error: --resume: {out / CHECKPOINT_DIR} holds no checkpoint to resume"
    )
    assert not out.exists()


def test_same_recipe_and_seed_give_the_same_mixture_json(random_world, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out, run in ((first, run_module), (second, run_in_process)):  # a new process, and this one
        result = run("fit", _recipe(random_world, tmp_path, out, search=SEARCHES["cmaes"]), "--quiet")
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
        tree["train"].update(steps=30, checkpoint_every=3)
        tree["train"]["mixtures"] = {"kind": "list", "weights": [{"alpha": 0.5, "beta": 0.5, "gamma": 0.0}]}
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = run_in_process("train", recipe(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    path = recipe(tmp_path / "killed")
    killed = run_forked(
        "train", path, "--quiet", fault="sigkill@train.beta:7"
    )  # inside the second expert's run
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((tmp_path / "killed" / "experts" / ".beta.checkpoint" / "state.json").read_text())
    assert state["step"] == 6  # resumed from beta's last checkpoint, not from its start
    assert not (tmp_path / "killed" / "experts" / "beta" / "run.json").exists()
    resumed = run_in_process("train", path)
    assert resumed.returncode == 0, resumed.stderr
    # said as a fit says it resumes (the line said only '1 finished, 3 to train')
    assert "1 finished, 3 to train, continuing beta from step 6 (" in resumed.stdout + resumed.stderr
    for run in ("experts/alpha", "experts/beta", "experts/gamma", "grid/mixtures/000"):
        a = load_file(str(tmp_path / "whole" / run / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / run / "model.safetensors"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), run
        records = [json.loads((tmp_path / r / run / "run.json").read_text()) for r in ("whole", "killed")]
        # the tokens each domain trained on count the steps before the kill too (replayed on resuming)
        whole_run, killed_run = ((r["tokens"], r["domain_tokens"]) for r in records)
        assert whole_run == killed_run, run
    grids = [
        pd.read_csv(tmp_path / r / "grid" / "grid.csv").drop(columns="path") for r in ("whole", "killed")
    ]
    pd.testing.assert_frame_equal(*grids, check_exact=True)
    assert not list((tmp_path / "killed").glob("**/.*.checkpoint"))


def test_sigterm_inside_a_search_batch_keeps_every_finished_evaluation(random_world, tmp_path):
    term = {"kind": "custom", "dev": "arith", "function": "tests.weight_metric:weight_mean", "weight": 0.01}
    sections = {"search": SEARCHES["grid"], "objective": {"terms": [{"kind": "loss", "dev": "all"}, term]}}
    out = tmp_path / "run"
    recipe = _recipe(random_world, tmp_path, out, **sections)
    stopped = run_forked("fit", recipe, "--quiet", fault="sigterm@evaluation:6")
    stderr = stopped.stderr
    assert stopped.returncode == 143, stderr
    assert "SIGTERM at evaluation 6" in stderr and "Rerun the same command to continue" in stderr
    logged = len((out / CHECKPOINT_DIR / EVALUATIONS).read_text().splitlines())
    # the grid's 15 mixtures are one batch: the part finished when it stopped was kept, and the 6th
    # stopped within its batches (Ctrl-C within a second), not after a whole evaluation
    assert logged == 5
    assert run_in_process("fit", recipe, "--quiet").returncode == 0
    whole = tmp_path / "whole"
    assert (
        run_in_process("fit", _recipe(random_world, tmp_path, whole, **sections), "--quiet").returncode == 0
    )
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


def test_a_fault_names_a_signal_a_point_and_a_number(monkeypatch):
    import os

    from mergeopt.errors import UserError
    from mergeopt.runtime import faults

    assert faults.parse("sigkill@step:3") == (signal.SIGKILL, "step", 3)
    assert faults.parse("sigint@train.beta:7") == (signal.SIGINT, "train.beta", 7)
    for bad in ("kill@step:3", "sigkill@step", "sigkill step:3", "sighup@step:1"):
        with pytest.raises(UserError, match=f"MERGEOPT_FAULT={bad!r} is not SIGNAL@POINT:N"):
            faults.parse(bad)
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))
    monkeypatch.delenv("MERGEOPT_FAULT", raising=False)
    faults.reached("step", 3)  # unset: nothing
    monkeypatch.setenv("MERGEOPT_FAULT", "sigterm@evaluation:2")
    for point, index in [("evaluation", 1), ("step", 2), ("evaluation", 3), ("evaluation", 2)]:
        faults.reached(point, index)
    assert sent == [(os.getpid(), signal.SIGTERM)]  # only at the named point, to this process


def _save_then_stop_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 takes a second to save the state; rank 1 has nothing to save. Each records when it left."""
    import time

    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted

    join_gloo(rank, port)
    try:
        torch.set_num_threads(1)
        saved = None
        if rank == 0:
            time.sleep(1.0)  # the save of gradient.pt on a slow filesystem
            saved = time.time()
        with pytest.raises(Interrupted):
            interrupts.stop_together("step 3")
        with open(f"{out}/{rank}.json", "w") as handle:
            json.dump([saved, time.time()], handle)
    finally:
        dist.destroy_process_group()


def test_no_rank_stops_before_rank_0_has_saved_the_state(tmp_path):
    """After the ranks agree to stop, rank 0 saves and the others leave: one that left at once ended
    the job under torchrun (its agent stops every rank when one exits), and rank 0, still saving,
    received that second signal mid-save and kept only the previous checkpoint."""

    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_save_then_stop_worker, args=(port, str(tmp_path)), nprocs=2)
    (saved, _), (_, left) = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert left >= saved


def _interrupt_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 alone receives SIGTERM between two checks; both ranks record what they agreed."""
    import os

    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted

    join_gloo(rank, port)
    try:
        torch.set_num_threads(1)
        with interrupts.interruptible():
            before = interrupts.check_interrupt_together()
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            after = interrupts.check_interrupt_together()
            with pytest.raises(Interrupted) as stop:
                interrupts.stop_together("step 3")
        with open(f"{out}/{rank}.json", "w") as handle:
            json.dump([before, after, int(stop.value.signum), stop.value.where], handle)
    finally:
        dist.destroy_process_group()


def test_a_signal_one_rank_received_stops_every_rank_at_the_same_step(tmp_path):
    """Between steps the gradient loop asks every rank whether any received a signal: a SIGTERM
    that reached rank 1 alone stops rank 0 at the same step too (each reading its own flag, rank 1
    stopped alone, and rank 0, which saves the state, saved nothing and waited for it; seen once
    in a suite run of tests/test_distributed.py's killed-agent test)."""

    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_interrupt_worker, args=(port, str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [[False, True, int(signal.SIGTERM), "step 3"]] * 2


def _evaluation_interrupt_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 alone has received SIGTERM when the ranks ask for a real evaluation, one mixture
    (SPSA's final iterate) and a batch; each evaluation is shared by the ranks (an all-reduce)."""
    import os

    import numpy as np
    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted
    from mergeopt.runtime import distributed
    from mergeopt.search.evaluator import Evaluator

    join_gloo(rank, port)
    try:
        torch.set_num_threads(1)

        def score(w):  # a dev set split over the ranks: the sums add up across them
            return {
                "loss": float(distributed.all_reduce_sum(torch.tensor([float(w[0])], dtype=torch.float64)))
            }

        seen = []
        with interrupts.interruptible():
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            for ask in ("scores", "prefetch"):
                evaluator = Evaluator(("a", "b"), score, lambda s: s["loss"])
                with pytest.raises(Interrupted) as stop:
                    if ask == "scores":
                        evaluator.scores(np.array([0.5, 0.5]), "spsa final")
                    else:
                        evaluator.prefetch([np.array([0.5, 0.5]), np.array([0.25, 0.75])], "grid")
                seen.append([int(stop.value.signum), stop.value.where, evaluator.evaluations])
        with open(f"{out}/{rank}.json", "w") as handle:
            json.dump(seen, handle)
    finally:
        dist.destroy_process_group()


def test_a_signal_one_rank_received_stops_every_rank_before_a_real_evaluation(tmp_path):
    """The zero-order strategies' evaluations under torchrun: a SIGTERM that reached rank 1 alone
    stops every rank before the next real evaluation (rank 1 stopped alone, and rank 0 went into
    the evaluation's all-reduce and waited for it until gloo's timeout)."""

    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_evaluation_interrupt_worker, args=(port, str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [[[int(signal.SIGTERM), "evaluation 1", 0]] * 2] * 2


def _fault_in_a_round_worker(rank: int, port: int, out: str) -> None:
    import os

    import numpy as np
    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted
    from mergeopt.search.evaluator import Evaluator

    join_gloo(rank, port)
    try:
        torch.set_num_threads(1)
        os.environ["MERGEOPT_FAULT"] = "sigterm@evaluation:2"
        evaluator = Evaluator(("a", "b"), lambda w: {"loss": float(w[0])}, lambda s: s["loss"])
        mixtures = [np.array([x, 1 - x]) for x in (0.1, 0.2, 0.3, 0.4)]
        with interrupts.interruptible(), pytest.raises(Interrupted) as stop:
            evaluator.prefetch(mixtures, "grid")
        with open(f"{out}/{rank}.json", "w") as handle:
            json.dump([int(stop.value.signum), stop.value.where, evaluator.evaluations], handle)
    finally:
        dist.destroy_process_group()


def test_a_fault_point_inside_a_round_of_evaluations_fires(tmp_path):
    """``MERGEOPT_FAULT=sigterm@evaluation:N`` under torchrun: the candidates are scored in rounds of
    one per rank, and only a round's first evaluation was a fault point, so with 2 ranks an even N
    (with 3, evaluation 5) never fired and a resume test passed without any interruption."""
    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_fault_in_a_round_worker, args=(port, str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [[int(signal.SIGTERM), "evaluation 2", 2]] * 2


@pytest.mark.parametrize("command", ["fit", "rank", "calibrate"])
def test_a_restart_refused_for_a_mistake_keeps_the_earlier_state(
    command, random_world, tmp_path, monkeypatch
):
    """``--restart`` replaces the earlier state only when the new run saves its own: a restart
    refused for a user's mistake found once the models are loading (a malformed dev set record for
    rank and calibrate, whose journal keeps hours of evaluations from round to round; one raised in
    the fit's search) exits 2 and leaves the earlier checkpoint as it was, so fixing the mistake
    and rerunning without --restart resumes it. It was removed."""
    from mergeopt.errors import UserError
    from mergeopt.runtime.resume import CALIBRATE_CHECKPOINT_DIR, RANK_CHECKPOINT_DIR

    out = tmp_path / "out"
    dev = dict(random_world["dev"])
    extra = []
    if command == "fit":
        import mergeopt.fit

        def refused(*_args, **_kwargs):
            raise UserError("a mistake found in the search")

        monkeypatch.setattr(mergeopt.fit, "_search_and_write", refused)
    else:
        broken = tmp_path / "arith.jsonl"
        broken.write_text(open(dev["arith"], encoding="utf-8").read() + "{not json\n", encoding="utf-8")
        dev["arith"] = str(broken)
        grid = pd.DataFrame(
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], columns=["w_alpha", "w_beta", "w_gamma"]
        )
        grid["loss_arith"], grid["loss_markov"] = [3.1, 2.9, 2.7], [3.3, 3.0, 3.2]
        grid.to_csv(tmp_path / "grid.csv", index=False)
        extra = ["--grid", str(tmp_path / "grid.csv"), "--out", str(out)]
    tree = recipe_tree(
        {**random_world, "dev": dev}, out, calibrate={"candidates": 5, "samples": 200, "batch": 2}
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    name = {"fit": CHECKPOINT_DIR, "rank": RANK_CHECKPOINT_DIR, "calibrate": CALIBRATE_CHECKPOINT_DIR}[
        command
    ]
    earlier = RunState(out, {"seed": 0}, name)
    earlier.start()
    earlier.append_evaluation({"w": [1.0, 0.0, 0.0], "loss": 3.0})
    before = {p.name: p.read_bytes() for p in earlier.dir.iterdir()}
    result = run_in_process(command, str(tmp_path / "recipe.yaml"), *extra, "--restart", "--quiet")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if command == "fit":
        assert "a mistake found in the search" in result.stderr
    else:
        assert str(broken) in result.stderr
    assert {p.name: p.read_bytes() for p in earlier.dir.iterdir()} == before


def test_a_state_copied_with_its_inputs_to_other_paths_is_resumed(tmp_path):
    """A fit, rank or calibrate state copied with its inputs to another disk, where the old paths
    are gone, was refused as another recipe's (model.base differs, rank.grid differs) with the
    advice to rerun with that recipe, impossible there, or --restart. An input at its new place
    with the same content, or a grid or directory of the same name whose old path is gone, is the
    same run; a moved input whose content changed is named, and a path still there is another."""
    import shutil

    from mergeopt.errors import UserError
    from mergeopt.runtime.fingerprint import fingerprints

    def state(root, base="base.txt"):
        tree = {
            "model": {"base": str(root / base)},
            "rank": {"grid": str(root / "runs" / "grid.csv")},
            "train": {"output_dir": str(root / "runs")},
        }
        return RunState(tmp_path / "out", tree, inputs=fingerprints([root / base]))

    old, new = tmp_path / "a", tmp_path / "b"
    (old / "runs").mkdir(parents=True)
    (old / "runs" / "grid.csv").write_text("w_a,loss\n")
    (old / "base.txt").write_text("base")
    (old / "other.txt").write_text("another base")
    state(old).start()
    shutil.copytree(old, new)
    with pytest.raises(UserError, match="another recipe"):  # the old paths are still there
        state(new).check_matches()
    shutil.rmtree(old)
    state(new).check_matches()
    with pytest.raises(UserError, match="read other data: .*other.txt changed since"):
        state(new, "other.txt").check_matches()  # moved and edited, or another file: refused alike
    (new / "base.txt").write_text("edited")
    with pytest.raises(UserError, match=f"read other data: {new / 'base.txt'} changed since"):
        state(new).check_matches()


def test_a_state_follows_a_world_cache_moved_with_it(tmp_path):
    """A built-in world's files are named ``tiny://...`` in the recipe, and the state records them
    where the cache held them: with the cache moved along ($MERGEOPT_CACHE on the new disk, the
    old one gone), the state was refused ('read other data: /old/cache/... changed since'). Inputs
    no recipe string names follow their content to this run's inputs; a world built again with
    other bits is still refused."""
    import shutil

    from mergeopt.errors import UserError
    from mergeopt.runtime.fingerprint import fingerprints

    tree = {"model": {"base": "tiny://base"}, "data": {"dev": [{"path": "tiny://dev/arith.jsonl"}]}}

    def state(cache):
        inputs = fingerprints([cache / "base", cache / "dev" / "arith.jsonl"])
        return RunState(tmp_path / "out", tree, inputs=inputs)

    old, new = tmp_path / "a" / "tiny-v1-seed0", tmp_path / "b" / "tiny-v1-seed0"
    (old / "base").mkdir(parents=True)
    (old / "base" / "config.json").write_text("{}")
    (old / "dev").mkdir()
    (old / "dev" / "arith.jsonl").write_text('{"text": "1+1=2"}\n')
    state(old).start()
    shutil.copytree(old, new)
    shutil.rmtree(old)
    state(new).check_matches()
    (new / "dev" / "arith.jsonl").write_text('{"text": "1+2=3"}\n')  # built again, other bits
    with pytest.raises(UserError, match=r"read other data: .*a/tiny-v1-seed0/dev/arith.jsonl"):
        state(new).check_matches()


def test_a_tracked_restart_refused_for_a_mistake_keeps_the_earlier_state(random_world, tmp_path, monkeypatch):
    """With a tracker (MLflow, W&B), the fit wrote the tracker's run id as the trackers opened,
    which started the new state and removed the earlier one before the run saved anything: a
    ``--restart`` refused for a mistake lost the earlier checkpoint all the same. The ids now wait
    for the first save, as they do with no tracker."""
    pytest.importorskip("mlflow")
    import mergeopt.fit
    from mergeopt.errors import UserError

    def refused(*_args, **_kwargs):
        raise UserError("a mistake found in the search")

    monkeypatch.setattr(mergeopt.fit, "_search_and_write", refused)
    out = tmp_path / "out"
    tree = recipe_tree(random_world, out)
    tree["logging"] = {"backends": ["mlflow"], "dir": str(tmp_path / "logs")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    earlier = RunState(out, {"seed": 0}, CHECKPOINT_DIR)
    earlier.start()
    earlier.append_evaluation({"w": [1.0, 0.0, 0.0], "loss": 3.0})
    before = {p.name: p.read_bytes() for p in earlier.dir.iterdir()}
    result = run_in_process("fit", str(tmp_path / "recipe.yaml"), "--restart", "--quiet")
    assert result.returncode == 2, result.stderr
    assert "a mistake found in the search" in result.stderr
    assert earlier.dir.is_dir() and {p.name: p.read_bytes() for p in earlier.dir.iterdir()} == before
