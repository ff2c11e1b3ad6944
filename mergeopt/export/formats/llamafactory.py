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
the header suggests each entry: prompt/completion columns, or the sharegpt formatting with OpenAI
role tags for a ``messages`` dataset (src/llamafactory/data/parser.py, converter.py).
"""

from __future__ import annotations

import json

import yaml

from mergeopt.errors import UserError
from mergeopt.export import token_stats
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.shares import format_number
from mergeopt.export.token_stats import source_of


def strategy(ctx: Context) -> str:
    """Undersample (no dataset repeated) unless the budget needs a dataset more than once."""
    repetition = ctx.plan.repetition
    if repetition and any(r > 1.0 for r in repetition.values()):
        return "interleave_over"
    return "interleave_under"


# conversations in TRL's ``messages`` layout, as LLaMA-Factory's sharegpt converter reads them
SHAREGPT = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages"},
    "tags": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    },
}


def dataset_info(ctx: Context, name: str) -> dict | None:
    """The dataset_info.json entry the header suggests: sharegpt for a ``messages`` dataset, the
    prompt/completion columns otherwise; None for prompt/completion lists of messages, which
    LLaMA-Factory cannot read as they are."""
    if name in ctx.datasets:
        source = source_of(ctx.datasets[name])
        columns = token_stats.columns(source)
        if "messages" in columns:
            return dict(SHAREGPT)
        if "prompt" in columns and "prompt" not in token_stats.text_columns(source):
            return None
    return {"columns": {"prompt": "prompt", "response": "completion"}}


def render(ctx: Context) -> str:
    plan = ctx.plan
    for name in plan.names:  # DataArguments splits ``dataset`` on ',' and strips each name
        if "," in name or name != name.strip():
            raise UserError(
                f"--to llamafactory: expert {name!r} cannot be a name in LLaMA-Factory's dataset key, "
                "which is split on commas and stripped of spaces: rename that expert"
            )
    lines = [ctx.header(FORMAT)]
    lines.append("# Register each name in dataset_dir/dataset_info.json, e.g.")
    for name in plan.names:
        info = dataset_info(ctx, name)
        if info is None:
            lines.append(
                f"#   {name}: prompt/completion lists of messages; LLaMA-Factory reads a conversation "
                'from one column: write each record as {"messages": prompt + completion} (sharegpt)'
            )
            continue
        if name in ctx.datasets:
            info = {"file_name": str(ctx.datasets[name]), **info}
        lines.append(f"#   {json.dumps({name: info})}")
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
