"""torchrun with 2 CPU processes (gloo) ends with the mixture one process finds.

Each rank scores half of every batch and the ranks add up token-loss sums, counts and the K-vector
gradient, so the run must match a single-process run up to float summation order (≤ 1e-6 on w).

The ranks of the comparisons are forked with torchrun's environment (tests.conftest.run_ranks: a
new interpreter per rank spends most of a small fit's time on imports); what is torchrun's own part
(its agent after a rank fails or is killed, a resume under it, the c10d rendezvous of two agents)
runs under the real ``torch.distributed.run``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeopt.runtime import interrupts
from tests.conftest import REPO, free_port, join_gloo, recipe_tree, repo_pythonpath, run_in_process, run_ranks


def _torchrun(recipe_path, *overrides, processes: int = 2, fault: str | None = None):
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    env.pop("MERGEOPT_FAULT", None)
    if fault is not None:  # every rank signals itself at that point (mergeopt.runtime.faults)
        env["MERGEOPT_FAULT"] = fault
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


SEARCHES = {
    "gradient": {},
    "grid": {"strategy": "grid", "grid": {"divisions": 2}},
    "cmaes": {"strategy": "cmaes", "budget": 14},
    "spsa": {"strategy": "spsa", "budget": 12},
    "surrogate": {"strategy": "surrogate", "surrogate": {"seeds": 10, "verify": 3, "candidates": 2000}},
}


@pytest.fixture(scope="module")
def single_runs(random_world, tmp_path_factory):
    """One single-process fit per search strategy (made on first use), the reference of every
    torchrun job of this module; run in the test's process (tests.conftest.run_in_process)."""
    made = {}

    def run(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(f"single-{name}")
            tree = recipe_tree(
                random_world, root / "one", **({"search": SEARCHES[name]} if SEARCHES[name] else {})
            )
            path = root / "recipe.yaml"
            path.write_text(yaml.safe_dump(tree))
            single = run_in_process("fit", str(path), "--quiet")
            assert single.returncode == 0, single.stderr
            made[name] = (path, root / "one")
        return made[name]

    return run


@pytest.mark.parametrize("name", ["gradient", "grid", "cmaes", "spsa", "surrogate"])
def test_two_processes_find_the_mixture_one_process_finds(single_runs, tmp_path, name):
    path, one_dir = single_runs(name)
    search = SEARCHES[name]
    double = run_ranks("fit", str(path), f"output_dir={tmp_path / 'two'}", "--quiet", processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((one_dir / "mixture.json").read_text())
    two = json.loads((tmp_path / "two" / "mixture.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for expert, w in one["weights"].items():
        assert two["weights"][expert] == pytest.approx(w, abs=1e-6)
    assert two["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-6)
    assert two["heldout_loss"] == pytest.approx(one["heldout_loss"], rel=1e-6)
    if search:  # zero-order: the same evaluation log, its candidates split between the ranks
        assert (tmp_path / "two" / "evaluations.csv").is_file()
        log_one = pd.read_csv(one_dir / "evaluations.csv").drop(columns="seconds")
        log_two = pd.read_csv(tmp_path / "two" / "evaluations.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(log_one, log_two, rtol=1e-6)
        per_process = two["search"]["evaluations_per_process"]
        assert one["search"]["evaluations_per_process"] == [one["search"]["evaluations"]]
        # each evaluation scored whole by one rank (SPSA's final iterate, scored alone, was split
        # over the ranks' data, moved in its last bits and was counted once per rank)
        assert sum(per_process) == two["search"]["evaluations"] and min(per_process) >= 1
        assert max(per_process) - min(per_process) <= two["search"]["evaluations"] // 2
    # one summary, printed by rank 0 only
    assert double.stdout.count("Recommended mixture") == 1


SHARDED = ("model.shard=fsdp", "optim.checkpoint_every=2")  # a checkpoint at step 2 for the kill test


@pytest.fixture(scope="module")
def sharded_runs(single_runs, tmp_path_factory):
    """torchrun fits with model.shard=fsdp of the single_runs recipes (made on first use): what the
    sharded tests compare with one process, and the uninterrupted run a killed one must resume to."""
    made = {}

    def run(name: str, processes: int):
        if (name, processes) not in made:
            path, _ = single_runs(name)
            out = tmp_path_factory.mktemp(f"sharded-{name}-{processes}") / "sharded"
            job = run_ranks("fit", str(path), f"output_dir={out}", *SHARDED, "--quiet", processes=processes)
            made[name, processes] = job, out
        return made[name, processes]

    return run


@pytest.mark.parametrize(
    "search, processes",
    # 4 ranks: blocks of rows that 4 does not divide; the zero-order path is the same for any count
    [("gradient", 2), ("gradient", 4), ("grid", 2)],
)
def test_a_sharded_stack_finds_the_mixture_one_process_finds(single_runs, sharded_runs, search, processes):
    """model.shard=fsdp: each rank holds a block of rows of every matrix, the ranks gather each
    merged weight and score every batch (and, for grid search, every candidate) together."""
    _, one_dir = single_runs(search)
    sharded, out = sharded_runs(search, processes)
    search = SEARCHES[search]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((one_dir / "mixture.json").read_text())
    many = json.loads((out / "mixture.json").read_text())
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
        log_one = pd.read_csv(one_dir / "evaluations.csv").drop(columns="seconds")
        log_many = pd.read_csv(out / "evaluations.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(
            log_one.drop(columns="process", errors="ignore"),
            log_many.drop(columns="process", errors="ignore"),
            rtol=1e-6,
        )


def test_a_sharded_fit_killed_under_torchrun_resumes_to_the_same_mixture(single_runs, sharded_runs, tmp_path):
    """Every rank killed with SIGKILL at step 3 (``MERGEOPT_FAULT``, after step 2's checkpoint);
    the same command again resumes from it and writes the mixture.json of an uninterrupted sharded
    run. The kill is torchrun's (its agent sees the ranks die); the resumed runs are only what the
    ranks compute, so their ranks are forked (run_ranks), as the uninterrupted run's are."""
    from mergeopt.runtime.resume import RunState

    path, _ = single_runs("gradient")
    whole, whole_dir = sharded_runs("gradient", 2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    killed = _torchrun(path, f"output_dir={out}", *SHARDED, fault="sigkill@step:3")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "mixture.json").exists()
    assert RunState(out, {}).load_gradient()["next_step"] == 2
    shutil.copytree(out, tmp_path / "requeued")  # the same checkpoint, for a job requeued on 4 GPUs
    # --resume: an error without a checkpoint
    resumed = run_ranks("fit", str(path), f"output_dir={out}", *SHARDED, "--resume", "--quiet", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "mixture.json").read_bytes() == (whole_dir / "mixture.json").read_bytes()
    # resumed by 4 ranks: each batch split and summed in another order, the numbers move in their
    # last bits (docs/guides/resume.md says how far; its line, tests/test_resume.py)
    requeued = tmp_path / "requeued"
    four = run_ranks("fit", str(path), f"output_dir={requeued}", *SHARDED, "--resume", "--quiet", processes=4)
    assert four.returncode == 0, four.stderr[-3000:]
    whole_w = json.loads((whole_dir / "mixture.json").read_text())["weights"]
    four_w = json.loads((requeued / "mixture.json").read_text())["weights"]
    assert max(abs(four_w[n] - w) for n, w in whole_w.items()) < 1e-7


def _children(parent: int) -> dict[int, str]:
    """The processes whose parent is ``parent``, each with its state letter (/proc/PID/stat)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended while the directory was read
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]  # the name in parentheses may hold spaces
            if int(ppid) == parent:
                found[int(entry.name)] = state
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it, or never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_ranks_whose_torchrun_agent_is_killed_save_their_state_and_resume(single_runs, tmp_path):
    """``kill -9`` of torchrun's agent alone. Each rank asked the kernel for SIGTERM when its parent
    dies (mergeopt.runtime.launcher), so it stops as if torchrun had passed SIGTERM on: it saves its
    state and exits, instead of running on to the end with no console; the same command resumes it.
    The ranks stop themselves at step 3 (``sigstop@step:3``), so the agent dies at a known step."""
    import signal
    import time

    from mergeopt.runtime.resume import RunState

    path, one_dir = single_runs("gradient")
    out = tmp_path / "orphaned"
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    env["MERGEOPT_FAULT"] = "sigstop@step:3"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "mergeopt.fit", str(path), f"output_dir={out}", "--quiet"]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        agent = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=REPO, env=env)
    ranks: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while agent.poll() is None and time.monotonic() < deadline:
            ranks = _children(agent.pid)
            if len(ranks) == 2 and set(ranks.values()) == {"T"}:
                break
            time.sleep(0.2)
        assert set(ranks.values()) == {"T"} and len(ranks) == 2, (tmp_path / "stderr").read_text()[-3000:]
        agent.kill()  # kill -9 of the agent alone
        agent.wait()
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        while any(map(_running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        agent.kill()
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    console = (tmp_path / "stderr").read_text()
    assert not any(map(_running, ranks)), console[-3000:]
    assert "interrupted (SIGTERM at step" in console, console[-3000:]
    assert not (out / "mixture.json").exists()
    assert RunState(out, {}).load_gradient()["next_step"] >= 3
    resumed = _torchrun(path, f"output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = json.loads((one_dir / "mixture.json").read_text())
    two = json.loads((out / "mixture.json").read_text())
    for expert, w in one["weights"].items():
        assert two["weights"][expert] == pytest.approx(w, abs=1e-6)
    assert two["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-6)


LM_EVAL_TASKS = ("mergeopt_arith_ppl", "mergeopt_arith_gen")


def _lm_eval_terms(dev: str, tasks: Path) -> list[dict]:
    """A loglikelihood task's perplexity and a generation task's exact match over ``dev`` (local
    lm-eval tasks written into ``tasks``)."""
    from tests.conftest import lm_eval_generation_yaml, lm_eval_task_yaml

    tasks.mkdir()
    (tasks / "ppl.yaml").write_text(lm_eval_task_yaml(LM_EVAL_TASKS[0], {"validation": dev}, "perplexity"))
    (tasks / "gen.yaml").write_text(lm_eval_generation_yaml(LM_EVAL_TASKS[1], dev, max_gen_toks=3))
    common = {"kind": "lm_eval", "include_path": str(tasks), "limit": 8}
    return [
        {**common, "task": LM_EVAL_TASKS[0], "metric": "perplexity", "higher_is_better": False},
        {**common, "task": LM_EVAL_TASKS[1], "metric": "exact_match"},
    ]


def test_a_sharded_stack_scores_metric_terms_as_one_process_does(random_world, tmp_path):
    """Generation (exact match), a user's metric function and lm-eval-harness tasks under
    model.shard=fsdp: every rank runs each forward pass of every record (generate's synced_gpus
    keeps them in step; lm-eval, handed the model as one process's, runs its whole task on every
    rank), and the grid's scores equal a single process's."""
    terms = [
        {"kind": "exact_match", "dev": "arith", "max_new_tokens": 4},
        {
            "kind": "custom",
            "dev": "arith",
            "name": "nll",
            "function": "tests.test_grid_metrics:completion_nll",
            "higher_is_better": False,
        },
    ]
    if importlib.util.find_spec("lm_eval") is not None:  # the [lm-eval] extra, in '.[dev]'
        terms += _lm_eval_terms(random_world["dev"]["arith"], tmp_path / "tasks")
    search = {"strategy": "grid", "grid": {"divisions": 2}}
    tree = recipe_tree(random_world, tmp_path / "one", search=search, objective={"terms": terms})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    single = run_in_process("fit", str(path), "--quiet")
    assert single.returncode == 0, single.stderr
    sharded = run_ranks(
        "fit", str(path), f"output_dir={tmp_path / 'sharded'}", "model.shard=fsdp", "--quiet", processes=2
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    many = json.loads((tmp_path / "sharded" / "mixture.json").read_text())
    assert (many["shard"], many["search"]["scoring"]) == ("fsdp", "together")
    log_one = pd.read_csv(tmp_path / "one" / "evaluations.csv").drop(
        columns=["seconds", "process"], errors="ignore"
    )
    log_many = pd.read_csv(tmp_path / "sharded" / "evaluations.csv").drop(
        columns=["seconds", "process"], errors="ignore"
    )
    moving = ["nll"] + [f"lm_eval:{LM_EVAL_TASKS[0]}"] * (len(terms) > 2)
    assert {"exact_match:arith", *moving} <= set(log_one.columns)
    for column in moving:  # the metric moves with w: a real comparison
        assert log_one[column].nunique() == len(log_one), column
    pd.testing.assert_frame_equal(log_one, log_many, rtol=1e-6)


def test_a_sharded_run_whose_micro_batch_does_not_split_is_refused_in_one_line(random_world, tmp_path):
    """Under torchrun, before anything is loaded: the ranks refuse with the same one line, the job
    fails, and nothing is written."""
    tree = recipe_tree(random_world, tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    job = _torchrun(path, "model.shard=fsdp", processes=3)  # 4 × 2 dev sets = 8 examples over 3 ranks
    assert job.returncode != 0
    lines = job.stderr.splitlines()
    said = [line for line in lines if "mergeopt: error" in line]
    # each rank that got to speak said the same whole line; torchrun's agent sends SIGTERM to the
    # others once the first exits, so how many ranks speak is a race, but their lines never run
    # into each other (each is one write, newline included: CI once caught two ranks on one line)
    assert said, job.stderr[:3000]
    assert all(line == said[0] for line in said), job.stderr[:3000]
    assert said[0].startswith("mergeopt: error: model.shard fsdp over 3 ranks: a micro-batch of 8"), said[0]
    assert said[0].endswith("or a world size that divides 8"), said[0]
    # torchrun's agent prints its own ChildFailedError summary; no rank raised a traceback of ours
    assert not any(str(REPO / "mergeopt") in line for line in lines), job.stderr[:3000]
    assert not (tmp_path / "out").exists()


def test_two_torchrun_agents_joined_by_c10d_rendezvous_fit_as_one_process(single_runs, tmp_path):
    """The multi-node command, with both "nodes" on this machine: two torchrun agents (one rank
    each) meet at a c10d rendezvous endpoint, shard the stack between them and end with the single
    process's mixture."""
    path, one_dir = single_runs("gradient")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    command += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mergeopt-test"]
    command += [
        "-m",
        "mergeopt.fit",
        str(path),
        f"output_dir={tmp_path / 'nodes'}",
        "model.shard=fsdp",
        "--quiet",
    ]
    nodes = [
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    one = json.loads((one_dir / "mixture.json").read_text())
    many = json.loads((tmp_path / "nodes" / "mixture.json").read_text())
    assert (many["processes"], many["shard"]) == (2, "fsdp")
    for name, w in one["weights"].items():
        assert many["weights"][name] == pytest.approx(w, abs=1e-6)


def test_an_explicit_gpu_index_under_torchrun_is_refused_in_one_line(monkeypatch):
    """device=cuda:1 under torchrun would put every rank on GPU 1; device=cuda gives each rank the
    GPU of its LOCAL_RANK (checked without a GPU: only the device's name is looked at)."""
    import torch

    from mergeopt.errors import UserError
    from mergeopt.runtime.distributed import local_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="device cuda:1 under torchrun would put every rank on that one GPU"):
        local_device(torch.device("cuda", 1))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # one process: as asked


def test_forked_ranks_report_a_failing_command_as_torchrun_would(tmp_path):
    """tests.conftest.run_ranks, the launcher of this module's comparisons: a command every rank
    refuses comes back with its exit code and the one line of each rank that got to say it (as
    torchrun's agent does, the first rank to fail ends the others, so a slower rank may be ended
    first), and nothing is written."""
    job = run_ranks("fit", str(tmp_path / "missing.yaml"), f"output_dir={tmp_path / 'out'}", processes=2)
    assert job.returncode == 2
    said = [line for line in job.stderr.splitlines() if line.startswith("mergeopt: error")]
    assert 1 <= len(said) <= 2 and len(set(said)) == 1 and "missing.yaml" in said[0], job.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["fit", "rank", "calibrate"])
def test_every_rank_says_that_the_output_directory_is_in_use_and_exits(random_world, tmp_path, verb):
    """Another process holds the output directory (a fit still running, or the orphaned ranks of a
    torchrun killed with -9). Rank 0 takes the lock and is refused; every other rank must hear it,
    say the same line and exit 2 by itself. The others used to wait in their first collective
    until torchrun's agent killed them (after 30 s) or, under a launcher that does not kill, the
    backend's timeout (30 minutes for gloo)."""
    from mergeopt.runtime.rundir import _acquire, _lock_path

    out = tmp_path / "out"
    tree = recipe_tree(random_world, out)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    if verb in ("rank", "calibrate"):
        grid = tmp_path / "grid.csv"
        pd.DataFrame(
            [
                {**dict.fromkeys(tree["model"]["experts"], 0.0), name: 1.0, "loss": 1.0}
                for name in tree["model"]["experts"]
            ]
        ).to_csv(grid, index=False)
        args = (verb, str(path), "--grid", str(grid), "--out", str(out), "--quiet")
    else:
        args = ("fit", str(path), "--quiet")
    out.mkdir()
    lock = _lock_path(out)
    held = _acquire(lock, lambda err: pytest.fail(f"no flock here: {err}"))
    try:
        os.write(held, f"{os.getpid()} fit\n".encode())
        job = run_ranks(*args, processes=2, each_exits_within=120)
    finally:
        lock.unlink()
        os.close(held)
    said = [line for line in job.stderr.splitlines() if line.startswith("mergeopt: error")]
    expected = f"mergeopt: error: {out} is in use by mergeopt fit (pid {os.getpid()}): wait for it to end"
    assert job.returncode == 2 and len(said) == 2 and all(line.startswith(expected) for line in said), (
        job.stderr
    )
    assert list(out.iterdir()) == []


def _one_process_group(init, backend: str = "gloo") -> None:
    """A real gloo group of one process (an in-memory store), standing in for torchrun's rendezvous;
    ``init``: torch's own ``init_process_group``."""
    import torch.distributed as dist

    init(backend, store=dist.HashStore(), rank=0, world_size=1)


def _torchrun_env(monkeypatch) -> None:
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)


def test_a_verb_that_joined_the_process_group_ends_it_and_leaves_the_callers_alone(monkeypatch):
    """The group init_from_env created is destroyed when the verb returns (torch asks for it before
    exit; one left to the interpreter's exit aborted a rank of a two-node run), through the CLI's
    run_command; a group the caller made itself (an in-process caller, a test) stays."""
    import torch
    import torch.distributed as dist

    from mergeopt import cli
    from mergeopt.runtime import distributed

    joined = []

    def verb(_args):
        distributed.init_from_env(torch.device("cpu"))
        joined.append(dist.is_initialized())
        return 0

    _torchrun_env(monkeypatch)
    init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend: _one_process_group(init, backend))
    monkeypatch.setitem(cli.HANDLERS, "plan", f"{__name__}:_verb")
    monkeypatch.setitem(globals(), "_verb", verb)
    try:
        assert cli.run_command("plan", ["recipe.yaml"]) == 0
        assert joined == [True] and not dist.is_initialized()  # joined, then ended
        _one_process_group(init)  # the caller's own group
        assert cli.run_command("plan", ["recipe.yaml"]) == 0
        assert joined == [True, True] and dist.is_initialized()  # kept: init_from_env did not make it
        distributed.leave()
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _signal_during_evaluation_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 receives SIGTERM halfway through its share of a batch of evaluations (each rank scores
    one mixture alone), where the dev-set loop checks the flag between batches."""
    import signal

    import numpy as np
    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted
    from mergeopt.search.evaluator import Evaluator

    join_gloo(rank, port)
    try:
        torch.set_num_threads(1)

        def score(w):
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            interrupts.check_interrupt_alone("an evaluation")  # what objectives.loss.evaluate does per batch
            return {"loss": float(w[0])}

        evaluator = Evaluator(("a", "b"), score, lambda s: s["loss"])
        with interrupts.interruptible(), pytest.raises(Interrupted) as stop:
            evaluator.prefetch([np.array([0.5, 0.5]), np.array([0.25, 0.75])], "grid")
        Path(out, f"{rank}.json").write_text(
            json.dumps([int(stop.value.signum), stop.value.where, evaluator.evaluations])
        )
    finally:
        dist.destroy_process_group()


def test_a_signal_during_a_ranks_own_evaluation_stops_every_rank_cleanly(tmp_path):
    """Under torchrun each rank scores its mixture of a batch alone (distributed.this_rank_only), where
    the world looked like one process: a SIGTERM then stopped that rank's evaluation halfway, and
    the batch re-raised it on every rank as a RuntimeError (a traceback, exit 1, the hint lost).
    The rank finishes its evaluation; the ranks agree after the round and all stop, interrupted."""
    import signal

    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_signal_during_evaluation_worker, args=(port, str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [[int(signal.SIGTERM), "evaluation 2", 2]] * 2


def _signal_during_closing_evaluations_worker(rank: int, port: int, out: str, closing: str) -> None:
    """Rank 1 receives SIGTERM during the first closing evaluation (the fitted mixture's), where
    the dev-set loop does not check the flag under torchrun; each evaluation is a collective.
    ``closing``: mixture.json's losses (every fit) or a zero-order search's report scores."""
    import signal
    from types import SimpleNamespace

    import numpy as np
    import torch
    import torch.distributed as dist

    from mergeopt.errors import Interrupted
    from mergeopt.reporting import mixture_record
    from mergeopt.search import zero_order
    from mergeopt.search.evaluator import Evaluator

    join_gloo(rank, port)
    made = []

    def losses(_problem, weights, _batch_size):
        if rank == 1 and not made:
            os.kill(os.getpid(), signal.SIGTERM)
        dist.all_reduce(torch.zeros(1))  # as evaluate_sums's sums over the ranks
        made.append(weights.tolist())
        return {"dev": 1.0, "per_set": {}, "heldout": None}

    def scorer(_problem, _objective, _part):
        return lambda w: losses(None, torch.as_tensor(w), 8)

    try:
        problem = SimpleNamespace(stack=SimpleNamespace(expert_names=("a", "b")), sets=[])
        if closing == "gradient":  # the fitted, uniform and single-expert losses of every fit
            mixture_record._losses = losses
            with interrupts.interruptible(), pytest.raises(Interrupted) as stop:
                mixture_record._closing_losses(problem, torch.tensor([0.5, 0.5]), 8)
        else:  # a zero-order search's term scores of the same mixtures (lm-eval tasks among them)
            zero_order.make_scorer, zero_order.has_heldout = scorer, lambda _sets: False
            evaluator = Evaluator(("a", "b"), lambda w: {}, lambda s: 0.0)
            with interrupts.interruptible(), pytest.raises(Interrupted) as stop:
                zero_order.report_scores(problem, None, evaluator, np.array([0.5, 0.5]))
        seen = [int(stop.value.signum), stop.value.where, len(made)]
        Path(out, f"{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("closing", ["gradient", "zero-order"])
def test_a_signal_during_the_closing_evaluations_stops_every_rank(tmp_path, closing):
    """A SIGTERM (or torchrun passing on Ctrl-C) while the ranks make the closing evaluations (the
    fitted mixture, the uniform one, each expert alone; a zero-order search's term scores of them
    first) was ignored: the dev-set loop checks the
    flag only in a single process, so the fit ran on to the end (or, on a large model, until
    torchrun's agent killed the ranks, with no line said). The ranks agree before each closing
    evaluation and all stop, as a single process does."""
    import signal

    from tests.conftest import fork_ranks

    port = free_port()
    fork_ranks(_signal_during_closing_evaluations_worker, args=(port, str(tmp_path), closing), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [
        [int(signal.SIGTERM), "the closing evaluation of the uniform mixture", 1],
        [int(signal.SIGTERM), "the closing evaluation of the uniform mixture", 1],
    ]


def test_a_warning_is_rank_0_s_under_torchrun(monkeypatch, capsys):
    """Every rank reads the same recipe and inputs, so a warning (a precision mismatch, records
    data.max_length leaves out) was printed once per rank: eight times on eight GPUs. Rank 0 says it;
    outside torchrun (no RANK) it is said as before."""
    from mergeopt.errors import warn

    line = "mergeopt: warning: records left out\n"
    for rank, said in (("1", ""), ("3", ""), ("0", line), (None, line)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        warn("records   left out")
        assert capsys.readouterr().err == said, rank
