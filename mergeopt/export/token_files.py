"""Samples and tokens of data already in a trainer's own format: MDS, Megatron indexed datasets, OLMo token files.

The export's sample shares, counts, epochs and repetition refusal are only as true as the sizes
they divide by, so they must come from the files the trainer will read, not from a JSONL copy.
Which format a ``--datasets`` path is in follows from the path itself:

- an **MDS directory** (MosaicML streaming, what llm-foundry's streams read): a directory with
  ``index.json``. Read with streaming's own shard readers (``reader_from_json``, as its
  ``LocalDataset`` does), one sample at a time; pickled columns are refused (streaming calls them
  unsafe), as are shards of streaming's json and csv formats, which llm-foundry does not read. A
  ``tokens`` or ``input_ids`` column is token ids, counted as stored: an ndarray or list has its
  length, bytes are ids of ``--token-dtype`` (default int64, llm-foundry's
  ``token_encoding_type``). Otherwise the samples are records (``text``, ``prompt``/``completion``,
  multiple choice), tokenised exactly as :mod:`mergeopt.export.token_stats` counts JSONL.
  **Compressed shards.** A shard present only compressed (``MDSWriter(compression=...)`` writes
  ``shard.00000.mds.zstd``) is decompressed with streaming's ``compression.decompress``, as its
  ``Stream.prepare_shard`` does into its cache, but into a temporary directory removed after that
  shard: one shard at a time, the dataset left as it was. A raw shard beside its compressed one is
  read as it is. A shard whose file (raw, or decompressed) is not the size index.json lists is
  refused.
  **Splits.** llm-foundry's convert scripts write ``ROOT/train/index.json`` and
  ``ROOT/val/index.json``, and its streams read them as ``local: ROOT, split: train``. So
  ``--datasets name=ROOT/train`` measures that split (the stream's ``local`` is then that
  directory), and ``name=ROOT`` with no index.json of its own but exactly one split subfolder
  measures that one (the stream says ``split``); a ROOT with several splits is refused, naming
  them, because which split training reads is the user's choice
  (:func:`~mergeopt.export.mixture_input.mds_split`). A ROOT with its own index.json is what that
  index lists, as streaming reads it without a split: a ``merge_index`` root lists every
  subfolder's shards under basenames like ``train/shard.00000.mds``.
- a **Megatron indexed dataset**: ``PREFIX`` with ``PREFIX.bin`` and ``PREFIX.idx`` (or either file).
  Read with megatron-core's ``IndexedDataset``, whose index is memory-mapped: samples are documents
  (``document_indices``), tokens the sum of the sequence lengths; a ``.bin`` whose size disagrees
  with its index is refused.
- **OLMo token files**: a ``.npy`` file or a glob of them (``'dir/*.npy'``, quoted; OLMo-core expands
  globs in ``paths`` the same way, sorted): raw token-id arrays with every document ended by the
  EOS id, as the Dolma toolkit writes them. Tokens are ``file size // itemsize`` (what OLMo-core
  counts), documents the EOS ids, counted over a ``np.memmap`` in chunks: OLMo-core's own
  ``iter_document_indices`` builds a mask of the whole array, a byte per token. The file says
  neither its dtype nor its EOS id, so they come from ``--token-dtype`` and ``--eos-id``, else from
  the tokenizer (its EOS id; the smallest unsigned dtype that holds its vocabulary, OLMo-core's
  ``NumpyDatasetConfig.get_dtype`` rule). A file that does not end with that EOS id (a wrong dtype
  or id reads it so), an ``np.save`` file, or a size that is not whole tokens is refused.

No tokenizer is loaded for stored ids. The libraries are optional: without one, a single line
says what to pip install. Nothing is loaded whole into memory (a compressed MDS shard is
decompressed whole, as streaming does, but one shard at a time).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergeopt.errors import UserError
from mergeopt.export.mixture_input import MDS_INDEX, is_mds, is_megatron_prefix, mds_split, megatron_prefix

BATCH = 1000  # records tokenised per call and samples between Ctrl-C checks

TOKEN_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int32", "int64")  # --token-dtype
MDS_TOKEN_COLUMNS = ("tokens", "input_ids")  # llm-foundry's pretraining and fine-tuning ids
MDS_BYTES_DTYPE = "int64"  # llm-foundry's default token_encoding_type for a bytes column
NPY_MAGIC = b"\x93NUMPY"  # what np.save writes first
CHUNK = 1 << 24  # tokens compared with the EOS id at a time
DECOMPRESSED = "shard.mds"  # a compressed shard's raw file, in its temporary directory


@dataclass(frozen=True)
class TokenFiles:
    """How stored token ids are read where the files do not say (``--token-dtype``, ``--eos-id``)."""

    dtype: str | None = None
    eos_id: int | None = None

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in TOKEN_DTYPES:
            raise UserError(
                f"--token-dtype {self.dtype}: token ids are stored as one of {', '.join(TOKEN_DTYPES)}"
            )
        if self.eos_id is not None and self.eos_id < 0:
            raise UserError(f"--eos-id {self.eos_id}: a token id is not negative")


def kind_of(path: Path) -> str | None:
    """'mds', 'megatron' or 'olmo' for data in a trainer's own format; None for records (JSONL ...)."""
    if "*" in str(path) or path.suffix == ".npy":
        return "olmo"
    if is_mds(path):
        return "mds"
    if path.suffix in (".bin", ".idx") or is_megatron_prefix(path):
        return "megatron"
    return None


def measure(
    kind: str,
    path: Path,
    tokenizer: Callable[[], Any],
    options: TokenFiles,
    count_text: Callable[[list[dict[str, Any]]], int],
) -> tuple[int, int]:
    """(samples, tokens) of ``path`` in format ``kind``. ``tokenizer()`` is called only where the
    files say it is needed; ``count_text(records)`` counts the tokens of records holding text as
    :mod:`mergeopt.export.token_stats` counts JSONL (which calls this module: the dependency runs
    one way)."""
    if kind == "mds":
        samples, tokens = _mds(path, options, count_text)
    elif kind == "megatron":
        samples, tokens = _megatron(path)
    else:
        samples, tokens = _olmo(path, tokenizer, options)
    if samples == 0:
        raise UserError(f"{path}: the dataset is empty")
    if tokens == 0:
        raise UserError(f"{path}: every record tokenises to nothing")
    return samples, tokens


# ----------------------------------------------------------------------------- MDS (streaming)


# what an MDS read imports, as requirements/export-frameworks.txt pins it: streaming's module
# ``snappy`` is the package python-snappy (PyPI's ``snappy`` is another program), and streaming's
# declared requirements (a CUDA torch, transformers<5) would replace the environment
STREAMING_PACKAGES = "mosaicml-streaming==0.13.0 brotli python-snappy cramjam zstd catalogue"


@contextmanager
def _without_vision() -> Iterator[None]:
    """streaming's package imports its vision datasets, hence torchvision, which no MDS read needs
    and which the README's ``--no-deps`` install of streaming lacks (its declared torchvision would
    replace torch). While streaming is first imported without torchvision, an empty
    ``streaming.vision`` stands in; it is removed after, so an import of streaming.vision itself
    still fails as it would have."""
    stand_in = (
        "streaming" not in sys.modules
        and "streaming.vision" not in sys.modules
        and importlib.util.find_spec("torchvision") is None
    )
    if stand_in:
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
    try:
        yield
    finally:
        if stand_in:
            sys.modules.pop("streaming.vision", None)


def _streaming_format():
    """streaming's shard readers (and its decompression); a missing package, or a missing
    dependency of it, is one line naming what to install."""
    try:
        with _without_vision():
            from streaming.base import compression  # noqa: F401  (read by _readable)
            from streaming.base import format as mds
    except ModuleNotFoundError as err:
        raise UserError(
            f"reading an MDS directory needs MosaicML streaming and its dependencies ({err.name} "
            f"is missing): pip install --no-deps {STREAMING_PACKAGES} (without --no-deps, streaming's "
            "own requirements would replace torch and transformers)"
        ) from None
    return mds


def _unreadable_index(path: Path, err: Exception) -> UserError:
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    return UserError(f"{path / MDS_INDEX}: not a readable MDS index ({detail})")


def _shards(path: Path) -> list[tuple[Any, dict]]:
    """Each shard's reader and its entry in index.json (a compressed shard's reader is made anew
    over its decompressed file)."""
    try:
        index = json.loads((path / MDS_INDEX).read_text())
        infos = index["shards"] if isinstance(index, dict) else None
        assert isinstance(infos, list), "no list of shards"
    except (OSError, ValueError, KeyError, AssertionError) as err:
        raise _unreadable_index(path, err) from None
    other = {info.get("format") for info in infos if isinstance(info, dict)} - {"mds", None}
    if other:  # streaming's json and csv shards: llm-foundry's text datasets read MDS
        raise UserError(
            f"{path / MDS_INDEX}: shards in streaming's {', '.join(sorted(map(str, other)))} format, not MDS"
        )
    mds = _streaming_format()
    try:
        shards = [(mds.reader_from_json(str(path), "", info), info) for info in infos]
        for shard, _ in shards:
            shard.validate(allow_unsafe_types=False)
    except Exception as err:  # not JSON, not streaming's index, or an unsafe (pickled) column
        raise _unreadable_index(path, err) from None
    return shards


@contextmanager
def _readable(path: Path, shard, info: dict) -> Iterator[Any]:
    """``shard``'s reader over a raw file: its own, else its compressed file decompressed with
    streaming's ``decompress`` into a temporary directory, removed when the shard is read."""
    raw_info, zip_info = shard.file_pairs[0]
    raw = path / raw_info.basename
    if raw.is_file():
        size = raw.stat().st_size
        if size != raw_info.bytes:  # a copy cut short: streaming would read past its end
            raise UserError(f"{raw}: {size:,} bytes, but index.json lists {raw_info.bytes:,} for this shard")
        yield shard
        return
    zipped = path / zip_info.basename if zip_info is not None else None
    if zipped is None or not zipped.is_file():
        also = f" (nor its compressed {zip_info.basename})" if zip_info is not None else ""
        raise UserError(f"{path}: shard {raw_info.basename} is missing{also}")
    from streaming.base.compression import decompress

    try:
        data = decompress(shard.compression, zipped.read_bytes())
    except Exception as err:  # corrupt or cut short, or a compression streaming does not know
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{zipped}: not a readable {shard.compression} shard ({detail})") from None
    if len(data) != raw_info.bytes:
        raise UserError(
            f"{zipped}: decompresses to {len(data):,} bytes, but index.json lists {raw_info.bytes:,} "
            "for its shard"
        )
    with tempfile.TemporaryDirectory(prefix="mergeopt-mds-") as tmp:
        Path(tmp, DECOMPRESSED).write_bytes(data)
        del data
        raw_data = {**info["raw_data"], "basename": DECOMPRESSED}
        yield _streaming_format().reader_from_json(tmp, "", {**info, "raw_data": raw_data})


def _samples(path: Path, shards: list[tuple[Any, dict]]) -> Iterator[dict[str, Any]]:
    from mergeopt.runtime.interrupts import check_interrupt

    for shard, info in shards:
        with _readable(path, shard, info) as reader:
            for i, sample in enumerate(reader):
                if i % BATCH == 0:
                    check_interrupt(f"counting the tokens of {path}")
                yield sample


def _stored_ids(value, where: str, dtype: np.dtype) -> int:
    if isinstance(value, bytes):
        if len(value) % dtype.itemsize:
            raise UserError(
                f"{where}: {len(value)} bytes are not whole {dtype.name} token ids (set --token-dtype)"
            )
        return len(value) // dtype.itemsize
    if isinstance(value, np.ndarray | list | tuple):
        return len(value)
    raise UserError(f"{where}: token ids must be bytes, an ndarray or a list, not {type(value).__name__}")


def _mds(
    path: Path, options: TokenFiles, count_text: Callable[[list[dict[str, Any]]], int]
) -> tuple[int, int]:
    from mergeopt.objectives.data import validated_record

    split = mds_split(path)  # a root of one split is read as the stream reads it, local/split
    path = path / split if split else path
    shards = _shards(path)
    names = set(shards[0][0].column_names) if shards else set()
    column = next((c for c in MDS_TOKEN_COLUMNS if c in names), None)
    dtype = np.dtype(options.dtype or MDS_BYTES_DTYPE)
    samples, tokens, batch = 0, 0, []
    for sample in _samples(path, shards):
        samples += 1
        where = f"{path}: sample {samples}"
        if column is not None:
            tokens += _stored_ids(sample.get(column), where, dtype)
            continue
        batch.append(validated_record({k: v for k, v in sample.items() if v is not None}, where))
        if len(batch) == BATCH:
            tokens += count_text(batch)
            batch = []
    if batch:
        tokens += count_text(batch)
    return samples, tokens


# ----------------------------------------------------------------------------- Megatron


def _megatron(path: Path) -> tuple[int, int]:
    prefix = megatron_prefix(path)
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise UserError(f"{path}: a Megatron indexed dataset needs {prefix}{suffix}, which is missing")
    try:
        with warnings.catch_warnings():  # megatron.core warns that Transformer Engine is absent
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ModuleNotFoundError as err:
        raise UserError(
            f"reading a Megatron indexed dataset needs megatron-core ({err.name} is missing): "
            "pip install megatron-core"
        ) from None
    dataset = IndexedDataset.__new__(IndexedDataset)
    try:
        dataset.__init__(str(prefix), mmap=True)
        index = dataset.index
        tokens = int(index.sequence_lengths.sum(dtype=np.int64))
        documents = max(len(index.document_indices) - 1, 0)
        expected = tokens * index.dtype_size
    except Exception as err:  # a bad header or version, an index shorter than its counts
        # megatron's __del__ deletes both readers, which a failed __init__ never set: its
        # AttributeError was printed as "Exception ignored ..." with a traceback under the line
        for reader in ("bin_reader", "index"):
            dataset.__dict__.setdefault(reader, None)
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{prefix}.idx: not a readable Megatron index ({detail})") from None
    size = Path(f"{prefix}.bin").stat().st_size
    if size != expected:
        raise UserError(
            f"{prefix}.bin holds {size:,} bytes, but its .idx lists {tokens:,} tokens ({expected:,} bytes)"
        )
    return documents, tokens


# ----------------------------------------------------------------------------- OLMo token files


def _olmo_files(path: Path) -> list[Path]:
    if "*" not in str(path):
        return [path]
    files = [Path(f) for f in sorted(glob.glob(str(path))) if Path(f).is_file()]
    if not files:
        raise UserError(f"{path}: the glob matches no file")
    return files


def _olmo_layout(path: Path, tokenizer: Callable[[], Any], options: TokenFiles) -> tuple[np.dtype, int]:
    """The dtype and EOS id of OLMo token files: the flags, else the tokenizer's, never a guess."""
    if options.dtype is not None and options.eos_id is not None:
        return np.dtype(options.dtype), options.eos_id
    try:
        tok = tokenizer()
    except UserError:
        tok = None
    if tok is None:
        raise UserError(
            f"{path}: OLMo token files do not say their dtype or EOS id: pass --token-dtype and "
            "--eos-id, or --tokenizer (its EOS id, and the smallest dtype that holds its vocabulary)"
        )
    eos = options.eos_id if options.eos_id is not None else tok.eos_token_id
    if eos is None:
        raise UserError(f"{path}: the tokenizer has no EOS token to split OLMo token files on: pass --eos-id")
    if options.dtype is not None:
        return np.dtype(options.dtype), int(eos)
    top = len(tok) - 1  # OLMo-core's NumpyDatasetConfig.get_dtype: the smallest that holds every id
    dtype = next(np.dtype(d) for d in TOKEN_DTYPES[:4] if top <= np.iinfo(d).max)
    return dtype, int(eos)


def _olmo(path: Path, tokenizer: Callable[[], Any], options: TokenFiles) -> tuple[int, int]:
    from mergeopt.runtime.interrupts import check_interrupt

    files = _olmo_files(path)
    dtype, eos = _olmo_layout(path, tokenizer, options)
    documents, tokens = 0, 0
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: no such token file")
        size = file.stat().st_size
        with file.open("rb") as handle:
            if handle.read(len(NPY_MAGIC)) == NPY_MAGIC:
                raise UserError(
                    f"{file} is an np.save file, but OLMo-core reads raw token arrays (np.memmap, no "
                    "header): write the ids with ndarray.tofile"
                )
        if size % dtype.itemsize:
            raise UserError(f"{file}: {size:,} bytes are not whole {dtype.name} tokens (check --token-dtype)")
        if size == 0:
            continue
        ids = np.memmap(file, dtype=dtype, mode="r")
        if int(ids[-1]) != eos:
            raise UserError(
                f"{file}: read as {dtype.name}, it does not end with the EOS id {eos} that ends every "
                "document (check --token-dtype and --eos-id)"
            )
        for start in range(0, len(ids), CHUNK):
            check_interrupt(f"counting the documents of {file}")
            documents += int(np.count_nonzero(ids[start : start + CHUNK] == eos))
        tokens += len(ids)
        del ids
    return documents, tokens
