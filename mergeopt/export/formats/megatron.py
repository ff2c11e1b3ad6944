"""Megatron-LM ``--data-path`` and NeMo ``model.data.data_prefix``: weight-prefix pairs.

Followed: NVIDIA/Megatron-LM megatron/core/datasets/utils.py (commit 00caa53a)
``get_blend_from_list`` (a flattened list ``["30", "path/to/dataset_1_prefix", "70",
"path/to/dataset_2_prefix"]`` parses into weights and prefixes) and ``normalize`` (weights divided
by their sum), and the ``--data-path`` help "a list of weight prefix pairs e.g. weight1 prefix1
weight2 prefix2"; NVIDIA/NeMo examples/nlp/language_modeling/conf/megatron_gpt_config.yaml (commit
382c533a), whose ``model.data.data_prefix`` is the same flattened list (``[.5, path0, .5, path1]``).
The blended dataset draws fixed-length sequences of ``seq_length`` tokens in proportion to the
weights, so the weights are token shares: mergeopt writes the fitted token shares. Each path must be
the prefix of an indexed dataset (``PREFIX.bin``/``PREFIX.idx`` from tools/preprocess_data.py); a
``.bin`` or ``.idx`` given to ``--datasets`` is cut to its prefix.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from mergeopt.export.formats.base import Context, Format


def prefix(path: Path) -> str:
    text = str(path)
    return text[: -len(path.suffix)] if path.suffix in (".bin", ".idx") else text


def _pairs(ctx: Context) -> list[tuple[float, str]]:
    return [(ctx.plan.token_shares[n], prefix(ctx.datasets[n])) for n in ctx.plan.names]


def _notes(ctx: Context) -> list[str]:
    lines = []
    for name in ctx.plan.names:
        path = prefix(ctx.datasets[name])
        if not (Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()):
            lines.append(f"# {name}: {path} has no .bin/.idx: write the prefix of its preprocessed dataset")
    if ctx.plan.total_tokens is not None:
        lines.append(
            f"# --train-samples = {ctx.plan.total_tokens} / seq_length (sequences of seq_length tokens)"
        )
    return lines


def render_megatron(ctx: Context) -> str:
    words = ["--data-path"]
    for weight, path in _pairs(ctx):
        words += [repr(weight), shlex.quote(path)]
    return "\n".join([ctx.header(MEGATRON), *_notes(ctx), " ".join(words)]) + "\n"


def render_nemo(ctx: Context) -> str:
    flat: list = []
    for weight, path in _pairs(ctx):
        flat += [weight, path]
    body = yaml.safe_dump({"model": {"data": {"data_prefix": flat}}}, sort_keys=False)
    return "\n".join([ctx.header(NEMO), *_notes(ctx)]) + "\n" + body


_MEANING = "weights: each dataset's share of training tokens (Megatron normalizes them to sum 1)."
MEGATRON = Format(
    name="megatron",
    filename="megatron_data_path.txt",
    unit="tokens",
    needs_paths=True,
    meaning=_MEANING,
    render=render_megatron,
)
NEMO = Format(
    name="nemo",
    filename="nemo_data.yaml",
    unit="tokens",
    needs_paths=True,
    meaning=_MEANING,
    render=render_nemo,
)
