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
(``conversation_style: openai``; it trains on the assistant's turns, as mergeopt scores them);
conversations that call tools are refused (OpenAIToMessages reads only ``content``). A ``save_to_disk`` directory is read as its
arrow files (``source: arrow``).
"""

from __future__ import annotations

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format, Specials, share_drift_per_token
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


def added_tokens(layout: str, specials: Specials, layouts: frozenset[str]) -> int:
    """The special tokens torchtune adds to each sample beyond mergeopt's count: a BOS and an EOS
    where the counting tokenizer writes none itself. ``text_completion_dataset``
    (torchtune/datasets/_text_completion.py) encodes the text with ``add_bos=True, add_eos=True``
    (``HuggingFaceBaseTokenizer.encode`` adds each unless the tokenizer already does);
    ``instruct_dataset``'s messages go through the model tokenizer's ``tokenize_messages``, which
    (``tokenize_messages_no_special_tokens``, torchtune/modules/transforms/tokenizers/_utils.py) puts a
    BOS before the turn and an EOS after the assistant's. Conversations are rendered in the model
    tokenizer's own format (the header says so): none counted here."""
    if layout in ("text", "prompt_completion"):
        return (not specials.bos) + (not specials.eos)
    return 0


def role_headers_note(ctx: Context) -> list[str]:
    """A header line where prompt/completion records go through ``instruct_dataset``: a model
    tokenizer with role headers writes more around them than the BOS and EOS counted (torchtune
    0.6.1's ``Llama3Tokenizer.tokenize_messages``: a header and an end of turn per message, 10
    tokens more; ``Qwen2_5Tokenizer``'s: 8 more over Qwen's tokenizer, which writes no BOS or
    EOS), and the export does not know the config's tokenizer: how far each token more per sample
    moves a trained token share."""
    from mergeopt.export.token_files import kind_of

    plan = ctx.plan
    if plan.stats is None:
        return []
    names = [
        n
        for n, p in ctx.datasets.items()
        if n in plan.stats and kind_of(p) is None and sliced.kind("torchtune", p) == "prompt_completion"
    ]
    if not names:
        return []
    drift = share_drift_per_token(plan, names)
    return [
        f"# {', '.join(names)}: instruct_dataset counted as a BOS, the prompt, the completion and an EOS, as "
        "a BOS/EOS model tokenizer (Llama 2, Mistral) writes them; one with role headers writes a header "
        "and an end of turn around each message (Llama 3: 10 tokens more per sample, Qwen 2.5: 8), not "
        f"counted, and each token more per sample moves a trained token share by up to {drift:.2g}"
    ]


def refuse_tool_calls(ctx: Context) -> None:
    """chat_dataset's OpenAIToMessages (torchtune/data/_messages.py, 0.6.1) reads only each message's
    ``content``: an assistant turn's ``tool_calls`` are dropped, and a turn whose content is None
    trains the text of the message before it (a variable left from the last iteration). No config
    reads them, and a silent garble is found only after training: refused, naming the datasets."""
    found = sliced.tool_calls(ctx)
    if found:
        said = ", ".join(f"{n!r} ({use.calls} records)" for n, use in found.items())
        raise UserError(
            f"--to torchtune: {said} call tools, and torchtune's chat_dataset (OpenAIToMessages) reads "
            "only each message's content (a tool call is lost, a turn without text trains the message "
            "before it's): export them with --to trl or --to axolotl, or leave out their tool-calling records"
        )


def render(ctx: Context) -> str:
    refuse_tool_calls(ctx)
    body = yaml.safe_dump({"dataset": sliced.entries(ctx, FORMAT, entry)}, sort_keys=False)
    lines = [
        ctx.header(FORMAT),
        sliced.summary(ctx, FORMAT),
        *sliced.own_template_note(ctx, "torchtune", OWN),
        *role_headers_note(ctx),
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
    added_tokens=added_tokens,
)
