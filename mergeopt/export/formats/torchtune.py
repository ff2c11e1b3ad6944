"""torchtune: a recipe config's ``dataset:`` list, one builder entry per pass, cut to its count by ``split``.

Followed: pytorch/torchtune at bd2a0fc7 (the same in the 0.6.1 release): a recipe's ``_setup_data``
(recipes/full_finetune_single_device.py and the other finetune recipes) instantiates each entry of a
``dataset:`` list with the tokenizer and wraps them in ``torchtune.datasets.ConcatDataset``
(torchtune/datasets/_concat.py), which only concatenates: no weights, no deduplication; the
recipe's sampler shuffles the whole. torchtune has no per-dataset weight or count, so the mixture is
said through the sizes (see :mod:`mergeopt.export.formats.sliced`): the builders pass ``source``,
``data_files`` and ``split`` to ``datasets.load_dataset`` (torchtune/datasets/_sft.py,
_text_completion.py), so ``split: train[:N]`` keeps N samples. ``prompt``/``completion`` records go
to ``instruct_dataset`` with ``column_map: {input: prompt, output: completion}``, ``text`` records
to ``text_completion_dataset`` with ``column: text``, ``messages`` conversations to ``chat_dataset``
(``conversation_style: openai``; it trains on the assistant's turns, as mergeopt scores them). A ``save_to_disk`` directory is read as its
arrow files (``source: arrow``).
"""

from __future__ import annotations

import yaml

from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.token_stats import Source

BUILDERS = {
    "prompt_completion": {
        "_component_": "torchtune.datasets.instruct_dataset",
        "column_map": {"input": "prompt", "output": "completion"},
    },
    "text": {"_component_": "torchtune.datasets.text_completion_dataset", "column": "text"},
    "messages": {
        "_component_": "torchtune.datasets.chat_dataset",
        "conversation_column": "messages",
        "conversation_style": "openai",
    },
}


def entry(layout: sliced.Layout, source: Source) -> dict:
    """One dataset's entry (without its split): the builder, its source files and its columns."""
    builder = BUILDERS[layout]
    files = list(source.data_files)
    return {
        "_component_": builder["_component_"],
        "source": "arrow" if source.loader == "disk" else source.loader,
        "data_files": files[0] if len(files) == 1 else files,
        **{k: v for k, v in builder.items() if k != "_component_"},
    }


# torchtune 0.6.1 has no Jinja: chat_dataset's messages are tokenized by the model's own tokenizer
# (its special tokens per role, e.g. Llama3Tokenizer.tokenize_messages), and a tokenizer's
# ``prompt_template`` is a PromptTemplate of role tags, not a chat template
OWN = "the model tokenizer's own format; its prompt_template takes role tags, not a Jinja template"


def render(ctx: Context) -> str:
    body = yaml.safe_dump({"dataset": sliced.entries(ctx, FORMAT, entry)}, sort_keys=False)
    lines = [
        ctx.header(FORMAT),
        sliced.summary(ctx, FORMAT),
        *sliced.own_template_note(ctx, "torchtune", OWN),
    ]
    return "\n".join(lines) + "\n" + body


FORMAT = Format(
    name="torchtune",
    filename="torchtune_dataset.yaml",
    unit="samples",
    needs_paths=True,
    meaning="split train[:N]: N samples of that dataset; ConcatDataset of the entries is the mixture.",
    render=render,
    needs_sizes=True,
)
