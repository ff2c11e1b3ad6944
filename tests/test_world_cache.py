"""The built-in worlds' cache: one builder at a time, an unfinished build never taken for a world."""

from __future__ import annotations

import threading
import time

from mergeopt import worlds


class _SlowWorld:
    """A world whose build takes a moment and counts how often it ran."""

    WORLD_VERSION = 1
    builds = 0

    @classmethod
    def build_into(cls, path, seed, log):
        cls.builds += 1
        time.sleep(0.5)
        (path / "weights.txt").write_text(f"seed {seed}\n")
        return {}


def test_two_builders_at_once_build_the_world_once(tmp_path, monkeypatch):
    _SlowWorld.builds = 0
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    results, messages = [], []

    def build():
        results.append(worlds.ensure("slow", str(tmp_path), seed=3, log=messages.append))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the second starts while the first holds the lock
    for thread in threads:
        thread.join()
    assert _SlowWorld.builds == 1
    assert results[0] == results[1] == worlds.world_dir("slow", str(tmp_path), seed=3)
    assert (results[0] / "weights.txt").read_text() == "seed 3\n"
    assert any("another process is building it" in m for m in messages)
    assert sum("built in" in m for m in messages) == 1


def test_a_leftover_without_its_marker_is_built_again(tmp_path, monkeypatch):
    _SlowWorld.builds = 0
    monkeypatch.setattr(worlds, "_registry", lambda: {"slow": _SlowWorld})
    leftover = worlds.world_dir("slow", str(tmp_path), seed=0)
    leftover.mkdir(parents=True)
    (leftover / "weights.txt").write_text("half written")
    path = worlds.ensure("slow", str(tmp_path), seed=0, log=lambda _m: None)
    assert _SlowWorld.builds == 1
    assert (path / "weights.txt").read_text() == "seed 0\n"
    assert (path / worlds.MARKER).is_file()
