"""Is a LoRA adapter stacked on the base it was trained on? Checked by fit and plan alike.

PEFT writes the base's path or hub name into ``adapter_config.json``. An adapter named after
another local directory than the recipe's base was trained on another model: merged anyway, its
update would be applied to weights it never saw. But teams copy a base to local NVMe or to each
node's disk, so another path is not proof of another model: a directory whose config.json and
weight files are the same as the base's (sizes, and bytes sampled at each file's start, middle and
end) is taken for a copy; so is the base saved after adding tokens to it (resized: the same tensors
and sampled rows, more vocabulary rows), which a LoRA trained over the resized model needs. A hub name (``owner/name``) is compared only where the base itself says which
repository it is: a snapshot of the Hugging Face cache (``models--owner--name/snapshots/<revision>``,
where `hf download` without ``--local-dir`` puts it). Elsewhere it is not checked: nothing is
downloaded to compare.
"""

from __future__ import annotations

from pathlib import Path

from mergeopt.errors import UserError

SAMPLE_BYTES = 1 << 20  # per place sampled in each weight file: a copy shares them, a fine-tune does not
WEIGHT_PATTERNS = ("*.safetensors", "*.gguf")


def _weight_files(directory: Path) -> list[str]:
    return sorted(p.name for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern))


def _same_samples(a: Path, b: Path) -> bool:
    """Equal sizes, and equal bytes at the start (the header), the middle and the end."""
    size = a.stat().st_size
    if size != b.stat().st_size:
        return False
    starts = sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)})
    with a.open("rb") as fa, b.open("rb") as fb:
        for start in starts:
            fa.seek(start)
            fb.seek(start)
            if fa.read(SAMPLE_BYTES) != fb.read(SAMPLE_BYTES):
                return False
    return True


def is_copy(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same model: one config.json, the same weight
    files, each the same size with the same sampled bytes."""
    files = _weight_files(a)
    if not files or files != _weight_files(b):
        return False
    configs = [d / "config.json" for d in (a, b)]
    if any(not c.is_file() for c in configs) or configs[0].read_bytes() != configs[1].read_bytes():
        return False
    return all(_same_samples(a / name, b / name) for name in files)


# config.json keys a trainer changes when it adds tokens (TRL's pad or chat tokens): the rows, and
# which of them pads or ends; the model is otherwise the same
RESIZING_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
# config.json keys that say which transformers wrote it, not which model it is: a hub base saved by
# another version than the user's, or with ``torch_dtype`` renamed ``dtype`` (the tensors' dtypes are
# compared themselves)
WRITER_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


def _checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads from ``directory``: the index's shards, else
    model.safetensors; other ``*.safetensors`` beside them (Mistral's hub repositories ship their own
    format, consolidated.safetensors, with other tensor names) are not the model's."""
    import json

    try:
        index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        if shards and all(isinstance(s, str) for s in shards):
            return [directory / shard for shard in shards]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    return sorted(directory.glob("*.safetensors"))


def _tensor_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Name -> (shape, dtype, file) of every tensor of a checkpoint's safetensors files."""
    from mergeopt.inputs import safetensors_header

    return {
        name: (shape, dtype, file)
        for file in _checkpoint_files(directory)
        if file.is_file()
        for name, (shape, dtype) in safetensors_header(file).items()
    }


def _same_rows(a: Path, b: Path, names: dict[str, int]) -> bool:
    """Each tensor of ``names`` (name -> its rows) of files ``a`` and ``b`` equal in its first,
    middle and last rows (a fine-tune moves every matrix; a resize keeps the old rows). Each file
    is opened once: opening one per tensor parses its header again for every tensor, minutes for
    a mixture-of-experts checkpoint's thousands of tensors per shard."""
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for name, rows in names.items():
            first, second = fa.get_slice(name), fb.get_slice(name)
            if len(first.get_shape()) == 0:
                if not bool((fa.get_tensor(name) == fb.get_tensor(name)).all()):
                    return False
                continue
            for row in sorted({0, rows // 2, rows - 1}):
                if not (first[row : row + 1] == second[row : row + 1]).all():
                    return False
    return True


def is_resized_copy(named: Path, base: Path) -> bool:
    """Whether ``base`` is ``named`` with rows added to its vocabulary (``resize_token_embeddings``
    after adding tokens, saved): config.json the same but for :data:`RESIZING_KEYS` (in the keys
    both have, less :data:`WRITER_KEYS`: the user's transformers re-saves a hub base's), every tensor
    of the same name and dtype, of the same shape or more rows where the vocabulary grew, and the
    same sampled rows. A LoRA trained over the resized model names the original in
    ``base_model_name_or_path`` (PEFT records the path it was loaded from) and saves its own
    embeddings of the new size, which only the resized base can hold."""
    import json

    try:
        configs = [json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (named, base)]
    except (OSError, ValueError):
        return False
    if not all(isinstance(c, dict) for c in configs):
        return False
    # keys both files have: a transformers that re-saves an older one's config renames some
    # (rope_theta into rope_parameters) and writes its own version
    shared = (set(configs[0]) & set(configs[1])) - set(RESIZING_KEYS) - set(WRITER_KEYS)
    rows = [c.get("vocab_size") for c in configs]
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        return False  # no vocabulary size at the top (a multimodal text_config): not told here
    grown = rows[1] - rows[0]
    if any(configs[0][k] != configs[1][k] for k in shared) or grown <= 0:
        return False
    first, second = _tensor_shapes(named), _tensor_shapes(base)
    if not first or set(first) != set(second):
        return False
    pairs: dict[tuple[Path, Path], dict[str, int]] = {}  # the tensors to sample, by their two files
    for name, (shape, dtype, file) in first.items():
        other_shape, other_dtype, other_file = second[name]
        if dtype != other_dtype or len(shape) != len(other_shape) or shape[1:] != other_shape[1:]:
            return False
        if shape and other_shape[0] not in (shape[0], shape[0] + grown):
            return False
        pairs.setdefault((file, other_file), {})[name] = shape[0] if shape else 0
    return all(_same_rows(a, b, names) for (a, b), names in pairs.items())


def cached_repository(directory: Path) -> str | None:
    """``owner/name`` of a snapshot directory in the Hugging Face cache
    (``.../models--owner--name/snapshots/<revision>``), else None."""
    parts = directory.resolve().parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    return parts[-3].removeprefix("models--").replace("--", "/")


def check_adapter_base(named: str | None, adapter: Path, base: Path, expert: str) -> None:
    """``named`` (the adapter's ``base_model_name_or_path``), when a local directory, must be the
    recipe's base or a copy of it; when a hub name, the repository of a base in the hub's cache."""
    if not named:
        return
    if not Path(named).is_dir():
        repository = cached_repository(base)
        if repository is not None and named.strip("/").lower() != repository.lower():
            raise UserError(
                f"expert {expert!r} ({adapter}) is a LoRA adapter trained on {named}, not on the base "
                f"{base} (a snapshot of {repository} in the Hugging Face cache)"
            )
        return
    named_dir = Path(named).resolve()
    if not (named_dir / "config.json").is_file():  # no checkpoint there now (a relative name read
        return  # from another directory than the trainer's, or a base since moved): nothing to compare
    if named_dir == base.resolve() or is_copy(named_dir, base.resolve()):
        return
    if is_resized_copy(named_dir, base.resolve()):  # the base the adapter's training resized, saved
        return
    relative = "" if Path(named).is_absolute() else f" ({named_dir}, read from the current directory)"
    raise UserError(
        f"expert {expert!r} ({adapter}) is a LoRA adapter trained on {named}{relative}, not on the base "
        f"{base} (which is not a copy of it: config.json or the weight files differ)"
    )
