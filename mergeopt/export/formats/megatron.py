"""Megatron-LM ``--data-path`` and NeMo's ``data_prefix`` (weight-prefix pairs) and ``train_ds`` blend.

Followed: NVIDIA/Megatron-LM megatron/core/datasets/utils.py (commit 00caa53a)
``get_blend_from_list`` (a flattened list ``["30", "path/to/dataset_1_prefix", "70",
"path/to/dataset_2_prefix"]`` parses into weights and prefixes) and ``normalize`` (weights divided
by their sum), and the ``--data-path`` help "a list of weight prefix pairs e.g. weight1 prefix1
weight2 prefix2"; NVIDIA/NeMo examples/nlp/language_modeling/conf/megatron_gpt_config.yaml (commit
382c533a), whose ``model.data.data_prefix`` is the same flattened list (``[.5, path0, .5, path1]``).
The blended dataset draws fixed-length sequences of ``seq_length`` tokens in proportion to the
weights, so the weights are token shares: mergeopt writes the fitted token shares. Each path must be
the prefix of an indexed dataset (``PREFIX.bin``/``PREFIX.idx`` from tools/preprocess_data.py); a
``.bin`` or ``.idx`` given to ``--datasets`` is cut to its prefix. Under a budget the indexed
dataset itself is measured (:mod:`mergeopt.export.token_files`: documents, summed sequence lengths).

NeMo: nemo-toolkit 3.0.0 (the current release) is speech and audio only and reads no LLM data
mixture; its README points to v2.7 as the last release with more modalities, and NeMo's LLM training
moved to Megatron-Bridge. mergeopt therefore writes the two forms NeMo's LLM releases read, as two
formats (their data differ: indexed datasets for one, JSONL files for the other): ``nemo``,
``model.data.data_prefix`` (pretraining; nemo-toolkit 2.7.3's ``nemo.collections.llm.gpt.data.
PreTrainingDataModule(paths=...)`` takes the same flattened list and hands it to megatron-core's
``get_blend_from_list``), in token shares; and ``nemo-sft``, ``model.data.train_ds.file_names`` with
``concat_sampling_probabilities`` (fine-tuning; NVIDIA/NeMo examples/nlp/language_modeling/tuning/
conf/megatron_gpt_finetuning_config.yaml and nemo/collections/nlp/models/language_modeling/
megatron_gpt_sft_model.py at commit 8cfedd72: a list as long as ``file_names``, handed to
``BlendableDataset``, which draws whole JSONL records by the normalized weights), in sample shares.
The nlp collection is gone from nemo-toolkit 2.7.3, whose ``FineTuningDataModule`` reads one
dataset and blends none.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.mixture_input import is_megatron_prefix
from mergeopt.export.mixture_input import megatron_prefix as prefix


def _pairs(ctx: Context) -> list[tuple[float, str]]:
    return [(ctx.plan.token_shares[n], prefix(ctx.datasets[n])) for n in ctx.plan.names]


def _notes(ctx: Context) -> list[str]:
    lines = []
    for name in ctx.plan.names:
        path = prefix(ctx.datasets[name])
        if not is_megatron_prefix(Path(path)):
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


_NEMO_RELEASES = [
    "# nemo-toolkit 3.0 reads no LLM data mixture (speech and audio only); NeMo's LLM training moved",
    "#   to Megatron-Bridge. These keys are what the NeMo releases with LLMs read (to 2.7).",
]


def render_nemo(ctx: Context) -> str:
    """Pretraining: ``model.data.data_prefix``, the same pairs as Megatron's ``--data-path``."""
    flat: list = []
    for weight, path in _pairs(ctx):
        flat += [weight, path]
    lines = [
        ctx.header(NEMO),
        *_notes(ctx),
        "# data_prefix of megatron_gpt_config.yaml, or paths= of NeMo 2's llm.PreTrainingDataModule.",
        *_NEMO_RELEASES,
    ]
    body = yaml.safe_dump({"model": {"data": {"data_prefix": flat}}}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


def render_nemo_sft(ctx: Context) -> str:
    """Fine-tuning: ``model.data.train_ds`` JSONL ``file_names`` and per-record probabilities."""
    from mergeopt.export.formats import sliced

    names = ctx.plan.names
    _check_one_layout(ctx)
    train_ds = {
        "file_names": [str(ctx.datasets[n]) for n in names],
        "concat_sampling_probabilities": [ctx.plan.sample_shares[n] for n in names],
    }
    lines = [
        ctx.header(NEMO_SFT),
        "# train_ds of megatron_gpt_finetuning_config.yaml (NeMo 1's nlp collection): JSONL files; for",
        "#   prompt/completion records set prompt_template '{prompt} {completion}' and label_key 'completion'.",
        *_NEMO_RELEASES,
    ]
    lines += [
        f"# {n}: {path} is not .jsonl: train_ds.file_names wants the JSONL file"
        for n, path in zip(names, train_ds["file_names"])
        if Path(path).suffix != ".jsonl"
    ]
    lines += [
        f"# {n}: {ctx.datasets[n]} holds conversations; GPTSFTDataset reads string fields through "
        "prompt_template, so set model.data.chat: true (GPTSFTChatDataset) and write each record as "
        '{"system": ..., "mask": "User", "conversations": [{"from": "User", "value": ...}, '
        '{"from": "Assistant", "value": ...}]}'
        for n in names
        if _holds_conversations(ctx.datasets[n])
    ]
    lines += [
        f"# {n}: {use.calls} records call tools, and GPTSFTChatDataset's turns are a speaker's name "
        "and text (from, value; no tool_calls): write each call and each tool's answer into the text of a turn, as "
        "the model is to read them, or leave those records out"
        for n, use in sliced.tool_calls(ctx).items()
    ]
    lines += sliced.own_template_note(ctx, NEMO_SFT_READER, NEMO_SFT_OWN)
    body = yaml.safe_dump({"model": {"data": {"train_ds": train_ds}}}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


NEMO_SFT_READER = "NeMo's fine-tuning"
# GPTSFTChatDataset (NeMo 1) joins the turns with the config's chat_prompt_tokens; no Jinja template
NEMO_SFT_OWN = "GPTSFTChatDataset's turns joined by model.data.chat_prompt_tokens, not a Jinja template"
# how NeMo 1 reads each layout: one ``prompt_template``/``label_key`` over strings, or chat records
_SFT_LAYOUTS = {
    "text": "text",
    "prompt_completion": "prompt/completion",
    "messages": "conversations",
    "prompt_completion_messages": "conversations",
}


def _check_one_layout(ctx: Context) -> None:
    """One record layout for every file: NeMo 1's fine-tuning (megatron_gpt_sft_model.py,
    ``_build_dataset``) builds every file of ``train_ds`` with one dataset class (GPTSFTChatDataset
    for all under ``model.data.chat: true``, else GPTSFTDataset) and one ``prompt_template`` and
    ``label_key``, so text beside prompt/completion records, or either beside conversations, has no
    config that reads them all: each would stop it (a KeyError on the missing field) or, renamed to
    fit, train on other text than the fit scored."""
    from mergeopt.export.formats import sliced

    layouts = sliced.record_layouts(ctx, NEMO_SFT_READER, _SFT_LAYOUTS)
    if len(set(layouts.values())) > 1:
        said = ", ".join(f"{n!r} {k}" for n, k in layouts.items())
        raise UserError(
            f"--to nemo-sft: the datasets' records differ ({said}), and {NEMO_SFT_READER} reads every "
            "file of train_ds with one prompt_template and label_key (or all as chat records, "
            "model.data.chat: true): write every dataset in one layout"
        )


def _holds_conversations(path: Path) -> bool:
    """Whether the records are conversations (``messages``, or prompt/completion lists of
    messages), which NeMo 1's GPTSFTDataset cannot read: its prompt_template joins strings."""
    from mergeopt.export import token_stats
    from mergeopt.export.token_files import kind_of

    if kind_of(path) is not None:
        return False
    source = token_stats.source_of(path)
    columns = token_stats.columns(source)
    return "messages" in columns or ("prompt" in columns and "prompt" not in token_stats.text_columns(source))


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
    meaning="data_prefix: each dataset's share of training tokens (pretraining; normalized to sum 1).",
    render=render_nemo,
)
NEMO_SFT = Format(
    name="nemo-sft",
    filename="nemo_sft_data.yaml",
    unit="samples",
    needs_paths=True,
    meaning="concat_sampling_probabilities: each JSONL file's share of the records drawn (fine-tuning).",
    render=render_nemo_sft,
)
