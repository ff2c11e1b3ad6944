"""OLMo-core: a ``SourceMixtureDatasetConfig`` with one ``SourceMixtureConfig`` per domain.

Followed: allenai/OLMo-core src/olmo_core/data/source_mixture.py (commit 004bb467):
``SourceMixtureConfig(source_name, target_ratio, paths, max_repetition_ratio=1.0,
max_source_fraction=1.0)`` requires 0 < target_ratio <= 1 and max_repetition_ratio >= 1;
``SourceMixtureList(sources)`` requires the target ratios to sum to 1 (``np.allclose``);
``SourceMixtureDatasetConfig(source_list, requested_tokens, global_batch_size, ...)`` selects
``int(requested_tokens * target_ratio)`` tokens of each source and fails when that exceeds
``tokens_available * max_source_fraction * max_repetition_ratio``. OLMo-core counts tokens of its
pre-tokenized numpy files, so target_ratio is a token share: mergeopt writes the fitted token
shares. With a budget it sets ``requested_tokens`` and each ``max_repetition_ratio`` to what the
budget needs (at least 1), measured from ``--datasets``: the token files themselves
(:mod:`mergeopt.export.token_files`, OLMo-core's own count, EOS included), or records counted with
the run's tokenizer; ``global_batch_size`` is the trainer's to set. ``paths`` are what ``--datasets`` gave: point them at the tokenized .npy files.
Those are raw token arrays, not ``np.save`` files: OLMo-core counts ``file size // itemsize`` tokens
and reads them with ``np.memmap(path, dtype)`` at offset 0 (src/olmo_core/data/utils.py), so a file
with a NumPy header would have its header read as tokens; such a path is refused here. Checked
against ai2-olmo-core 3.0.0, whose ``build(npdtype=, sequence_length=)`` then rounds each source to
whole ``sequence_length`` instances filling ``ceil(requested_tokens / global_batch_size)`` batches.
"""

from __future__ import annotations

import math

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats.base import Context, Format

NPY_MAGIC = b"\x93NUMPY"  # what np.save writes first


def _check_token_files(ctx: Context) -> None:
    """Refuse an ``np.save`` file: OLMo-core would read its header as tokens."""
    for name in ctx.plan.names:
        path = ctx.datasets[name]
        if path.is_file():
            with path.open("rb") as handle:
                if handle.read(len(NPY_MAGIC)) == NPY_MAGIC:
                    raise UserError(
                        f"--to olmo-core: source {name!r}: {path} is an np.save file, but OLMo-core reads "
                        "raw token arrays (np.memmap, no header): write the ids with ndarray.tofile"
                    )


def render(ctx: Context) -> str:
    plan = ctx.plan
    _check_token_files(ctx)
    repetition = plan.repetition or {}
    sources = []
    for name in plan.names:
        ratio = repetition.get(name, 1.0)
        sources.append(
            {
                "source_name": name,
                "target_ratio": plan.token_shares[name],
                "paths": [str(ctx.datasets[name])],
                # rounded up, so OLMo-core's int(tokens * ratio) still covers what the budget needs
                "max_repetition_ratio": max(1.0, math.ceil(ratio * 1000) / 1000),
            }
        )
    config: dict = {"source_list": {"sources": sources}}
    lines = [ctx.header(FORMAT)]
    for name in plan.names:
        if ctx.datasets[name].suffix != ".npy":
            lines.append(
                f"# {name}: OLMo-core reads token ids from .npy files: tokenize {ctx.datasets[name]}"
            )
    if plan.total_tokens is not None:
        config["requested_tokens"] = plan.total_tokens
    else:
        lines.append("# set requested_tokens (a --budget-tokens sets it)")
    lines.append("# set global_batch_size (tokens per step, a multiple of the sequence length)")
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="olmo-core",
    filename="olmo_core.yaml",
    unit="tokens",
    needs_paths=True,
    meaning="target_ratio: each source's share of requested_tokens (sum 1).",
    render=render,
)
