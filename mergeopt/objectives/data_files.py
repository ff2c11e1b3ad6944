"""Data files read through the ``datasets`` library: dev sets, training sets and the datasets an export measures.

JSONL is what mergeopt's own dev sets are written in, and it is read line by line
(:func:`jsonl_records`, through :func:`mergeopt.objectives.data.read_jsonl`: errors name the line);
data kept the way the ``datasets`` library writes it (parquet, arrow, CSV, a JSON array, a
``save_to_disk`` directory) is read here, by that library, so a dev set, a ``mergeopt train``
training set and the dataset an export counts are the same rows. A JSON Lines file the library
cannot read is named by its line all the same (:func:`load`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergeopt.errors import UserError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class Source:
    """How a dataset is loaded: ``load_dataset(loader, data_files=files)``, or ``load_from_disk(path)``."""

    path: Path
    loader: str  # json | csv | parquet | arrow | disk
    data_files: tuple[str, ...] = ()


def source_of(path: Path) -> Source:
    """The loader for a path, from its suffix, or from the files ``save_to_disk`` writes."""
    path = Path(path).resolve()
    if path.is_dir():
        if (path / "state.json").is_file():
            return Source(path, "disk", _shards(path))
        if (path / "dataset_dict.json").is_file():
            if not (path / "train" / "state.json").is_file():
                raise UserError(f"{path}: a saved DatasetDict without a 'train' split")
            train = path / "train"
            return Source(train, "disk", _shards(train))
        raise UserError(
            f"{path}: a directory that is neither a saved dataset (state.json, dataset_dict.json) "
            "nor an MDS directory (index.json); for OLMo token files give a glob, 'DIR/*.npy'"
        )
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise UserError(
            f"{path}: cannot read {suffix or 'a file without a suffix'} data "
            "(mergeopt reads .jsonl, .json, .csv, .parquet, .arrow or a save_to_disk directory)"
        )
    return Source(path, LOADERS[suffix], (str(path),))


def _shards(saved: Path) -> tuple[str, ...]:
    """The arrow files that hold a ``save_to_disk`` dataset's rows, as its state.json lists them.

    Not every ``*.arrow`` file there: ``load_from_disk`` datasets write their caches beside them
    (``cache-<fingerprint>.arrow``, from ``shuffle``, ``map``, ``filter``: an ``indices`` table or
    transformed rows), which a trainer given them as ``data_files`` would read as data."""
    try:
        listed = json.loads((saved / "state.json").read_text())["_data_files"]
        return tuple(str(saved / entry["filename"]) for entry in listed)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{saved / 'state.json'}: not a save_to_disk state (no readable _data_files: {err})"
        ) from None


def load(source: Source, cache_dir: str | None = None):
    """The dataset as a ``datasets.Dataset`` (one split: 'train').

    A file the library cannot read is one :class:`UserError`; for JSON Lines it names the file and
    the line, as a dev set's does (:func:`jsonl_records`), where the library's own message numbers
    the rows from 0 in a log line of its own, which is kept quiet here.
    """
    import datasets

    try:
        with quiet_datasets():
            if source.loader == "disk":
                return datasets.load_from_disk(str(source.path))
            options = _csv_as_text(source) if source.loader == "csv" else {}
            return datasets.load_dataset(
                source.loader,
                data_files=list(source.data_files),
                split="train",
                cache_dir=cache_dir,
                **options,
            )
    except Exception as err:  # a malformed file: say which, in one line
        failure = " ".join(str(err).split())
    if source.loader == "json":
        for name in source.data_files:
            if not is_json_array(Path(name)):
                for _ in jsonl_records(Path(name)):  # the first bad line raises, naming it
                    pass
    raise UserError(f"{source.path}: cannot be read as {source.loader} data ({failure})")


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """The ``datasets`` library without its progress bars and log lines (it logs a malformed file
    before raising, and the error is said once, by mergeopt), as it was set afterwards. Reading a
    local file is a second's work whose bars would only crowd the console, --quiet's included."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (of records) rather than JSON Lines."""
    with path.open("rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Each JSON object of a JSON Lines file with its 1-based line number (blank lines skipped).

    A line that is not UTF-8, not JSON or not an object is a :class:`UserError` naming
    ``path:line``, the one wording for dev sets, training sets and the datasets an export counts.
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (is this a JSONL file?)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: a record must be a JSON object")
            yield lineno, record


def _csv_as_text(source: Source) -> dict:
    """Read every CSV cell as the text it holds: pandas would read "4" as a number and "NA", "null"
    or an empty cell as missing, and a completion is text."""
    import csv

    import datasets

    with open(source.data_files[0], newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}
