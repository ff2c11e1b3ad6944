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
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.shares import make_plan
from mergeopt.export.token_files import TokenFiles, _streaming_format
from mergeopt.export.token_stats import DomainStats, measure
from mergeopt.worlds import toy
from tests.export_world import SIZES, WEIGHTS, build_world, export, measured_stats, yaml_body

EOS = 2  # the toy tokenizer's


@pytest.fixture(scope="module", autouse=True)
def _no_torchvision_needed():
    """streaming's package imports its vision datasets, hence torchvision, which the test
    environment's no-deps install of streaming lacks (requirements/export-frameworks.txt) and no MDS
    read needs: an empty streaming.vision stands in for it while this module's tests run."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("torchvision") is None:
            patch.setitem(sys.modules, "streaming.vision", types.ModuleType("streaming.vision"))
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


def _write_mds(directory: Path, columns: dict, rows) -> None:
    with _streaming().MDSWriter(out=str(directory), columns=columns) as writer:
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
    out = tmp_path / "out"
    argv = [str(world["mixture"]), "--to", fmt, "--out", str(out), "--budget-tokens", "1000", *extra]
    assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in paths.items())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: error: ") and "Traceback" not in err[0], err
    assert not out.exists()
    return err[0]


def test_bad_token_files_are_refused_in_one_line(world, megatron, olmo, tmp_path, capsys):
    """A .bin without its .idx, a .bin its index disagrees with, a corrupt index.json, an unknown
    --token-dtype, an empty token file, a file read with the wrong dtype, no dtype or EOS at all,
    and an np.save file: each one line naming the culprit."""
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
    flags = ("--token-dtype", "uint16", "--eos-id", str(EOS))
    tokenizer = ("--tokenizer", world["tokenizer"])
    b = measured_stats()["b"].tokens  # uint16: two bytes a token, the last one cut off
    cases = [  # (format, datasets, options, what the line says)
        ("megatron", {**megatron, "a": bad / "lonely.bin"}, (), "lonely.idx, which is missing"),
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
        ("olmo-core", {**olmo["uint16"], "a": bad / "saved.npy"}, flags, "is an np.save file"),
    ]
    for fmt, paths, options, says in cases:
        assert says in _refused(world, bad, capsys, fmt, paths, *options)


def test_a_missing_reader_library_is_one_line_naming_the_package(
    world, mds, megatron, tmp_path, capsys, monkeypatch
):
    """Without megatron-core, or without streaming, the export says which package to pip install."""
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)  # import fails
    assert "pip install megatron-core" in _refused(world, tmp_path, capsys, "megatron", megatron)
    monkeypatch.setitem(sys.modules, "streaming.base", None)
    assert "pip install mosaicml-streaming" in _refused(world, tmp_path, capsys, "megatron", mds["ndarray"])
