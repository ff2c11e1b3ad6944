"""Built-in worlds, named in recipes by paths like ``tiny://base`` or ``smollm2://dev/code.jsonl``.

A world is a base checkpoint, training and dev data (and, for the tiny world, experts) made on this
machine from nothing but installed packages. It is built on first use into a staging directory,
renamed into the cache (``world.cache_dir``, else ``$MERGEOPT_CACHE``, else ``~/.cache/mergeopt``)
and marked finished by its ``world.json``, so an interrupted build is never mistaken for a world.
Concurrent builders of one world (two fits started together, test workers, torchrun ranks on one
machine) take a file lock beside it, so the world is built once and the others wait for it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mergeopt.config import Recipe, recipe_from_dict
from mergeopt.inputs import writable_dir
from mergeopt.runtime import file_locks
from mergeopt.runtime.files import make_staging_dir

MARKER = "world.json"
# torch threads a world is built with, whatever the caller's: CPU kernels split their reductions by
# thread, so a world built with the machine's core count (a CLI run) and one built in a one-thread
# test worker differed in the last bits, and its training amplifies them (tiny world: dev losses
# 0.01-0.4 apart on one CPU). The worlds the committed tables were trained on were built with 2.
BUILD_THREADS = 2


def _registry() -> dict[str, Any]:  # name -> module (or class) with WORLD_VERSION and build_into
    from mergeopt.worlds import smollm2, toy

    return {"tiny": toy, "tiny-large": toy.LargeWorld, "smollm2": smollm2}


def scheme_of(path: str) -> str | None:
    name, sep, _ = path.partition("://")
    return name if sep and name in _registry() else None


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("MERGEOPT_CACHE") or Path.home() / ".cache" / "mergeopt"
    return Path(root).expanduser()


def cache_source(cache_dir: str | None) -> str:
    """Where the cache's place was set, as the user would look for it."""
    if cache_dir:
        return "world.cache_dir"
    return "MERGEOPT_CACHE" if os.environ.get("MERGEOPT_CACHE") else "the world cache"


def world_dir(name: str, cache_dir: str | None = None, seed: int = 0) -> Path:
    return cache_root(cache_dir) / f"{name}-v{_registry()[name].WORLD_VERSION}-seed{seed}"


def ensure(
    name: str, cache_dir: str | None = None, seed: int = 0, log: Callable[[str], None] = print
) -> Path:
    """The cached world, built first if missing."""
    target = world_dir(name, cache_dir, seed)
    if (target / MARKER).is_file():
        return target
    writable_dir(target.parent, cache_source(cache_dir))  # a file or a read-only place: one line
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    unguarded = "two processes building this world at once would both build it"
    try:
        locked = file_locks.acquire(lock, 0, target.parent, unguarded)
    except Timeout:
        log(f"{name} world: another process is building it at {target}; waiting for it")
        _wait_for(lock, name)
        locked = True
    try:
        if (target / MARKER).is_file():  # another process built it while this one waited
            return target
        return _build(name, target, seed, log, locked)
    finally:
        if locked:
            lock.release()


def _wait_for(lock: FileLock, name: str) -> None:
    """Acquire ``lock``, checking for Ctrl-C twice a second: a blocking acquire would hold a SIGINT
    (a flag inside :func:`~mergeopt.runtime.interrupts.interruptible`) until the other build finished."""
    from mergeopt.runtime.interrupts import check_interrupt

    while True:
        check_interrupt(f"the wait for another process's {name} world build")
        try:
            lock.acquire(timeout=0.5)
            return
        except Timeout:
            continue


def _build(name: str, target: Path, seed: int, log: Callable[[str], None], locked: bool = True) -> Path:
    # a leftover without its marker is not a world; one with it was published by another builder
    # after this one looked (possible only unguarded, on a filesystem without locks) and stays
    if target.exists() and not (target / MARKER).is_file():
        shutil.rmtree(target)
    start = time.perf_counter()
    # a build killed with kill -9 (one of torchrun's ranks, the OOM killer) left its staging
    # directory; this process holds the world's lock, so no such directory of it is a live build
    # (one of another seed or version is another world's, under its own lock, and stays). Without
    # a lock (a filesystem that has none) another builder's may be live: they stay
    for leftover in target.parent.glob(f".building-{target.name}-*.tmp") if locked else ():
        shutil.rmtree(leftover, ignore_errors=True)
    staging = make_staging_dir(target.parent, f".building-{target.name}-")
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(BUILD_THREADS)
        try:
            meta = _registry()[name].build_into(staging, seed, log)
        finally:
            torch.set_num_threads(threads)
        meta.update(
            world=name,
            version=_registry()[name].WORLD_VERSION,
            seed=seed,
            threads=BUILD_THREADS,
            build_seconds=round(time.perf_counter() - start, 1),
        )
        (staging / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its world is identical
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{name} world: built in {time.perf_counter() - start:.0f} s at {target}")
    return target


def resolve_recipe(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[Recipe, dict[str, Path]]:
    """Replace every world path (base, experts, dev and training data) by its place in the cache."""
    tree = recipe.model_dump(exclude_unset=True)  # what the user left at a default stays so
    roots: dict[str, Path] = {}

    def resolve(path: str) -> str:
        name = scheme_of(path)
        if name is None:
            return path
        if name not in roots:
            roots[name] = ensure(name, recipe.world.cache_dir, recipe.world.seed, log)
        return str(roots[name] / path.partition("://")[2])

    tree["model"]["base"] = resolve(tree["model"]["base"])
    tree["model"]["experts"] = {k: resolve(v) for k, v in tree["model"]["experts"].items()}
    for dev in tree["data"]["dev"]:
        dev["path"] = resolve(dev["path"])
    if tree.get("train"):
        tree["train"]["data"] = {k: resolve(v) for k, v in tree["train"]["data"].items()}
    if not roots:
        return recipe, roots
    return recipe_from_dict(tree), roots
