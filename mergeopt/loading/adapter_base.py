"""Is a LoRA adapter stacked on the base it was trained on? Checked by fit and plan alike.

PEFT writes the base's path or hub name into ``adapter_config.json``. An adapter named after
another local directory than the recipe's base was trained on another model: merged anyway, its
update would be applied to weights it never saw. But teams copy a base to local NVMe or to each
node's disk, so another path is not proof of another model: a directory whose config.json and
weight files are the same as the base's (sizes, and bytes sampled at each file's start, middle and
end) is taken for a copy. A hub name (``owner/name``) is compared only where the base itself says which
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
    relative = "" if Path(named).is_absolute() else f" ({named_dir}, read from the current directory)"
    raise UserError(
        f"expert {expert!r} ({adapter}) is a LoRA adapter trained on {named}{relative}, not on the base "
        f"{base} (which is not a copy of it: config.json or the weight files differ)"
    )
