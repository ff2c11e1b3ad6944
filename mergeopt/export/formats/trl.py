"""TRL: a ``datasets:`` list (``DatasetMixtureConfig``) whose splits cut each dataset to its count.

Followed: huggingface/trl trl/scripts/utils.py (commit 0167b7df): ``DatasetConfig(path, name,
data_dir, data_files, split="train", columns)`` passes its fields to ``datasets.load_dataset``, and
``get_dataset`` concatenates the loaded datasets (``concatenate_datasets``). TRL 1.16 added a
``fraction`` per entry (target shares, never oversampling), which cannot say a budget that repeats a
dataset and older releases reject, so the mixture is said through the sizes: each entry's ``split`` is a slice
``train[:N]`` of N samples (the ``datasets`` split-slicing syntax), and a dataset the budget needs
more than once is listed once per full pass plus a slice. The trainer shuffles the concatenation.
Without a budget the counts are the largest mixture in the fitted sample shares that repeats no
dataset; with one they are the budget's counts. Files load as ``path: json|csv|parquet|arrow`` with
``data_files``.

``concatenate_datasets`` joins datasets of different columns by filling the missing ones with None,
and TRL's ``SFTTrainer`` (trl/trainer/sft_trainer.py, ``_prepare_dataset``) reads one layout for the
whole mixture: it decides from the first record whether to add EOS to a text or completion, and
tokenizes any record with a ``prompt`` key as prompt/completion. So ``messages`` beside
prompt/completion records (strings or lists of messages), or text beside either, stop it
(``'NoneType' object has no attribute 'endswith'``) or lose records; every dataset must have one
layout, and a multiple-choice one (no ``completion`` column) none. Both are refused, naming the datasets.
So are ``messages`` datasets whose messages ``datasets`` reads as different types (tool-calling
conversations, JSON objects, beside plain ones, structs): ``concatenate_datasets`` stops on them
(:func:`sliced.check_message_types`).

Conversations are counted with the run's ``data.chat_template`` where its recipe names one, and
SFTTrainer renders them with the model's tokenizer's template unless SFTConfig's
``chat_template_path`` names another: the file sets it (a key of the same ``trl sft --config`` file).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format, Specials
from mergeopt.export.token_stats import source_of

LAYOUT_NAMES = {
    "text": "text",
    "prompt_completion": "prompt/completion",
    "prompt_completion_messages": "prompt/completion lists of messages",
    "messages": "messages",
}
READER = "TRL's SFTTrainer"


def check_layouts(ctx: Context) -> dict[str, str]:
    """One record layout for every dataset: SFTTrainer reads the concatenation as one (see above).
    Returns each dataset's layout."""
    layouts = {}
    for name in ctx.plan.names:
        path = ctx.datasets[name]
        found = sliced.kind(READER, path)
        if found not in LAYOUT_NAMES:
            raise UserError(f"--to trl: dataset {name!r} ({path}) {found}")
        layouts[name] = found
    if len(set(layouts.values())) > 1:
        said = ", ".join(f"{n!r} {LAYOUT_NAMES[k]}" for n, k in layouts.items())
        raise UserError(
            f"--to trl: the datasets' records differ ({said}), and {READER} reads one layout for the "
            'whole concatenation: write every dataset in one layout (conversations as {"messages": ...})'
        )
    sliced.check_message_types(ctx, "trl", "TRL's get_dataset (concatenate_datasets)")
    return layouts


def entries(ctx: Context) -> list[dict]:
    plan = ctx.plan
    counts = ctx.whole_samples(FORMAT)
    out = []
    for name in plan.names:
        source = source_of(ctx.datasets[name])
        size = plan.stats[name].samples
        files = list(source.data_files)
        base = {"path": "arrow" if source.loader == "disk" else source.loader}
        base["data_files"] = files[0] if len(files) == 1 else files
        full, rest = divmod(counts[name], size)
        out += [{**base, "split": "train"} for _ in range(full)]
        if rest:
            out.append({**base, "split": f"train[:{rest}]"})
    return out


def added_tokens(layout: str, specials: Specials, layouts: frozenset[str]) -> int:
    """SFTTrainer's ``_prepare_dataset`` (trl/trainer/sft_trainer.py, 1.16, "Adding EOS") appends the
    tokenizer's EOS to a non-conversational sample's ``text``, or to its ``completion``, unless it
    already ends with it, and tokenizes that (the text with the tokenizer's special tokens, as
    mergeopt counts it; the prompt and completion as one string): one token per sample more than
    counted, but none to a record that ends with the EOS text, whose count already holds it
    (``eos_if_missing``). Conversations are rendered by the chat template, as counted: none."""
    return 1 if layout in ("text", "prompt_completion") else 0


def chat_template(ctx: Context) -> tuple[dict, list[str]]:
    """SFTConfig's ``chat_template_path`` for the run's ``data.chat_template`` (the template the
    conversations were counted with), or a header line where TRL cannot take it; nothing without
    one (SFTTrainer renders with the model's tokenizer's template, the base's, as mergeopt counts).

    trl/trainer/sft_trainer.py (1.16) reads ``chat_template_path`` as the template itself only
    where it is a file named ``.jinja`` or ``.j2``; anything else it loads as a whole tokenizer
    (``clone_chat_template``: its template, and also its added tokens and EOS token, the model's
    embeddings resized). So a template file, or a tokenizer directory's ``chat_template.jinja``,
    is named; a template kept elsewhere (another file name, ``tokenizer_config.json``) gets a line
    saying to write it to a ``.jinja`` file."""
    from mergeopt.objectives.chat import read_template

    path = ctx.recipe.data.chat_template if ctx.recipe is not None else None
    if path is None:
        return {}, []
    read_template(path)  # a template mergeopt could not read is refused, as in the fit
    where = Path(path)
    if where.is_dir() and (where / "chat_template.jinja").is_file():
        where = where / "chat_template.jinja"
    if where.is_file() and where.suffix in (".jinja", ".j2"):
        return {"chat_template_path": str(where)}, []
    return {}, [
        f"# the conversations were counted with data.chat_template ({path}); {READER} reads a "
        "template only from a .jinja or .j2 file (any other path it loads as a whole tokenizer): "
        "write the template to one and set chat_template_path to it"
    ]


def render(ctx: Context) -> str:
    layouts = check_layouts(ctx)
    plan = ctx.plan
    counts = ctx.whole_samples(FORMAT)
    summary = ", ".join(f"{n} {counts[n]}" for n in plan.names)
    lines = [ctx.header(FORMAT), f"# samples per dataset: {summary}"]
    config: dict = {"datasets": entries(ctx)}
    if {"messages", "prompt_completion_messages"} & set(layouts.values()):
        template, said = chat_template(ctx)
        config.update(template)
        lines += said
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="trl",
    filename="trl_datasets.yaml",
    unit="samples",
    needs_paths=True,
    meaning="split train[:N]: N samples of that dataset; the concatenation is the mixture.",
    render=render,
    needs_sizes=True,
    added_tokens=added_tokens,
    eos_if_missing=True,
)
