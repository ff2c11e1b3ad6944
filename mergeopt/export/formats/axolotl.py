"""axolotl: a ``datasets:`` list, one entry per pass over a dataset, cut to its count by ``split``.

Followed: axolotl-ai-cloud/axolotl at 067b021c (the same files in the 0.19.0 release).
src/axolotl/utils/schemas/datasets.py (``SFTDataset``) has no per-dataset weight, ratio or count:
``shards``/``shards_idx`` keep 1/N of a dataset, not N samples. src/axolotl/utils/data/sft.py
(``_load_raw_datasets``) loads every entry in order and src/axolotl/utils/data/shared.py
``merge_datasets`` concatenates them (``concatenate_datasets``), then shuffles the whole
(``shuffle_merged_datasets``, default true); entries are not deduplicated, only rows are, and only
with ``dataset_exact_deduplication`` (default off, written ``false`` here: it would drop a repeat).
``load_dataset_with_config`` loads a local file with ``load_dataset(ds_type, data_files=path,
split=split)`` and keeps a slice such as ``train[:500]``, so the mixture is said through the sizes
(see :mod:`mergeopt.export.formats.sliced`). A ``save_to_disk`` directory is given with its arrow
files as ``data_files`` (a directory without them is read by ``load_from_disk``, which ignores the
slice). ``prompt``/``completion`` records use a user-defined ``type`` (the prompt is the
instruction, the completion the output; ``train_on_inputs`` decides the prompt's loss), ``text``
records ``type: completion``, ``messages`` conversations ``type: chat_template`` (the base's
template, or the run's ``data.chat_template`` as ``chat_template_jinja``; the assistant's turns
trained, as mergeopt scores them). axolotl drops or truncates samples beyond ``sequence_len``, which
the counts cannot foresee.
"""

from __future__ import annotations

import yaml

from mergeopt.export import token_stats
from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format, Specials
from mergeopt.export.token_stats import Source

TYPES = {
    "prompt_completion": {
        "field_instruction": "prompt",
        "field_output": "completion",
        "format": "{instruction}",
        "no_input_format": "{instruction}",
    },
    "text": "completion",
    "messages": {
        "type": "chat_template",
        "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
        "roles_to_train": ["assistant"],
    },
}


# The fields of a tool-calling conversation's messages besides role and content. axolotl's
# chat_template strategy (prompt_strategies/chat_template.py, ``transform_message``) hands the
# template a message's mapped properties and only those other fields its JinjaTemplateAnalyzer
# finds the template reading on a loop variable named ``message``: a template that loops
# ``{% for m in messages %}`` gets no ``tool_calls``, and the calls mergeopt counted are not
# trained. Mapped, they reach any template (a message without one is left as it is).
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def entry(layout: sliced.Layout, source: Source) -> dict:
    """One dataset's entry (without its split): where axolotl loads it from and the prompt type."""
    out = {"path": str(source.path), "ds_type": "arrow" if source.loader == "disk" else source.loader}
    if source.loader == "disk":
        out["data_files"] = list(source.data_files)
    kind = TYPES[layout]
    if layout != "messages":
        return {**out, "type": kind}
    fields = set().union(*token_stats.tool_use(source).shapes)
    tools = {f: f for f in TOOL_FIELDS if f in fields}
    return {**out, **kind, "message_property_mappings": {**kind["message_property_mappings"], **tools}}


def added_tokens(layout: str, specials: Specials, layouts: frozenset[str]) -> int:
    """The special tokens axolotl adds to each sample beyond mergeopt's count. Its
    ``PromptTokenizingStrategy._tokenize`` (src/axolotl/prompt_tokenizers.py) tokenizes a string with
    the tokenizer's special tokens and appends its EOS unless the ids already end with it. ``type:
    completion`` (prompt_strategies/completion.py) tokenizes the text so: one EOS more than counted,
    unless the tokenizer writes one itself. The user-defined type (prompt_strategies/user_defined.py,
    ``InstructionWSystemPromptTokenizingStrategy``) tokenizes the prompt without an EOS added and the
    completion with its special tokens, its BOS stripped, an EOS ensured: one more than mergeopt's
    count of the completion (no special tokens). Neither appends it where the ids already end with
    the EOS (a text or completion ending with the EOS text: ``eos_if_missing``). ``chat_template``
    renders as counted: none."""
    if layout == "text":
        return 0 if specials.eos else 1
    return 1 if layout == "prompt_completion" else 0


def with_recipe_template(ctx: Context, entries: list[dict]) -> list[dict]:
    """The conversation entries, given the run's ``data.chat_template`` where its recipe names one
    (``chat_template: jinja``): axolotl renders with the tokenizer's own template otherwise."""
    path = ctx.recipe.data.chat_template if ctx.recipe is not None else None
    if path is None:
        return entries
    from mergeopt.objectives.chat import read_template

    jinja = {"chat_template": "jinja", "chat_template_jinja": read_template(path)}
    return [{**e, **jinja} if e.get("type") == "chat_template" else e for e in entries]


def render(ctx: Context) -> str:
    entries = with_recipe_template(ctx, sliced.entries(ctx, FORMAT, entry))
    config = {"datasets": entries, "dataset_exact_deduplication": False}
    body = yaml.safe_dump(config, sort_keys=False)
    return "\n".join([ctx.header(FORMAT), sliced.summary(ctx, FORMAT)]) + "\n" + body


FORMAT = Format(
    name="axolotl",
    filename="axolotl_datasets.yaml",
    unit="samples",
    needs_paths=True,
    meaning="split train[:N]: N samples of that dataset; axolotl concatenates the entries: the mixture.",
    render=render,
    needs_sizes=True,
    added_tokens=added_tokens,
    eos_if_missing=True,
)
