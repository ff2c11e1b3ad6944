"""Fingerprints of what a run read, so a resumed run refuses inputs that changed under it.

A checkpoint's recipe says *which* files a run read, not *what* they held: a dev set edited, or an
expert retrained into the same directory, between a kill and its rerun would silently continue the
old trajectory on new data. :func:`input_fingerprints` records a digest per input, and
:func:`first_changed` names the first one that no longer matches.

Size and modification time are not enough (a copy or ``git checkout`` keeps a size and sets any
time), so contents are hashed, cheaply:

* a data file (JSONL): all of its bytes;
* a checkpoint directory: every small file whole (config, tokenizer, adapter config) and, for each
  weight file, its size, its safetensors header (names, dtypes, shapes, offsets) and three 64 KiB
  samples of its data (start, middle, end). Retraining changes nearly every tensor, so the samples
  catch it without reading gigabytes.

Paths that are not on this machine (a Hugging Face hub id) are left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

SAMPLE = 64 * 2**10
WHOLE_FILE_LIMIT = 2**20  # files in a checkpoint directory up to this size are hashed whole
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _whole(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            yield chunk


def _weights(path: Path) -> Iterable[bytes]:
    """Size, the safetensors header (when it is one) and three samples of the data."""
    size = path.stat().st_size
    yield str(size).encode()
    with open(path, "rb") as handle:
        head = handle.read(8)
        yield head
        if path.suffix == ".safetensors" and len(head) == 8:
            n = int.from_bytes(head, "little")
            if 0 < n <= size - 8:
                yield handle.read(n)
        for offset in (0, max(size // 2 - SAMPLE // 2, 0), max(size - SAMPLE, 0)):
            handle.seek(offset)
            yield handle.read(SAMPLE)


def digest(path: str | Path) -> str | None:
    """The digest of a data file or a checkpoint directory (None when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return _sha(_weights(path) if path.suffix in WEIGHT_SUFFIXES else _whole(path))
    if not path.is_dir():
        return None
    parts = []
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = item.relative_to(path).as_posix()
        if item.suffix in WEIGHT_SUFFIXES or item.stat().st_size > WHOLE_FILE_LIMIT:
            parts.append(f"{relative}:{_sha(_weights(item))}")
        else:
            parts.append(f"{relative}:{_sha(_whole(item))}")
    return _sha(p.encode() for p in parts)


def fingerprints(paths: Iterable[str | Path]) -> dict[str, str]:
    """{path: digest} of each local path of ``paths``, once each, in their order."""
    found = {}
    for path in dict.fromkeys(str(p) for p in paths):
        value = digest(path)
        if value is not None:
            found[path] = value
    return found


def input_fingerprints(recipe, training_data: bool = True) -> dict[str, str]:
    """{path: digest} of every local file a run of ``recipe`` (world paths resolved) reads; without
    ``training_data`` (``train.data``, which sizes the constraints, never a proxy's value) for the
    proxy's journals that calibrate keeps from round to round."""
    paths = [recipe.model.base, *recipe.model.experts.values(), *(d.path for d in recipe.data.dev)]
    if recipe.train is not None and training_data:
        paths += list(recipe.train.data.values())
    if recipe.data.chat_template is not None:
        paths.append(recipe.data.chat_template)
    return fingerprints(paths)


def first_changed(saved: Mapping[str, str], now: Mapping[str, str] | None = None) -> str | None:
    """The first recorded input whose digest differs now (or that is gone); None when all match.

    ``now``: digests already taken this run (a command that checks many records against the same
    inputs hashes each once); a path it lacks is hashed here.
    """
    for path, value in saved.items():
        current = now[path] if now is not None and path in now else digest(path)
        if current != value:
            return path
    return None
