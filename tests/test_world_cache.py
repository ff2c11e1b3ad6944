"""The built-in worlds' cache (one builder at a time, an unfinished build never taken for a world) and
Ctrl-C inside the long calls of a build or a load (honoured at the signal, not when the call returns)."""

from __future__ import annotations

import threading

import pytest
import torch

from mergeopt import worlds


class _SlowWorld:
    """A world whose build waits until it is told to finish, and counts how often it ran."""

    WORLD_VERSION = 1
    builds = 0
    building = threading.Event()  # set while a build runs
    finish = threading.Event()  # the build returns once this is set

    @classmethod
    def build_into(cls, path, seed, log):
        cls.builds += 1
        cls.building.set()
        assert cls.finish.wait(timeout=60), "the second builder never said it was waiting"
        (path / "weights.txt").write_text(f"seed {seed}\n")
        return {}

    @classmethod
    def reset(cls, finished: bool) -> None:
        cls.builds = 0
        cls.building.clear()
        cls.finish.clear()
        if finished:
            cls.finish.set()


def test_two_builders_at_once_build_the_world_once(tmp_path, monkeypatch):
    """The second builder arrives while the first builds (no sleeps: the first build waits for the
    second's "waiting" line), waits on the lock, then finds the finished world."""
    _SlowWorld.reset(finished=False)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    results, messages = [], []

    def log(message: str) -> None:
        messages.append(message)
        if "another process is building it" in message:
            _SlowWorld.finish.set()  # the second is waiting: let the first finish

    def build():
        results.append(worlds.ensure("slow", str(tmp_path), seed=3, log=log))

    first = threading.Thread(target=build)
    first.start()
    assert _SlowWorld.building.wait(timeout=60)
    second = threading.Thread(target=build)
    second.start()
    for thread in (first, second):
        thread.join(timeout=120)
    assert _SlowWorld.builds == 1
    assert results[0] == results[1] == worlds.world_dir("slow", str(tmp_path), seed=3)
    assert (results[0] / "weights.txt").read_text() == "seed 3\n"
    assert any("another process is building it" in m for m in messages)
    assert sum("built in" in m for m in messages) == 1


def test_a_leftover_without_its_marker_is_built_again(tmp_path, monkeypatch):
    _SlowWorld.reset(finished=True)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    leftover = worlds.world_dir("slow", str(tmp_path), seed=0)
    leftover.mkdir(parents=True)
    (leftover / "weights.txt").write_text("half written")
    path = worlds.ensure("slow", str(tmp_path), seed=0, log=lambda _m: None)
    assert _SlowWorld.builds == 1
    assert (path / "weights.txt").read_text() == "seed 0\n"
    assert (path / worlds.MARKER).is_file()


def _build_slow_world(cache: str) -> None:
    worlds._registry = lambda: {"slow": _SlowWorld}  # in the forked child only
    _SlowWorld.reset(finished=False)
    worlds.ensure("slow", cache, seed=0, log=lambda _m: None)


def test_a_build_killed_with_kill_9_leaves_no_staging_directory_after_the_next(tmp_path, monkeypatch):
    """``kill -9`` of the process building a world (rank 0 of a torchrun job building the tiny world
    for every rank, the OOM killer) left its hidden ``.building-*.tmp`` directory in the cache, and
    every later build left it there, one more per kill. The next build of that world removes it; a
    build of another seed, under its own lock, is not touched."""
    import multiprocessing
    import os
    import signal
    import time

    child = multiprocessing.get_context("fork").Process(target=_build_slow_world, args=(str(tmp_path),))
    child.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".building-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert list(tmp_path.glob(".building-*")), "the killed build left nothing to clean"
    other_seed = tmp_path / ".building-slow-v1-seed1-abc123.tmp"  # another world's build, running
    other_seed.mkdir()
    _SlowWorld.reset(finished=True)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    path = worlds.ensure("slow", str(tmp_path), seed=0, log=lambda _m: None)
    assert (path / worlds.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.glob(".building-*")) == [other_seed.name]


def test_ctrl_c_during_a_world_build_stops_it_and_leaves_nothing(tmp_path):
    """SIGINT at step 2 of the tiny world's pretraining (the process signals itself there, through the
    real handler): the fit stops at that step, not after the build, exits 130 with one line saying
    nothing was saved, and leaves no world, no staging directory, no output directory, no checkpoint.
    A new interpreter, not a fork of this one: the build runs with BUILD_THREADS torch threads, and
    OpenMP hangs starting threads in a forked child of a process that ran it with several."""
    from tests.conftest import REPO, run_module

    cache, out = tmp_path / "cache", tmp_path / "out"
    result = run_module(
        "fit",
        str(REPO / "recipes" / "tiny.yaml"),
        f"output_dir={out}",
        f"world.cache_dir={cache}",
        "device=cpu",
        "--quiet",
        fault="sigint@world:2",
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "mergeopt: interrupted (SIGINT at the world build, step 2); nothing was saved yet. "
        "Rerun the same command to start again."
    )
    assert not out.exists()
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert [name for name in left if not name.endswith(".lock")] == [], left


def test_ctrl_c_while_waiting_for_another_builder_stops_the_wait(tmp_path, monkeypatch):
    """A SIGINT while this process waits for another's build (the flag interruptible() sets) ends
    the wait, instead of being held until the other build finishes; the other build is unharmed."""
    import os
    import signal

    import pytest

    from mergeopt.errors import Interrupted
    from mergeopt.runtime.interrupts import interruptible

    _SlowWorld.reset(finished=False)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    first = threading.Thread(target=lambda: worlds.ensure("slow", str(tmp_path), log=lambda _m: None))
    first.start()
    assert _SlowWorld.building.wait(timeout=60)

    def log(message: str) -> None:
        if "another process is building it" in message:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while waiting

    try:
        with pytest.raises(Interrupted, match="the wait for another process's slow world build"):
            with interruptible():
                worlds.ensure("slow", str(tmp_path), log=log)
        assert first.is_alive()  # still building: the wait did not outlast it
    finally:
        _SlowWorld.finish.set()
        first.join(timeout=60)
    assert (worlds.world_dir("slow", str(tmp_path)) / worlds.MARKER).is_file()


def test_ctrl_c_during_the_gguf_conversion_stops_it_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    """The SmolLM2 world's GGUF conversion is one library call of most of a minute with no loop of
    ours in it: a SIGINT inside it raises there (the fake conversion below signals itself, then
    would run on through 200 more steps), and the world's staging directory is removed."""

    import pytest
    import transformers

    from mergeopt.errors import Interrupted
    from mergeopt.runtime.interrupts import interruptible
    from mergeopt.worlds import smollm2

    ticks: list[int] = []
    converting = _ctrl_c_then_more_work(ticks)

    monkeypatch.setattr(smollm2, "gguf_location", lambda: (tmp_path, "model.gguf"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", converting)
    cache = tmp_path / "cache"
    with pytest.raises(Interrupted, match="converting the GGUF base"):
        with interruptible():
            worlds.ensure("smollm2", str(cache), log=lambda _m: None)
    assert len(ticks) <= 1  # raised at the signal, before the steps ran
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_ctrl_c_while_the_base_model_loads_stops_the_load(tmp_path, monkeypatch):
    """Loading a large base is one transformers call of minutes: inside a fit (interruptible) a
    SIGINT raises there, not after the load returns."""

    import pytest
    import transformers

    from mergeopt.config import recipe_from_dict
    from mergeopt.errors import Interrupted
    from mergeopt.loading import problem
    from mergeopt.runtime.interrupts import interruptible
    from tests.conftest import recipe_tree

    ticks: list[int] = []
    loading = _ctrl_c_then_more_work(ticks)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loading)
    experts = {n: str(tmp_path / n) for n in ("a", "b")}
    world = {"base": str(tmp_path), "experts": experts, "dev": {"a": str(tmp_path / "a.jsonl")}}
    recipe = recipe_from_dict(recipe_tree(world, tmp_path / "out"))
    with pytest.raises(Interrupted, match="loading the base model"), interruptible():
        problem._loaded_base(recipe, torch.float32, torch.device("cpu"), progress=False)
    assert len(ticks) <= 1


def _ctrl_c_then_more_work(ticks: list[int]):
    """A stand-in for a long library call: it sends this process SIGINT, then runs on through 200
    steps of Python (one tick each) unless the signal stops it. No clock: Python runs a signal's
    handler at the next bytecode after ``os.kill`` returns, so a handler that raises stops it there."""
    import os
    import signal

    def call(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200):
            ticks.append(1)
        raise AssertionError("the call ran to its end: the interrupt waited for it")

    return call


class _ThreadsWorld:
    """A world whose build records the torch threads it ran with."""

    WORLD_VERSION = 1
    seen: list[int] = []

    @classmethod
    def build_into(cls, path, seed, log):
        cls.seen.append(torch.get_num_threads())
        (path / "weights.txt").write_text(f"seed {seed}\n")
        return {}


def test_a_world_is_built_with_the_same_threads_whoever_builds_it(tmp_path, monkeypatch):
    """CPU kernels split reductions by thread, and a world's training amplifies the last bits: a
    one-thread test worker and a CLI run with every core must build the same world, so the build
    runs with BUILD_THREADS and the caller's count comes back after it."""
    monkeypatch.setattr(worlds, "_registry", lambda: {"threads": _ThreadsWorld})
    _ThreadsWorld.seen.clear()
    before = torch.get_num_threads()
    worlds.ensure("threads", str(tmp_path / "cache"), log=lambda _m: None)
    assert _ThreadsWorld.seen == [worlds.BUILD_THREADS] and torch.get_num_threads() == before
    marker = (worlds.world_dir("threads", str(tmp_path / "cache")) / worlds.MARKER).read_text()
    assert f'"threads": {worlds.BUILD_THREADS}' in marker


@pytest.mark.parametrize("refusal", ["EOPNOTSUPP", "ENOLCK", "ENOSYS", "NotImplementedError"])
def test_a_cache_and_a_store_where_files_cannot_be_locked_are_used_unguarded(
    tmp_path, monkeypatch, capsys, refusal
):
    """A world cache or an MLflow store on a filesystem without flock (Lustre mounted ``noflock``,
    some FUSE mounts): filelock raises the OSError (EOPNOTSUPP, ENOLCK), or NotImplementedError
    (filelock before 3.24, on ENOSYS), and the fit ended on that traceback. The world is built
    and the store opened without the lock, after one warning naming the directory and what a
    second process at the same time would do; a staging directory there may be another
    builder's and stays. flock is asked itself: filelock from 3.24 took ENOSYS for a soft lock
    (with a warning of its own), and before 3.21 took EOPNOTSUPP and ENOLCK for another process's
    lock and waited forever."""
    import errno
    import fcntl
    import os

    from filelock import FileLock

    from mergeopt.reporting.trackers import _store_lock

    if refusal == "NotImplementedError":

        def no_locks(_lock, *_args, **_kwargs):
            raise NotImplementedError("FileSystem does not appear to support flock")

        monkeypatch.setattr(FileLock, "acquire", no_locks)
        reason = "FileSystem does not appear to support flock"
    else:
        code = getattr(errno, refusal)

        def no_locks(_fd, _operation):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "flock", no_locks)
        reason = os.strerror(code)
    _SlowWorld.reset(finished=True)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    live = tmp_path / f".building-{worlds.world_dir('slow', str(tmp_path), seed=3).name}-x.tmp"
    live.mkdir()  # another builder's, which no lock says is dead
    built = worlds.ensure("slow", str(tmp_path), seed=3, log=lambda _m: None)
    assert (built / "weights.txt").read_text() == "seed 3\n" and live.is_dir()
    store = tmp_path / "logs" / "mlflow.db"
    store.parent.mkdir()
    with _store_lock(f"sqlite:///{store}") as locked:
        assert locked is False
    assert capsys.readouterr().err.splitlines() == [
        f"mergeopt: warning: {tmp_path}: its filesystem cannot lock files ({reason}): two processes "
        "building this world at once would both build it",
        f"mergeopt: warning: {store.parent}: its filesystem cannot lock files ({reason}): two fits "
        "creating this new store's tables at once would fail",
    ]


def test_an_unguarded_build_leaves_a_world_published_meanwhile(tmp_path, monkeypatch):
    """Without a lock (a filesystem that has none) another builder may publish the world between
    this one's look for it and its build: the build removed every existing target, the published
    world included, while a fit may already read it. A target with its marker stays; the build's
    own result is dropped at the rename."""
    _SlowWorld.reset(finished=True)
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    target = worlds.world_dir("slow", str(tmp_path), seed=3)
    target.mkdir()
    (target / "weights.txt").write_text("published by the other builder\n")
    (target / worlds.MARKER).write_text("{}\n")
    assert worlds._build("slow", target, 3, lambda _m: None, locked=False) == target
    assert (target / "weights.txt").read_text() == "published by the other builder\n"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging directory left


def test_a_store_lock_in_a_directory_not_made_yet(tmp_path):
    """An explicit ``sqlite:///`` tracking URI in a directory that does not exist yet: filelock
    made the directory, and mergeopt's own flock probe before it raised FileNotFoundError (a
    traceback); the directory is made, as before, and the lock held."""
    from mergeopt.reporting.trackers import _store_lock

    store = tmp_path / "new" / "logs" / "mlflow.db"
    with _store_lock(f"sqlite:///{store}") as locked:
        assert locked is True and store.parent.is_dir()
