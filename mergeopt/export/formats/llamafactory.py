"""LLaMA-Factory: the ``dataset``, ``mix_strategy`` and ``interleave_probs`` keys of a training YAML.

Followed: hiyouga/LLaMA-Factory src/llamafactory/hparams/data_args.py (commit 072bfe29, and the
same file in llamafactory 0.9.5 from PyPI): ``mix_strategy`` is one of ``concat``,
``interleave_under``, ``interleave_over`` (0.9.5 adds ``interleave_once``); ``interleave_probs`` is a
comma-separated string of probabilities, one per name in ``dataset`` (also comma-separated; each
item is stripped of spaces, so a name with a comma or edge spaces cannot be said), and is refused
with ``concat``. ``merge_dataset`` in src/llamafactory/data/data_utils.py hands them to
``datasets.interleave_datasets`` with ``stopping_strategy="first_exhausted"`` for
``interleave_under`` and ``"all_exhausted"`` for ``interleave_over``, so they are per-sample
probabilities: mergeopt writes the sample shares.
``dataset`` names entries of ``dataset_dir/dataset_info.json``; mergeopt uses the expert names, and
the header suggests each entry from the records' layout (src/llamafactory/data/parser.py,
converter.py, and data/README.md with the entries of data/dataset_info.json): ``text`` records
are a pretraining set, ``"columns": {"prompt": "text"}`` as LLaMA-Factory's own ``c4_demo``;
prompt/completion records map ``prompt`` and ``response``; a ``messages`` dataset takes the
sharegpt formatting with OpenAI role tags. Records it cannot read as they are (multiple choice,
prompt/completion lists of messages, stored token ids) get a line saying what to write instead, and
without ``--datasets`` the layout is unknown, so the header lists the entry for each layout.
"""

from __future__ import annotations

import copy
import json

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.shares import format_number


def strategy(ctx: Context) -> str:
    """Undersample (no dataset repeated) unless the budget needs a dataset more than once."""
    repetition = ctx.plan.repetition
    if repetition and any(r > 1.0 for r in repetition.values()):
        return "interleave_over"
    return "interleave_under"


# LLaMA-Factory's dataset_info.json entry (without file_name) for each record layout mergeopt reads
ENTRIES: dict[sliced.Layout, dict] = {
    "text": {"columns": {"prompt": "text"}},  # a pretraining set: its own c4_demo entry
    "prompt_completion": {"columns": {"prompt": "prompt", "response": "completion"}},
    # conversations in TRL's ``messages`` layout, as LLaMA-Factory's sharegpt converter reads them
    "messages": {
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    },
}
LAYOUT_NAMES = {"text": "text records", "prompt_completion": "prompt/completion", "messages": "messages"}
READER = "LLaMA-Factory"


def dataset_info(ctx: Context, name: str) -> dict | str | None:
    """The dataset_info.json entry the header suggests for ``name``, from its records' layout;
    a sentence instead where LLaMA-Factory cannot read them as they are; None without a dataset
    (the layout is unknown, and a guessed entry would name columns that may not exist)."""
    from mergeopt.export.token_files import kind_of

    path = ctx.datasets.get(name)
    if path is None:
        return None
    if kind_of(path) is not None:
        return (
            f"holds stored token ids (MDS, Megatron or OLMo files); {READER} reads records "
            "(JSONL, JSON, CSV, parquet or arrow): give it those"
        )
    layout = sliced.classify(READER, path)
    if layout not in ENTRIES:
        return layout
    return {"file_name": str(path), **copy.deepcopy(ENTRIES[layout])}


def registration(ctx: Context) -> list[str]:
    """The header's dataset_info.json lines: one entry per name, or with no dataset known the
    entry for each layout, since the columns depend on the records."""
    known = {name: dataset_info(ctx, name) for name in ctx.plan.names}
    unknown = [name for name, info in known.items() if info is None]
    lines = [
        "# Register each name in dataset_dir/dataset_info.json"
        + (":" if len(unknown) == len(known) else ", e.g.")
    ]
    for name, info in known.items():
        if isinstance(info, str):
            lines.append(f"#   {name}: {info}")
        elif info is not None:
            lines.append(f"#   {json.dumps({name: info})}")
    if unknown:
        lines.append(
            f"#   {', '.join(unknown)}: no --datasets, so the records' layout is unknown; the entry "
            "for each layout (file_name: the file's path):"
        )
        for layout, entry in ENTRIES.items():
            example = {unknown[0]: {"file_name": "PATH", **entry}}
            lines.append(f"#     {LAYOUT_NAMES[layout]}: {json.dumps(example)}")
    if any(
        isinstance(info, dict) and info.get("columns") == ENTRIES["text"]["columns"]
        for info in known.values()
    ):
        lines.append("# text records are pretraining data to LLaMA-Factory: train them with stage: pt")
    return lines


def render(ctx: Context) -> str:
    plan = ctx.plan
    for name in plan.names:  # DataArguments splits ``dataset`` on ',' and strips each name
        if "," in name or name != name.strip():
            raise UserError(
                f"--to llamafactory: expert {name!r} cannot be a name in LLaMA-Factory's dataset key, "
                "which is split on commas and stripped of spaces: rename that expert"
            )
    lines = [ctx.header(FORMAT), *registration(ctx)]
    if plan.counts is not None:
        lines.append(f"# The budget is {sum(plan.counts.values())} samples: stop training there (max_steps).")
    config = {
        "dataset": ",".join(plan.names),
        "mix_strategy": strategy(ctx),
        # a string (quoted when it would read as a number): DataArguments splits it on ','
        "interleave_probs": ",".join(format_number(plan.sample_shares[n]) for n in plan.names),
    }
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="llamafactory",
    filename="llamafactory.yaml",
    unit="samples",
    needs_paths=False,
    meaning="interleave_probs: the probability that each drawn sample comes from that dataset (sum 1).",
    render=render,
)
