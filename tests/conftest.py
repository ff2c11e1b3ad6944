"""Shared fixtures: small random checkpoints (seconds) and the real tiny world (built once per session)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mergeopt import worlds
from mergeopt.worlds import toy

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(min(2, os.cpu_count() or 1))

EXPERTS = ("alpha", "beta", "gamma")


def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(
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
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_checkpoint(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    toy.build_tokenizer().save_pretrained(path)
    return path


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    """A copy of ``model`` with seeded noise on every parameter: an 'expert' without training."""
    expert = LlamaForCausalLM(model.config)
    expert.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return expert.eval()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


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
    function of its version and seed, so the tests read that one rather than spend minutes building
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
    return _world("smollm2", tmp_path_factory)


REPO = Path(__file__).parent.parent


def run_module(module: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``python -m mergeopt.<module> ARGS`` from the repository root, as a user would run it.

    ``fault`` (e.g. ``"sigkill@step:3"``) makes the run signal itself at that point
    (:mod:`mergeopt.runtime.faults`), so a test interrupts it at a named moment, not after a sleep.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("MERGEOPT_FAULT", None)
    # the child computes with this process's thread count, so its numbers are bit for bit those of
    # run_in_process here (CPU kernels may split a reduction by thread)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
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


@contextlib.contextmanager
def _working_directory(path: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``mergeopt <module> ARGS`` in this process, from the repository root, with what
    :func:`run_module` returns.

    A new interpreter costs seconds of imports; a test needs one only for what a process alone can
    show: a run that signals itself (``fault``), or what a user sees from a fresh interpreter.
    Uninterrupted runs and resumed ones go through here, through the same ``mergeopt.cli.main``.
    """
    from mergeopt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with _working_directory(REPO), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([module, *args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([module, *args], code, stdout.getvalue(), stderr.getvalue())
