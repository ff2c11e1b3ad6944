"""What the per-source-count formats (axolotl, torchtune) share: the counts, the split slices, the layout.

Neither framework weighs its datasets: each concatenates the entries of a list, every entry loaded
with ``datasets.load_dataset(..., split=...)``. So a mixture is said through the sizes, as for TRL:
an entry's ``split`` is ``train[:N]`` (the ``datasets`` split-slicing syntax: the first N samples),
and a dataset the budget needs more than once is listed once per full pass (``split: train``) plus
a slice. Without a budget the counts are the largest mixture in the fitted sample shares that
repeats no dataset; with one they are the budget's counts.

Both also read fixed columns per dataset, so a renderer has to know the record layout. mergeopt
reads (:func:`mergeopt.objectives.data.validated_record`): ``text``, ``prompt``/``completion``,
multiple-choice ``prompt``/``choices``/``answer`` and conversations; ``text``, ``prompt``/``completion``
and ``messages`` go to each framework's builder for them. A multiple-choice dataset (its completion
is ``choices[answer]``, which no builder reads), a conversation kept as prompt/completion lists of
messages (both read a conversation from one column) or one that mixes layouts is refused, naming it.

:func:`own_template_note` is the header line of every format whose framework renders
conversations with a template of its own (torchtune, LLaMA-Factory, open-instruct, NeMo), not the
chat template mergeopt counted them with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from mergeopt.errors import UserError
from mergeopt.export import token_stats
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.token_stats import Source, source_of

Layout = Literal["text", "prompt_completion", "messages"]


def splits(ctx: Context, fmt: Format, name: str) -> list[str]:
    """One split per entry of ``name``: ``train`` per full pass over it, then ``train[:rest]``."""
    full, rest = divmod(ctx.whole_samples(fmt)[name], ctx.plan.stats[name].samples)
    return ["train"] * full + ([f"train[:{rest}]"] if rest else [])


def summary(ctx: Context, fmt: Format) -> str:
    return "# samples per dataset: " + ", ".join(f"{n} {c}" for n, c in ctx.whole_samples(fmt).items())


def entries(ctx: Context, fmt: Format, entry: Callable[[Layout, Source], dict]) -> list[dict]:
    """The ``datasets`` list: per dataset, ``entry(layout, source)`` once per split of :func:`splits`."""
    out = []
    for name in ctx.plan.names:
        path = ctx.datasets[name]
        base = entry(layout(fmt.name, name, path), source_of(path))
        # a fresh dict per entry: yaml writes shared ones as anchors and aliases
        out += [{**copy.deepcopy(base), "split": split} for split in splits(ctx, fmt, name)]
    return out


def layout(fmt: str, name: str, path: Path) -> Layout:
    """The dataset's layout, from its column names; a UserError naming ``fmt`` and the dataset otherwise."""
    found = classify(fmt, path)
    if found not in LAYOUTS:
        raise UserError(f"--to {fmt}: dataset {name!r} ({path}) {found}")
    return found


LAYOUTS: tuple[Layout, ...] = ("text", "prompt_completion", "messages")


def classify(reader: str, path: Path) -> Layout | str:
    """The dataset's layout, from its column names, or why ``reader`` (a framework that reads
    one layout per dataset, from fixed columns) cannot read it: a clause that follows the dataset's
    name. LLaMA-Factory's hint says the same where axolotl and torchtune refuse."""
    found = kind(reader, path)
    if found == "prompt_completion_messages":
        return (
            f"holds conversations as prompt/completion lists of messages; {reader} reads "
            'conversations from one column: write each record as {"messages": prompt + completion}'
        )
    return found


def kind(reader: str, path: Path) -> Layout | Literal["prompt_completion_messages"] | str:
    """As :func:`classify`, but a conversation kept as prompt/completion lists of messages is a
    layout of its own, ``prompt_completion_messages`` (TRL reads it), not a refusal."""
    columns = token_stats.columns(source_of(path))
    if "choices" in columns:
        return (
            f"holds multiple-choice records (prompt/choices/answer); {reader} reads no "
            "choices[answer] column: write them as prompt/completion"
        )
    present = [key for key in ("text", "prompt", "messages") if key in columns]
    if len(present) > 1:
        return (
            f"mixes {' and '.join(repr(k) for k in present)} records; {reader} reads one layout per dataset"
        )
    if present == ["prompt"] and "prompt" not in token_stats.text_columns(source_of(path)):
        return "prompt_completion_messages"
    return {"text": "text", "messages": "messages"}.get(present[0] if present else "", "prompt_completion")


def record_layouts(ctx: Context, reader: str, said: Mapping[str, str]) -> dict[str, str]:
    """Each dataset's record layout as ``said`` words it (:func:`kind` keys to words), for the
    datasets of records whose kind ``said`` has: data in a trainer's own format, and datasets
    :func:`kind` refuses (each format says those its own way), and names without a path, are left
    out."""
    from mergeopt.export.token_files import kind_of

    layouts = {}
    for name in ctx.plan.names:
        path = ctx.datasets.get(name)  # none without --datasets
        if path is not None and kind_of(Path(path)) is None and (found := kind(reader, path)) in said:
            layouts[name] = said[found]
    return layouts


def conversations(ctx: Context) -> list[str]:
    """The datasets whose records are conversations (``messages``, or prompt/completion lists of
    messages): the ones whose tokens were counted through a chat template."""
    return list(record_layouts(ctx, "", {"messages": "", "prompt_completion_messages": ""}))


def tool_calls(ctx: Context) -> dict[str, token_stats.ToolUse]:
    """The datasets of conversations that call tools (or hold a tool's answers), and how: read in
    the pass that counted their tokens (:func:`mergeopt.export.token_stats.tool_use`)."""
    found = {}
    for name in conversations(ctx):
        use = token_stats.tool_use(source_of(ctx.datasets[name]))
        if use.calls:
            found[name] = use
    return found


def check_message_types(ctx: Context, fmt: str, joiner: str) -> None:
    """Refuse ``messages`` datasets whose messages ``datasets`` reads as different types, which
    ``joiner`` (a ``concatenate_datasets`` or ``interleave_datasets`` of the loaded datasets) stops
    on ("The features can't be aligned"). ``datasets`` (5.x) reads a dataset's messages as structs
    of their fields where every message has the same fields, and as JSON objects where they differ
    (a tool call's turn, a tool's answer beside plain turns); two datasets join only where those
    types are the same: plain conversations beside tool-calling ones do not."""
    kinds = {}
    for name in record_layouts(ctx, "", {"messages": ""}):
        shapes = token_stats.tool_use(source_of(ctx.datasets[name])).shapes
        fields = ", ".join(sorted(set().union(*shapes)))
        kinds[name] = f"fields {fields}" if len(shapes) == 1 else f"fields varying by message ({fields})"
    if len(set(kinds.values())) > 1:
        said = "; ".join(f"{name!r} {kind}" for name, kind in kinds.items())
        raise UserError(
            f"--to {fmt}: the datasets' messages differ ({said}), so the datasets library reads them as "
            f"different types (JSON objects where the fields vary, else structs), and {joiner} stops on "
            'them ("The features can\'t be aligned"): export them --to axolotl or --to llamafactory, '
            "which read each dataset on its own"
        )
    check_column_types(ctx, fmt, joiner)


def check_column_types(ctx: Context, fmt: str, joiner: str) -> None:
    """Refuse datasets with a column the ``datasets`` library types differently in two of them,
    which ``joiner`` stops on as it stops on :func:`check_message_types`' messages: the
    ``completion`` of conversations kept as prompt/completion lists of messages (a completion that
    calls tools is read as JSON objects, a plain one as structs), ``tools`` of different
    parameters, any other column (see :func:`mergeopt.export.token_stats.value_type`)."""
    from mergeopt.export.token_files import kind_of

    seen: dict[str, tuple[str, object]] = {}  # column -> (the first dataset with a type for it, the type)
    for name in ctx.plan.names:
        path = ctx.datasets.get(name)
        if path is None or kind_of(Path(path)) is not None:
            continue
        for column, kind in token_stats.column_types(source_of(path)).items():
            if kind is None:
                continue
            if column not in seen:
                seen[column] = (name, kind)
                continue
            first, known = seen[column]
            found = token_stats.type_difference(known, kind, column)
            if found is not None:
                where, said_first, said = found
                raise UserError(
                    f"--to {fmt}: column {column!r} differs between datasets {first!r} and {name!r} (at "
                    f"{where}: {said_first} in {first!r}, {said} in {name!r}), so the datasets library reads "
                    f"them as different types, and {joiner} stops on them (\"The features can't be "
                    'aligned"): give the column one form in every dataset, or export with a format that '
                    "reads each dataset on its own (--to axolotl, --to llamafactory)"
                )


def template_source(ctx: Context) -> str:
    """Where the chat template that counted the conversations came from: the run's
    ``data.chat_template``, else the tokenizer's (``--tokenizer``, else the run's base)."""
    recipe = ctx.recipe
    if recipe is not None and recipe.data.chat_template is not None:
        return f"data.chat_template ({recipe.data.chat_template})"
    options = list(ctx.options)
    if "--tokenizer" in options[:-1]:
        return f"the chat template of {options[options.index('--tokenizer') + 1]}"
    if recipe is not None:
        return f"the chat template of the base ({recipe.model.base})"
    return "the tokenizer's chat template"


def own_template_note(ctx: Context, framework: str, how: str) -> list[str]:
    """One header line where ``framework`` renders conversations with a template of its own (``how``),
    not the one their tokens were counted with; none where no dataset holds conversations."""
    names = conversations(ctx)
    if not names:
        return []
    return [
        f"# {framework} renders conversations with its own template ({how}), so the token counts of "
        f"{', '.join(names)} (and the sample shares derived from them) were measured with another: "
        f"{template_source(ctx)}"
    ]
