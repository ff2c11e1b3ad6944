"""Fingerprints of what a run read, so a resumed run refuses inputs that changed under it.

A checkpoint's recipe says *which* files a run read, not *what* they held: a dev set edited, or an
expert retrained into the same directory, between a kill and its rerun would silently continue the
old trajectory on new data. :func:`input_fingerprints` records a digest per input, and
:func:`first_changed` names the first one that no longer matches.

Size and modification time are not enough (a copy or ``git checkout`` keeps a size and sets any
time), so contents are hashed, cheaply:

* a data file (JSONL): all of its bytes;
* a checkpoint directory: every small file whole (config, tokenizer, adapter config) and, for each
  weight file, its size, its safetensors header (names, dtypes, shapes, offsets), three 64 KiB
  samples of its data (start, middle, end) and the first 4 KiB of every tensor. Retraining changes
  every tensor it trains, and a fine-tune that trains some of them (the MLP only, a LoRA on q and v
  merged in) leaves the three samples on frozen ones as often as not; a few KiB per tensor catch
  it without reading gigabytes.

Digests taken before the per-tensor samples (no ``tensors:`` prefix) are checked the way they were
taken, so a checkpoint or a trained run recorded by an earlier mergeopt is not refused as changed.

Paths that are not on this machine (a Hugging Face hub id) are left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

SAMPLE = 64 * 2**10
TENSOR_SAMPLE = 4 * 2**10  # the start of every safetensors tensor
EACH_TENSOR = "tensors:"  # the prefix of a digest that samples each tensor (none: an earlier one)
WHOLE_FILE_LIMIT = 2**20  # files in a checkpoint directory up to this size are hashed whole
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
BYTECODE = "__pycache__"  # a directory's bytecode caches, left out of its digest


def _sha(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _whole(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            yield chunk


def _tensor_starts(handle, header: bytes, data_start: int) -> Iterable[bytes]:
    """The first :data:`TENSOR_SAMPLE` bytes of each tensor a safetensors header lists."""
    try:
        entries = json.loads(header)
    except ValueError:  # not a safetensors header after all: the three samples stand alone
        return
    if not isinstance(entries, dict):
        return
    spans = sorted(
        (v["data_offsets"][0], v["data_offsets"][1])
        for v in entries.values()
        if isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)  # "__metadata__" has none
        and len(v["data_offsets"]) == 2
        and all(isinstance(x, int) and x >= 0 for x in v["data_offsets"])
    )
    for begin, end in spans:
        handle.seek(data_start + begin)
        yield handle.read(min(TENSOR_SAMPLE, max(end - begin, 0)))


def _weights(path: Path, each_tensor: bool = True) -> Iterable[bytes]:
    """Size, the safetensors header (when it is one), three samples of the data and, with
    ``each_tensor``, the start of every tensor."""
    size = path.stat().st_size
    yield str(size).encode()
    with open(path, "rb") as handle:
        head = handle.read(8)
        yield head
        if path.suffix == ".safetensors" and len(head) == 8:
            n = int.from_bytes(head, "little")
            if 0 < n <= size - 8:
                header = handle.read(n)
                yield header
                if each_tensor:
                    yield from _tensor_starts(handle, header, 8 + n)
        for offset in (0, max(size // 2 - SAMPLE // 2, 0), max(size - SAMPLE, 0)):
            handle.seek(offset)
            yield handle.read(SAMPLE)


def digest(path: str | Path, each_tensor: bool = True) -> str | None:
    """The digest of a data file or a checkpoint directory (None when it does not exist); without
    ``each_tensor``, as mergeopt took it before it sampled every tensor (no prefix)."""
    path = Path(path)
    prefix = EACH_TENSOR if each_tensor else ""
    if path.is_file():
        return prefix + _sha(_weights(path, each_tensor) if path.suffix in WEIGHT_SUFFIXES else _whole(path))
    if not path.is_dir():
        return None
    parts = []
    # Python's bytecode caches are not inputs: importing an lm-eval task's ``!function`` code
    # writes __pycache__ beside it, so a digest taken before the task first loaded (a fit's
    # checkpoint, on fresh tasks) or of a copy without them would not match one taken after
    files = (p for p in path.rglob("*") if p.is_file() and BYTECODE not in p.relative_to(path).parts)
    for item in sorted(files):
        relative = item.relative_to(path).as_posix()
        if item.suffix in WEIGHT_SUFFIXES or item.stat().st_size > WHOLE_FILE_LIMIT:
            parts.append(f"{relative}:{_sha(_weights(item, each_tensor))}")
        else:
            parts.append(f"{relative}:{_sha(_whole(item))}")
    return prefix + _sha(p.encode() for p in parts)


def fingerprints(paths: Iterable[str | Path]) -> dict[str, str]:
    """{path: digest} of each local path of ``paths``, once each, in their order."""
    found = {}
    for path in dict.fromkeys(str(p) for p in paths):
        value = digest(path)
        if value is not None:
            found[path] = value
    return found


def input_fingerprints(recipe, training_data: bool = True) -> dict[str, str]:
    """{path: digest} of every local file a run of ``recipe`` (world paths resolved) reads, an lm-eval
    term's ``include_path`` included; without
    ``training_data`` (``train.data``, which sizes the constraints, never a proxy's value) for the
    proxy's journals that calibrate keeps from round to round."""
    paths = [recipe.model.base, *recipe.model.experts.values(), *(d.path for d in recipe.data.dev)]
    if recipe.train is not None and training_data:
        paths += list(recipe.train.data.values())
    if recipe.data.chat_template is not None:
        paths.append(recipe.data.chat_template)
    # an lm-eval term's local tasks (YAML, !function code, data kept beside them) decide its score
    paths += [t.include_path for t in recipe.objective.terms if t.kind == "lm_eval" and t.include_path]
    return fingerprints(paths)


def first_changed(saved: Mapping[str, str], now: Mapping[str, str] | None = None) -> str | None:
    """The first recorded input whose digest differs now (or that is gone); None when all match.

    ``now``: digests already taken this run (a command that checks many records against the same
    inputs hashes each once); a path it lacks is hashed here.
    """
    for path, value in saved.items():
        each_tensor = value.startswith(EACH_TENSOR)  # an earlier mergeopt's digest: taken its way
        if now is not None and path in now and each_tensor:
            current = now[path]
        else:
            current = digest(path, each_tensor)
        if current != value:
            return path
    return None
