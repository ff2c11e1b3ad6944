"""export: llm-foundry read by MosaicML streaming, olmo-core built by OLMo-core, over tiny real shards.

llm-foundry hands each ``train_loader.dataset.streams`` entry to ``streaming.Stream(**entry)``; the
test does the same over MDS shards written with ``streaming.MDSWriter`` from the export world's
records, iterates one epoch of ``StreamingDataset`` and counts each sample's domain. Streaming's
draw per stream is deterministic (``epoch_size · proportion`` rounded, the shortfall spread one
sample at a time), so each count is within one sample of the exported share, tighter than 4
standard errors; ``choose`` counts are exact. olmo-core's source list goes through OLMo-core's own
``SourceMixtureDatasetConfig.from_yaml`` and ``build`` over raw uint16 token files made of the same
records with the same tokenizer, so its token counts are the ones mergeopt measured.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.shares import make_plan
from mergeopt.worlds import toy
from tests.export_world import (
    SIZES,
    WEIGHTS,
    build_world,
    expected_sample_shares,
    export,
    mean_tokens,
    measured_stats,
    write_run,
    yaml_body,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


# ---------------------------------------------------------------- llm-foundry (MosaicML streaming)

STREAMING_EPOCH = """
import json, sys, types
# streaming/__init__ imports its vision datasets, which need torchvision; none is used here
sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
from streaming import MDSWriter, Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

shards, configs = json.loads(sys.argv[1])
for jsonl, directory in shards:  # one MDS directory per domain, from the world's records
    with MDSWriter(out=directory, columns={"domain": "str", "index": "int"}) as writer:
        for line in open(jsonl):
            record = json.loads(line)
            writer.write({"domain": record["domain"], "index": record["index"]})
clean_stale_shared_memory()
counts = []
for streams in configs:  # what llm-foundry's build_text_dataloader does with the streams
    dataset = StreamingDataset(
        streams=[Stream(**entry) for entry in streams.values()], batch_size=1, shuffle=True,
        shuffle_seed=0,
    )
    seen = {}
    for sample in dataset:
        seen[sample["domain"]] = seen.get(sample["domain"], 0) + 1
    counts.append(seen)
    del dataset
clean_stale_shared_memory()
print(json.dumps(counts))
"""


def _streaming_epochs(shards: list[tuple[str, str]], configs: list[dict]) -> list[dict[str, int]]:
    """Write the (JSONL, MDS directory) ``shards``, then count one epoch of each config's streams.

    A child process: streaming keeps shared memory per process, and the torchvision stand-in above
    must not leak into pytest's ``sys.modules``.
    """
    child = subprocess.run(
        [sys.executable, "-c", STREAMING_EPOCH, json.dumps([shards, configs])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def _streams(text: str) -> dict:
    return yaml_body(text)["train_loader"]["dataset"]["streams"]


def test_streaming_draws_the_exported_llm_foundry_streams(world, tmp_path):
    """Three exports, one epoch each: sample shares (JSONL measured, ``local`` then pointed at the
    MDS directory as the file says), a sample budget as ``choose``, and sample weights with the MDS
    directories given to ``--datasets`` (nothing to measure, so the file is fed as written)."""
    if importlib.util.find_spec("streaming") is None:  # imported in the child only (see above)
        pytest.skip("mosaicml-streaming is not installed")
    mds = {name: str(tmp_path / "mds" / name) for name in WEIGHTS}
    shares = _streams(export(world, "llm-foundry", tmp_path))
    budget = _streams(export(world, "llm-foundry", tmp_path, "--budget-samples", "6000"))
    for streams in (shares, budget):
        assert [s["local"] for s in streams.values()] == [str(world["paths"][n]) for n in WEIGHTS]
        for name, stream in streams.items():
            stream["local"] = mds[name]
    shards = [(str(world["paths"][name]), mds[name]) for name in WEIGHTS]
    counts_shares, counts_budget = _streaming_epochs(shards, [shares, budget])

    epoch = sum(SIZES.values())  # streaming's default epoch: every underlying sample once
    assert sum(counts_shares.values()) == epoch
    for name, p in expected_sample_shares().items():
        assert abs(counts_shares[name] - p * epoch) < 1, (name, counts_shares)  # within one sample
    expected = make_plan(WEIGHTS, "tokens", measured_stats(), budget_samples=6000).counts
    assert counts_budget == expected == {n: s["choose"] for n, s in budget.items()}
    assert counts_budget["b"] > SIZES["b"]  # the budget repeats b: streaming draws it more than once

    run = write_run(tmp_path / "samples-run", WEIGHTS)
    out = tmp_path / "as-written.yaml"
    argv = [str(run), "--to", "llm-foundry", "--weights-are", "samples", "--out", str(out)]
    assert run_cli(main, [*argv, "--datasets", *(f"{n}={d}" for n, d in mds.items())]) == 0
    text = out.read_text()
    assert "not an MDS directory" not in text
    (counts_written,) = _streaming_epochs([], [_streams(text)])  # the shards written above
    for name, p in WEIGHTS.items():
        assert abs(counts_written[name] - p * epoch) < 1, (name, counts_written)


def test_llm_foundry_refuses_one_local_for_two_streams(world, tmp_path, capsys):
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "llm_foundry.yaml"
    same = world["paths"]["a"]
    argv = [str(run), "--to", "llm-foundry", "--tokenizer", world["tokenizer"], "--out", str(out)]
    argv += ["--datasets", f"a={same}", f"b={same}", f"c={world['paths']['c']}"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llm-foundry" in err[0] and "'b'" in err[0] and "Reused local" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------- olmo-core (OLMo-core's own build)


def _token_file(jsonl: Path, out: Path) -> int:
    """The records' token ids as OLMo-core reads them: a raw uint16 array (``np.memmap``, no
    header), each record counted as mergeopt counts it (BOS + prompt, then the completion)."""
    tokenizer = toy.build_tokenizer()
    ids: list[int] = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        ids += tokenizer(record["prompt"])["input_ids"]
        ids += tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    np.asarray(ids, dtype=np.uint16).tofile(out)
    return len(ids)


@pytest.fixture(scope="module")
def token_files(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokens")
    files = {name: root / f"{name}.npy" for name in WEIGHTS}
    for name, path in world["paths"].items():
        assert _token_file(path, files[name]) == SIZES[name] * mean_tokens(name)  # what mergeopt measured
    return files


def _selected(config, sequence_length: int) -> tuple[dict[str, int], dict[str, int]]:
    """Tokens OLMo-core's build selects per source, and how many path entries (passes) each has."""
    mixture = config.build(npdtype=np.uint16, sequence_length=sequence_length)
    tokens = {o.name: sum(p.tokens for p in o.path_tokens) for o in mixture.sources}
    return tokens, {o.name: len(o.path_tokens) for o in mixture.sources}


def test_olmo_core_builds_the_budget_it_repeats(world, tmp_path, token_files):
    """``--budget-tokens 120000`` repeats every source (a 2.29x, b 1.92x, c 1.36x): OLMo-core builds
    it with the exported ``max_repetition_ratio`` and selects ``int(requested_tokens · target_ratio)``
    tokens of each source, exactly with one-token instances, within one instance per pass of a
    source's file with 16-token instances (its rounding to whole instances)."""
    source_mixture = pytest.importorskip("olmo_core.data.source_mixture")
    config = yaml_body(export(world, "olmo-core", tmp_path, "--budget-tokens", "120000"))
    for source in config["source_list"]["sources"]:  # tokenized, as the file's comment asks
        assert source["paths"] == [str(world["paths"][source["source_name"]])]
        source["paths"] = [str(token_files[source["source_name"]])]
    assert all(s["max_repetition_ratio"] > 1 for s in config["source_list"]["sources"])
    path = tmp_path / "olmo_core.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    requested = config["requested_tokens"]
    target = {s["source_name"]: int(requested * s["target_ratio"]) for s in config["source_list"]["sources"]}
    assert target == {"a": 24000, "b": 60000, "c": 36000}

    def load(*overrides: str):
        return source_mixture.SourceMixtureDatasetConfig.from_yaml(
            path, overrides=["quiet=true", "render_tables=false", *overrides]
        )

    tokens, _ = _selected(load(f"global_batch_size={requested}"), sequence_length=1)
    assert tokens == target
    tokens, passes = _selected(load("global_batch_size=1200"), sequence_length=16)
    for name in WEIGHTS:
        assert abs(tokens[name] - target[name]) <= 16 * passes[name], (name, tokens)


def test_olmo_core_without_a_budget_builds_once_requested_tokens_is_set(world, tmp_path, token_files):
    """Token files given to ``--datasets`` directly (no budget: nothing to measure): the file names
    them as written and has no ``requested_tokens``; OLMo-core refuses it as is and builds it once
    the trainer sets one that the data covers without repetition."""
    source_mixture = pytest.importorskip("olmo_core.data.source_mixture")
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "olmo_core.yaml"
    argv = [str(run), "--to", "olmo-core", "--out", str(out), "--datasets"]
    assert run_cli(main, [*argv, *(f"{n}={p}" for n, p in token_files.items())]) == 0
    text = out.read_text()
    assert "set requested_tokens" in text and "requested_tokens:" not in text
    assert "tokenize" not in text  # every path is already a token file
    load = source_mixture.SourceMixtureDatasetConfig.from_yaml
    with pytest.raises(Exception, match="requested_tokens"):
        load(out, overrides=["global_batch_size=1"])
    available = {n: SIZES[n] * mean_tokens(n) for n in WEIGHTS}
    requested = int(min(available[n] / WEIGHTS[n] for n in WEIGHTS))  # c's tokens bind: 88000
    config = load(
        out, overrides=[f"requested_tokens={requested}", f"global_batch_size={requested}", "quiet=true"]
    )
    tokens, _ = _selected(config, sequence_length=1)
    assert tokens == {n: int(requested * WEIGHTS[n]) for n in WEIGHTS}


def test_olmo_core_refuses_an_np_save_file(world, tmp_path, token_files, capsys):
    """OLMo-core counts ``file size // itemsize`` tokens of a file: an ``np.save`` file's header
    would be read as tokens (shown below with OLMo-core's own counter), so the export refuses it."""
    source_mixture = pytest.importorskip("olmo_core.data.source_mixture")
    saved = tmp_path / "b.npy"
    array = np.fromfile(token_files["b"], dtype=np.uint16)
    np.save(saved, array)
    counter = source_mixture.SourceMixtureDatasetConfig(
        source_list=source_mixture.SourceMixtureList(sources=[]), requested_tokens=1, global_batch_size=1
    )
    assert counter._count_tokens_for_file(saved, np.uint16) > len(array)  # the header, as tokens
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "olmo_core.yaml"
    files = {**token_files, "b": saved}
    argv = [str(run), "--to", "olmo-core", "--out", str(out), "--datasets"]
    assert run_cli(main, [*argv, *(f"{n}={p}" for n, p in files.items())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "olmo-core" in err[0] and "'b'" in err[0] and "np.save" in err[0]
    assert not out.exists()
