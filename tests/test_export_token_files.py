"""export: measuring the data a trainer reads (MDS, Megatron indexed datasets, OLMo token files).

Each format is written by its framework's own writer (streaming's ``MDSWriter``, megatron-core's
``IndexedDatasetBuilder``, ``ndarray.tofile`` as OLMo-core's ``np.memmap`` reads it) from the
export world's JSONL records and its tokenizer. What mergeopt measures is compared with the JSONL
path's counts (the same records, tokenised the same way) and with the framework's own reader; an
export with a token budget is compared with the one the JSONL datasets give. OLMo files end every
document with the EOS id, so they hold one token per record more than the JSONL counts.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mergeopt.errors import UserError, run_cli
from mergeopt.export.command import main
from mergeopt.export.shares import make_plan
from mergeopt.export.token_files import TokenFiles, _streaming_format
from mergeopt.export.token_stats import DomainStats, measure
from mergeopt.worlds import toy
from tests.conftest import run_module, streaming_without_torchvision
from tests.export_world import SIZES, WEIGHTS, build_world, export, measured_stats, yaml_body

EOS = 2  # the toy tokenizer's


@pytest.fixture(scope="module", autouse=True)
def _no_torchvision_needed():
    with streaming_without_torchvision():  # while this module's tests run
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def _ids(jsonl: Path, tokenizer) -> list[list[int]]:
    """Each record's ids as mergeopt counts them: BOS + prompt, then the completion."""
    out = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        ids = tokenizer(record["prompt"])["input_ids"]
        out.append(ids + tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
    return out


def _epochs_line(text: str) -> str:
    (line,) = [x for x in text.splitlines() if "epochs over each source" in x]
    return line


def _export(world, fmt: str, tmp_path: Path, paths: dict, *extra: str) -> str:
    out = tmp_path / f"stored-{fmt}"
    argv = [str(world["mixture"]), "--to", fmt, "--out", str(out), *extra]
    assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in paths.items())]) == 0
    return out.read_text()


# ---------------------------------------------------------------- MDS (MosaicML streaming)


def _streaming():
    """streaming's package, or a skip when it is not installed."""
    if importlib.util.find_spec("streaming") is None:
        pytest.skip("mosaicml-streaming is not installed")
    _streaming_format()
    import streaming

    return streaming


def _write_mds(directory: Path, columns: dict, rows, **options) -> None:
    with _streaming().MDSWriter(out=str(directory), columns=columns, **options) as writer:
        for row in rows:
            writer.write(row)


@pytest.fixture(scope="module")
def mds(world, tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Three MDS directories per domain: ids as an int32 ndarray, ids as int64 bytes (llm-foundry's
    two token encodings), and the records' text."""
    _streaming()
    root = tmp_path_factory.mktemp("mds")
    out: dict[str, dict[str, Path]] = {"ndarray": {}, "bytes": {}, "text": {}}
    for name, jsonl in world["paths"].items():
        ids = _ids(jsonl, tokenizer)
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        for kind in out:
            out[kind][name] = root / kind / name
        _write_mds(
            out["ndarray"][name],
            {"tokens": "ndarray:int32"},
            ({"tokens": np.array(i, np.int32)} for i in ids),
        )
        _write_mds(
            out["bytes"][name],
            {"tokens": "bytes"},
            ({"tokens": np.array(i, np.int64).tobytes()} for i in ids),
        )
        text_rows = ({"prompt": r["prompt"], "completion": r["completion"], "domain": name} for r in records)
        _write_mds(out["text"][name], {"prompt": "str", "completion": "str", "domain": "str"}, text_rows)
    return out


def test_mds_token_ids_and_text_measure_as_the_jsonl_and_as_streaming_reads_them(mds, tokenizer):
    """Samples and tokens of every MDS encoding equal the JSONL path's (same records, same
    tokenizer) and, for stored ids, streaming's own ``LocalDataset`` read sample by sample."""
    streaming = _streaming()
    for kind, directories in mds.items():
        for name, directory in directories.items():
            assert measure(directory, tokenizer) == measured_stats()[name], (kind, name)
    for name, directory in mds["ndarray"].items():
        local = streaming.LocalDataset(str(directory))
        own = DomainStats(len(local), sum(len(local[i]["tokens"]) for i in range(len(local))))
        assert own == measured_stats()[name]


def test_mds_stored_ids_need_no_tokenizer_but_text_does(world, mds, tmp_path, capsys):
    """Stored ids are counted with no tokenizer at all; text without one is refused in one line."""
    assert measure(mds["bytes"]["a"], None) == measured_stats()["a"]
    assert measure(mds["bytes"]["a"], None, TokenFiles(dtype="int32")) == DomainStats(
        SIZES["a"], 2 * measured_stats()["a"].tokens
    )  # the same bytes read as int32 ids: twice as many
    mixture = world["mixture"]  # no recipe.yaml beside it: no tokenizer to fall back on
    out = tmp_path / "out.yaml"
    argv = [str(mixture), "--to", "llm-foundry", "--out", str(out), "--datasets"]
    assert run_cli(main, [*argv, *(f"{n}={p}" for n, p in mds["ndarray"].items())]) == 0
    assert run_cli(main, [*argv, *(f"{n}={p}" for n, p in mds["text"].items())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0], err


def test_llm_foundry_export_over_mds_gives_the_jsonl_counts_and_epochs(world, mds, tmp_path):
    """``--budget-tokens 120000`` over the MDS directories (ids without a tokenizer, text with it):
    the same ``choose`` counts and epochs line as over the JSONL files, the plan's for the known sizes."""
    jsonl = export(world, "llm-foundry", tmp_path, "--budget-tokens", "120000")
    expected = make_plan(WEIGHTS, "tokens", measured_stats(), budget_tokens=120000).counts
    assert {n: s["choose"] for n, s in _streams(jsonl).items()} == expected
    budget = ("--budget-tokens", "120000")
    for kind, extra in (("ndarray", budget), ("text", (*budget, "--tokenizer", world["tokenizer"]))):
        stored = _export(world, "llm-foundry", tmp_path / kind, mds[kind], *extra)
        assert {n: s["choose"] for n, s in _streams(stored).items()} == expected, kind
        assert _epochs_line(stored) == _epochs_line(jsonl)
        assert "not an MDS directory" not in stored


def _streams(text: str) -> dict:
    return yaml_body(text)["train_loader"]["dataset"]["streams"]


# ---------------------------------------------------------------- MDS: compressed shards, splits, merged indexes

STREAMING_READS = """
import json, sys, types
sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))  # no torchvision
from streaming import Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

clean_stale_shared_memory()
out = []
for entry in json.loads(sys.argv[1]):  # one stream each, as llm-foundry hands it to Stream
    dataset = StreamingDataset(streams=[Stream(**entry)], batch_size=1, shuffle=False)
    samples = [dataset[i] for i in range(len(dataset))]
    out.append([len(samples), sum(len(s["tokens"]) for s in samples if "tokens" in s)])
    del dataset
clean_stale_shared_memory()
print(json.dumps(out))
"""


def _streaming_reads(streams: list[dict]) -> list[DomainStats]:
    """(samples, stored ids) of each stream as streaming's ``StreamingDataset`` reads it, offline
    (no remote): a child process, as streaming keeps shared memory per process. Streaming
    decompresses a compressed shard into ``local`` itself, so give it a copy."""
    child = subprocess.run(
        [sys.executable, "-c", STREAMING_READS, json.dumps(streams)], capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return [DomainStats(*x) for x in json.loads(child.stdout.strip().splitlines()[-1])]


def _compressions() -> list[str]:
    """Every compression streaming's ``MDSWriter`` offers, once each (br, bz2, gz, snappy, zstd)."""
    from streaming.base.compression import get_compressions

    return sorted({algo.split(":")[0] for algo in get_compressions()})


def _write_ids(directory: Path, ids: list[list[int]], **options) -> None:
    rows = ({"tokens": np.array(i, np.int32)} for i in ids)
    _write_mds(directory, {"tokens": "ndarray:int32"}, rows, size_limit=1 << 14, **options)


@pytest.fixture(scope="module")
def compressed(world, tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each domain's ids written with each of streaming's compressions (16 KB shards, so several
    per domain, only their compressed files on disk), and its text records with zstd."""
    _streaming()
    root = tmp_path_factory.mktemp("mds-compressed")
    out: dict[str, dict[str, Path]] = {}
    for name, jsonl in world["paths"].items():
        ids = _ids(jsonl, tokenizer)
        for algo in _compressions():
            out.setdefault(algo, {})[name] = root / algo / name
            _write_ids(out[algo][name], ids, compression=algo)
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        out.setdefault("zstd text", {})[name] = root / "text" / name
        rows = ({"prompt": r["prompt"], "completion": r["completion"]} for r in records)
        columns = {"prompt": "str", "completion": "str"}
        _write_mds(out["zstd text"][name], columns, rows, size_limit=1 << 14, compression="zstd")
    return out


@pytest.fixture(scope="module")
def read_by_streaming(compressed, tmp_path_factory) -> dict[Path, DomainStats]:
    """Copies of the compressed id directories, each read by streaming's ``StreamingDataset``
    (offline: it decompresses each shard into the directory, beside its compressed file), and what
    it counted in each."""
    root = tmp_path_factory.mktemp("mds-read-by-streaming")
    copies = []
    for algo in _compressions():  # the ids: streaming's reading of text has no tokens to count
        for name, directory in compressed[algo].items():
            copies.append(root / algo / name)
            shutil.copytree(directory, copies[-1])
    return dict(zip(copies, _streaming_reads([{"local": str(c)} for c in copies]), strict=True))


def _files(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in directory.rglob("*") if f.is_file()}


def test_compressed_mds_measures_as_the_jsonl_and_as_streaming_reads_it(
    compressed, read_by_streaming, tokenizer, tmp_path, monkeypatch
):
    """Every compression: samples and tokens equal the JSONL path's and, for the ids, streaming's
    own ``StreamingDataset``. mergeopt leaves the dataset as it was, and decompresses one shard at
    a time into a temporary directory that is gone before the next shard is decompressed and after
    the count."""
    compression = pytest.importorskip("streaming.base.compression")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    decompress, alive = compression.decompress, []

    def watched(algo, data):
        alive.append(len(list(scratch.glob("mergeopt-mds-*"))))
        return decompress(algo, data)

    monkeypatch.setattr(compression, "decompress", watched)
    shards = 0
    for kind, directories in compressed.items():
        for name, directory in directories.items():
            before = _files(directory)
            assert not any(f.endswith(".mds") for f in before), before  # only compressed shards
            assert measure(directory, tokenizer) == measured_stats()[name], (kind, name)
            assert _files(directory) == before and not list(scratch.iterdir()), (kind, name)
            shards += len(json.loads((directory / "index.json").read_text())["shards"])
    assert len(alive) == shards > 3 * len(compressed) * len(WEIGHTS) and set(alive) == {0}
    assert read_by_streaming == {copy: measured_stats()[copy.name] for copy in read_by_streaming}


def test_a_raw_shard_beside_its_compressed_one_is_read_raw(read_by_streaming, tmp_path):
    """Where streaming left both (its decompressed copy, ``keep_zip``), the raw shards are what is
    counted: with every compressed file overwritten by garbage, the counts are still the JSONL's."""
    (read,) = [d for d in read_by_streaming if d.parent.name == "zstd" and d.name == "b"]
    directory = tmp_path / "both"
    shutil.copytree(read, directory)
    zipped = list(directory.glob("*.mds.zstd"))
    assert zipped and all(z.with_suffix("").is_file() for z in zipped)
    for z in zipped:
        z.write_bytes(b"not zstd")
    assert measure(directory, None) == measured_stats()["b"]


@pytest.fixture(scope="module")
def splits(world, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """llm-foundry's layout, ``ROOT/train`` and ``ROOT/val`` (zstd shards): ``one`` holds a's ids in
    train only; ``two`` b's in train and c's in val; ``merged`` c's in train and a's in val, with
    a root index.json from streaming's ``merge_index`` (basenames ``train/shard.00000.mds.zstd``)."""
    _streaming()
    from streaming.base.util import merge_index

    root = tmp_path_factory.mktemp("mds-splits")
    ids = {name: _ids(jsonl, tokenizer) for name, jsonl in world["paths"].items()}
    layout = {"one": {"train": "a"}, "two": {"train": "b", "val": "c"}, "merged": {"train": "c", "val": "a"}}
    for dataset, parts in layout.items():
        for split, name in parts.items():
            _write_ids(root / dataset / split, ids[name], compression="zstd")
    merge_index(str(root / "merged"), keep_local=True)
    return {dataset: root / dataset for dataset in layout}


def _plus(*names: str) -> DomainStats:
    return DomainStats(*(sum(getattr(measured_stats()[n], f) for n in names) for f in ("samples", "tokens")))


def test_mds_splits_and_merged_indexes_measure_as_streaming_reads_them(splits, tmp_path):
    """A split directory is its split; a root of one split is that split (streaming's
    ``Stream(local=ROOT, split=train)``); a merged root is every shard its index lists (train and
    val, as ``Stream(local=ROOT)`` reads it). Each count equals the JSONL's and streaming's own."""
    merged = json.loads((splits["merged"] / "index.json").read_text())["shards"]
    assert {info["zip_data"]["basename"].split("/")[0] for info in merged} == {"train", "val"}
    cases = [  # (--datasets path, the stream that reads it, the JSONL domains it holds)
        (splits["one"], {"split": "train"}, ("a",)),
        (splits["two"] / "train", {}, ("b",)),
        (splits["two"] / "val", {}, ("c",)),
        (splits["merged"], {}, ("c", "a")),
        (splits["merged"] / "val", {}, ("a",)),
    ]
    for path, _, names in cases:
        assert measure(path, None) == _plus(*names), path
    copy = tmp_path / "copy"
    shutil.copytree(splits["one"].parent, copy)
    local = [{"local": str(copy / p.relative_to(splits["one"].parent)), **s} for p, s, _ in cases]
    assert _streaming_reads(local) == [_plus(*names) for _, _, names in cases]


def test_llm_foundry_streams_over_split_roots_read_what_was_measured(world, splits, tmp_path):
    """``--budget-tokens`` over a root of one split, a named split and a merged root: each stream
    names the split where the path is a split root, the header says to set no dataset-level split
    for the others, ``choose`` is the plan's for the measured sizes, and streaming's ``Stream`` over
    each written entry (its weight left out) reads the samples that were measured."""
    paths = {"a": splits["one"], "b": splits["two"] / "train", "c": splits["merged"]}
    text = _export(world, "llm-foundry", tmp_path, paths, "--budget-tokens", "120000")
    streams = _streams(text)
    assert streams["a"]["split"] == "train" and "split" not in streams["b"] and "split" not in streams["c"]
    assert "leave train_loader.dataset.split unset" in text and "not an MDS directory" not in text
    sizes = {"a": _plus("a"), "b": _plus("b"), "c": _plus("c", "a")}
    assert {n: s["choose"] for n, s in streams.items()} == make_plan(
        WEIGHTS, "tokens", sizes, budget_tokens=120000
    ).counts
    root, copy = splits["one"].parent.resolve(), tmp_path / "copy"
    shutil.copytree(root, copy)
    entries = []
    for stream in streams.values():
        del stream["choose"]
        entries.append({**stream, "local": str(copy / Path(stream["local"]).relative_to(root))})
    assert _streaming_reads(entries) == [sizes[n] for n in streams]


# ---------------------------------------------------------------- Megatron indexed datasets


@pytest.fixture(scope="module")
def megatron(world, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """One indexed dataset per domain, a record a document, written by megatron-core's builder."""
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    root = tmp_path_factory.mktemp("megatron")
    prefixes = {}
    for name, jsonl in world["paths"].items():
        prefixes[name] = root / name
        builder = indexed.IndexedDatasetBuilder(f"{prefixes[name]}.bin", dtype=np.uint16)
        for ids in _ids(jsonl, tokenizer):
            builder.add_document(np.array(ids), [len(ids)])
        builder.finalize(f"{prefixes[name]}.idx")
    return prefixes


def test_megatron_dataset_measures_as_the_jsonl_and_as_indexed_dataset_reads_it(megatron):
    """Documents and tokens equal the JSONL path's and megatron-core's own reading (every sequence
    fetched), whether the prefix, the .bin or the .idx is given; no tokenizer is used."""
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    for name, prefix in megatron.items():
        for path in (prefix, Path(f"{prefix}.bin"), Path(f"{prefix}.idx")):
            assert measure(path, None) == measured_stats()[name], (name, path)
        dataset = indexed.IndexedDataset(str(prefix))
        own = DomainStats(
            len(dataset.document_indices) - 1, sum(len(dataset[i]) for i in range(len(dataset)))
        )
        assert own == measured_stats()[name]


def test_megatron_export_over_indexed_datasets_gives_the_jsonl_epochs(world, megatron, tmp_path):
    """``--to megatron --budget-tokens 120000`` over the prefixes, without a tokenizer: the same
    epochs line as over the JSONL files, and the prefixes written as given."""
    jsonl = export(world, "megatron", tmp_path, "--budget-tokens", "120000")
    stored = _export(world, "megatron", tmp_path, megatron, "--budget-tokens", "120000")
    assert _epochs_line(stored) == _epochs_line(jsonl)
    assert "has no .bin/.idx" not in stored
    assert all(str(p) in stored for p in megatron.values())


# ---------------------------------------------------------------- OLMo token files


@pytest.fixture(scope="module")
def olmo(world, tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Raw token arrays, every record followed by EOS: uint8 (the dtype OLMo-core's rule gives the
    54-token vocabulary), uint16, and uint16 split over two files matched by a glob."""
    root = tmp_path_factory.mktemp("olmo")
    out: dict[str, dict[str, Path]] = {"uint8": {}, "uint16": {}, "glob": {}}
    for name, jsonl in world["paths"].items():
        flat = [t for ids in _ids(jsonl, tokenizer) for t in [*ids, EOS]]
        for dtype in ("uint8", "uint16"):
            out[dtype][name] = root / dtype / f"{name}.npy"
            out[dtype][name].parent.mkdir(exist_ok=True)
            np.asarray(flat, dtype=dtype).tofile(out[dtype][name])
        parts = root / "glob" / name
        parts.mkdir(parents=True)
        cut = [i for i, t in enumerate(flat) if t == EOS][99] + 1  # after the 100th document
        np.asarray(flat[:cut], np.uint16).tofile(parts / "part-0.npy")
        np.asarray(flat[cut:], np.uint16).tofile(parts / "part-1.npy")
        out["glob"][name] = parts / "*.npy"
    return out


def _with_eos(name: str) -> DomainStats:
    jsonl = measured_stats()[name]
    return DomainStats(jsonl.samples, jsonl.tokens + jsonl.samples)  # one EOS per document


def test_olmo_token_files_measure_as_the_jsonl_plus_eos_and_as_olmo_core_reads_them(olmo, tokenizer):
    """Documents equal the JSONL records, tokens the JSONL tokens plus one EOS each, whether the
    dtype and EOS come from the tokenizer (uint8) or the flags (uint16, one file or a glob), and
    both equal OLMo-core's own ``iter_document_indices`` and ``file size // itemsize`` count."""
    utils = pytest.importorskip("olmo_core.data.utils")
    flags = TokenFiles(dtype="uint16", eos_id=EOS)
    for name in WEIGHTS:
        assert measure(olmo["uint8"][name], tokenizer) == _with_eos(name)
        assert measure(olmo["uint16"][name], None, flags) == _with_eos(name)
        assert measure(olmo["glob"][name], None, flags) == _with_eos(name)
        for dtype in ("uint8", "uint16"):
            path = olmo[dtype][name]
            spans = list(utils.iter_document_indices(path, eos_token_id=EOS, dtype=np.dtype(dtype).type))
            own = DomainStats(len(spans), path.stat().st_size // np.dtype(dtype).itemsize)
            assert own == _with_eos(name) and sum(e - s for s, e in spans) == own.tokens


def test_olmo_core_export_over_token_files_gives_the_epochs_of_their_tokens(world, olmo, tmp_path):
    """``--to olmo-core --budget-tokens 120000`` over the uint16 files with ``--token-dtype`` and
    ``--eos-id`` (no tokenizer): requested_tokens, each max_repetition_ratio and the epochs line
    are the plan's for the known sizes, the paths written as given."""
    text = _export(
        world,
        "olmo-core",
        tmp_path,
        olmo["glob"],
        "--budget-tokens",
        "120000",
        "--token-dtype",
        "uint16",
        "--eos-id",
        str(EOS),
    )
    plan = make_plan(WEIGHTS, "tokens", {n: _with_eos(n) for n in WEIGHTS}, budget_tokens=120000)
    config = yaml_body(text)
    assert config["requested_tokens"] == 120000
    for source in config["source_list"]["sources"]:
        name = source["source_name"]
        assert source["paths"] == [str(olmo["glob"][name])]
        assert source["max_repetition_ratio"] == max(1.0, np.ceil(plan.repetition[name] * 1000) / 1000)
    values = dict(re.findall(r"(\w) ([\d.]+)", _epochs_line(text).split(": ", 1)[1]))
    assert {n: float(v) for n, v in values.items()} == {
        n: float(f"{plan.repetition[n]:.4g}") for n in WEIGHTS
    }


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


def _refused(world, tmp_path, capsys, fmt: str, paths: dict, *extra: str) -> str:
    import gc

    out = tmp_path / "out"
    argv = [str(world["mixture"]), "--to", fmt, "--out", str(out), "--budget-tokens", "1000", *extra]
    # what Python prints as "Exception ignored in ..." with a traceback (a reader's __del__ failing
    # on an object its __init__ left half made) shows under the line in a terminal
    ignored, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda raised: ignored.append(f"{raised.object!r}: {raised.exc_value!r}")
    try:
        code = run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in paths.items())])
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert code == 2 and ignored == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: error: ") and "Traceback" not in err[0], err
    assert not out.exists()
    return err[0]


def test_bad_token_files_are_refused_in_one_line(world, megatron, olmo, tmp_path, capsys):
    """A .bin without its .idx (named by the file or by the prefix), a .bin its index disagrees with, a corrupt index.json, an unknown
    --token-dtype, an empty token file, a file read with the wrong dtype, no dtype or EOS at all,
    an np.save file, a negative --eos-id, a glob that matches nothing, a file of part of a token,
    a garbled .idx and a tokenizer without an EOS token: each one line naming the culprit."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lonely.bin").write_bytes(b"\0" * 8)
    short = bad / "short"
    Path(f"{short}.idx").write_bytes(Path(f"{megatron['b']}.idx").read_bytes())
    Path(f"{short}.bin").write_bytes(Path(f"{megatron['b']}.bin").read_bytes()[:-2])
    (bad / "mds").mkdir()
    (bad / "mds" / "index.json").write_text("{not json")
    (bad / "empty.npy").write_bytes(b"")
    np.save(bad / "saved.npy", np.fromfile(olmo["uint16"]["a"], np.uint16))
    (bad / "odd.npy").write_bytes(b"\0\0\2")  # a token and a half of uint16
    (bad / "garbled.idx").write_bytes(b"not an index")
    (bad / "garbled.bin").write_bytes(b"\0" * 8)
    no_eos = toy.build_tokenizer()
    no_eos.eos_token = None
    no_eos.save_pretrained(bad / "no-eos-tokenizer")
    flags = ("--token-dtype", "uint16", "--eos-id", str(EOS))
    tokenizer = ("--tokenizer", world["tokenizer"])
    b = measured_stats()["b"].tokens  # uint16: two bytes a token, the last one cut off
    cases = [  # (format, datasets, options, what the line says)
        ("megatron", {**megatron, "a": bad / "lonely.bin"}, (), "lonely.idx, which is missing"),
        # the prefix, as Megatron's --data-path names a dataset, with one of its two files
        ("megatron", {**megatron, "a": bad / "lonely"}, (), "lonely.bin: a Megatron indexed dataset needs"),
        (
            "megatron",
            {**megatron, "b": short},
            (),
            f"short.bin holds {2 * b - 2:,} bytes, but its .idx lists {b:,}",
        ),
        ("megatron", {**megatron, "c": bad / "mds"}, (), "index.json: not a readable MDS index"),
        ("olmo-core", olmo["uint16"], ("--token-dtype", "float32"), "--token-dtype float32"),
        ("olmo-core", {**olmo["uint16"], "a": bad / "empty.npy"}, flags, "empty.npy: the dataset is empty"),
        # uint16 files read as uint8, the dtype the tokenizer's vocabulary gives
        ("olmo-core", olmo["uint16"], tokenizer, "read as uint8, it does not end with the EOS id 2"),
        ("olmo-core", olmo["uint16"], (), "do not say their dtype or EOS id"),
        (
            "olmo-core",
            olmo["uint16"],
            ("--tokenizer", str(bad / "no-eos-tokenizer")),
            "the tokenizer has no EOS token to split OLMo token files on: pass --eos-id",
        ),
        ("olmo-core", {**olmo["uint16"], "a": bad / "saved.npy"}, flags, "is an np.save file"),
        (
            "olmo-core",
            olmo["uint16"],
            ("--token-dtype", "uint16", "--eos-id", "-1"),
            "--eos-id -1: a token id",
        ),
        (
            "olmo-core",
            {**olmo["uint16"], "a": bad / "none-*.npy"},
            flags,
            "none-*.npy: the glob matches no file",
        ),
        (
            "olmo-core",
            {**olmo["uint16"], "a": bad / "odd.npy"},
            flags,
            "odd.npy: 3 bytes are not whole uint16",
        ),
        ("megatron", {**megatron, "a": bad / "garbled"}, (), "garbled.idx: not a readable Megatron index"),
    ]
    for fmt, paths, options, says in cases:
        assert says in _refused(world, bad, capsys, fmt, paths, *options)


def test_bad_mds_directories_are_refused_in_one_line(world, mds, compressed, splits, tmp_path, capsys):
    """A corrupt zstd shard, a compression streaming does not know, a shard that decompresses to
    another size than index.json lists, a shard neither raw nor compressed, shards in streaming's
    json format (not MDS), a raw shard cut short, and a root of two splits: each one line naming
    the shard, the index or the splits."""
    from streaming.base.compression import compress

    bad = {}
    for case in ("corrupt", "unknown", "resized", "missing"):
        bad[case] = tmp_path / case
        shutil.copytree(compressed["zstd"]["a"], bad[case])
    shard = bad["corrupt"] / "shard.00001.mds.zstd"
    shard.write_bytes(shard.read_bytes()[:-9])
    index = json.loads((bad["unknown"] / "index.json").read_text())
    for info in index["shards"]:
        info["compression"] = "lz4"
    (bad["unknown"] / "index.json").write_text(json.dumps(index))
    (bad["resized"] / "shard.00000.mds.zstd").write_bytes(compress("zstd", b"ten bytes."))
    (bad["missing"] / "shard.00000.mds.zstd").unlink()
    bad["json"] = tmp_path / "json"  # streaming's json format: a data and a metadata file per shard
    with _streaming().JSONWriter(out=str(bad["json"]), columns={"text": "str"}, compression="zstd") as writer:
        writer.write({"text": "abc"})
    bad["short"] = tmp_path / "short"
    shutil.copytree(mds["ndarray"]["a"], bad["short"])
    raw = bad["short"] / "shard.00000.mds"
    size = raw.stat().st_size
    raw.write_bytes(raw.read_bytes()[:-4])
    cases = {  # the dataset given for domain a: what the line says
        "corrupt": "shard.00001.mds.zstd: not a readable zstd shard (Decompression error",
        "unknown": "shard.00000.mds.zstd: not a readable lz4 shard (lz4 is not a supported compression",
        "resized": "shard.00000.mds.zstd: decompresses to 10 bytes, but index.json lists",
        "missing": "shard shard.00000.mds is missing (nor its compressed shard.00000.mds.zstd)",
        "json": "index.json: shards in streaming's json format, not MDS",
        "short": f"shard.00000.mds: {size - 4:,} bytes, but index.json lists {size:,} for this shard",
    }
    for case, says in cases.items():
        line = _refused(world, tmp_path, capsys, "llm-foundry", {**mds["ndarray"], "a": bad[case]})
        assert says in line and str(bad[case]) in line, (case, line)
    line = _refused(world, tmp_path, capsys, "llm-foundry", {**mds["ndarray"], "a": splits["two"]})
    assert f"{splits['two']} has no index.json but 2 MDS splits (train, val)" in line
    assert str(splits["two"] / "train") in line


def test_the_export_reads_mds_where_streaming_was_installed_without_torchvision(world, mds, tmp_path):
    """The README installs streaming with --no-deps (its declared torchvision would replace torch),
    and streaming's package imports its vision datasets: a user's ``mergeopt export`` in a new
    process, with no stand-in from this module, still reads the MDS directories, and gives the
    counts the same export gives in this process."""
    out = tmp_path / "child.yaml"
    argv = [str(world["mixture"]), "--to", "llm-foundry", "--out", str(out), "--budget-samples", "5000"]
    datasets = ["--datasets", *(f"{n}={p}" for n, p in mds["ndarray"].items())]
    child = run_module("export", *argv, *datasets)
    assert child.returncode == 0, child.stderr[-2000:]
    here = _export(world, "llm-foundry", tmp_path / "here", mds["ndarray"], "--budget-samples", "5000")
    assert _streams(out.read_text()) == _streams(here)


def test_a_missing_reader_library_is_one_line_naming_the_package(
    world, mds, megatron, tmp_path, capsys, monkeypatch
):
    """Without megatron-core, or without streaming, the export says which package to pip install."""
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)  # import fails
    assert "pip install megatron-core" in _refused(world, tmp_path, capsys, "megatron", megatron)
    monkeypatch.setitem(sys.modules, "streaming.base", None)
    line = _refused(world, tmp_path, capsys, "megatron", mds["ndarray"])
    assert "pip install --no-deps mosaicml-streaming==0.13.0 brotli python-snappy" in line, line


def test_a_missing_dependency_of_streaming_names_the_no_deps_install(monkeypatch):
    """The line a missing dependency of streaming gives installs streaming as the README does,
    with --no-deps: a bare ``pip install mosaicml-streaming`` replaces torch with a CUDA 2.14 and
    transformers with 4.x, and streaming's module ``snappy`` is python-snappy (PyPI's ``snappy``
    is SnapPy, a 3-manifold program)."""
    for name in [m for m in sys.modules if m == "streaming" or m.startswith("streaming.")]:
        monkeypatch.delitem(sys.modules, name)  # imported anew, and put back after the test
    monkeypatch.setitem(sys.modules, "snappy", None)  # import snappy fails
    before = set(sys.modules)
    try:
        with pytest.raises(UserError) as refused:
            _streaming_format()
    finally:
        for name in set(sys.modules) - before:
            if name == "streaming" or name.startswith("streaming."):
                del sys.modules[name]
    line = str(refused.value)
    assert "(snappy is missing)" in line and "pip install snappy" not in line, line
    assert (
        "pip install --no-deps mosaicml-streaming==0.13.0 brotli python-snappy cramjam zstd catalogue" in line
    )
