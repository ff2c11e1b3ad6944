"""allenai open-instruct: ``dataset_mixer_list`` pairs of dataset and fraction-or-count.

Followed: allenai/open-instruct open_instruct/dataset_transformation.py (``get_cached_dataset_tulu``):
the list alternates dataset name and a string; a string containing "." is a float fraction of that
dataset (``int(frac * len(dataset))`` samples), one without is an integer count of samples
(``if frac_or_num_samples > 1.0: new_range = int(...)``); older versions refuse a count above the
dataset's length ("Dataset range exceeds dataset length"), newer ones upsample it
(``calculate_dataset_range``). The README's Tulu 3 commands use ``--dataset_mixer_list
allenai/tulu-3-sft-mixture 1.0``. So the numbers are per-dataset, not shares of the mixture:
without a budget mergeopt writes fractions (at most 1.0, always with a ".", all with one number of
decimals: the fewest that reads every count back exactly) of the largest mixture in the fitted
sample shares that repeats no dataset; with a budget it writes integer sample counts. A local
file path is accepted where a hub name is, but only a ``.jsonl`` or ``.parquet`` one
(``DatasetConfig.__post_init__``, open-instruct at e6c3044a): any other path (a CSV, JSON array,
arrow file or ``save_to_disk`` directory) is looked up on the Hub, so the header says so.

open-instruct's SFT transforms (``sft_tokenize_v1``, ``sft_tulu_tokenize_and_truncate_v1`` and the
others in dataset_transformation.py) read each record's conversation from one column,
``messages`` (``sft_messages_key``): a dataset of text, prompt/completion or multiple-choice
records stops them (``KeyError: 'messages'``), so the header says, per such dataset, what to write.
"""

from __future__ import annotations

import yaml

from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format

READER = "open-instruct's SFT"
# DatasetConfig.__post_init__ loads a path that exists and ends so from disk, any other as a hub name
LOCAL_SUFFIXES = (".jsonl", ".parquet")


def layout_notes(ctx: Context) -> list[str]:
    """A header line per dataset open-instruct cannot read as it is (no ``messages`` column)."""
    from mergeopt.export.token_files import kind_of

    lines = []
    for name in ctx.plan.names:
        path = ctx.datasets[name]
        if kind_of(path) is not None:
            lines.append(f"# {name}: {path} holds stored token ids; {READER} reads records (messages)")
            continue
        if not str(path).endswith(LOCAL_SUFFIXES):
            lines.append(
                f"# {name}: {path} is not a .jsonl or .parquet file, the only local datasets open-instruct "
                "loads (any other name is looked up on the Hugging Face Hub): write it as JSON Lines"
            )
        found = sliced.classify(READER, path)
        if found == "messages":
            continue
        if found.startswith("holds multiple-choice records"):  # prompt/completion would not do either
            found = (
                f"holds multiple-choice records (prompt/choices/answer); {READER} reads the conversation "
                'of each record from its messages column: write each as {"messages": [{"role": "user", '
                '"content": prompt}, {"role": "assistant", "content": choices[answer]}]}'
            )
        if found in ("text", "prompt_completion"):
            found = (
                f"holds {'text' if found == 'text' else 'prompt/completion'} records; {READER} reads "
                'the conversation of each record from its messages column: write each as {"messages": '
                + (
                    '[{"role": "assistant", "content": text}]}'
                    if found == "text"
                    else '[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}'
                )
            )
        lines.append(f"# {name}: {path} {found}")
    return lines


def values(ctx: Context) -> dict[str, str]:
    """name -> the string open-instruct parses: a count ('123') or a fraction ('0.317', '1.000')."""
    plan = ctx.plan
    counts = ctx.whole_samples(FORMAT)
    if plan.counts is not None:
        return {n: str(int(counts[n])) for n in plan.names}
    return fraction_strings(counts, {n: plan.stats[n].samples for n in plan.names})


MAX_DECIMALS = 30  # 10**decimals above every size always fits; float parsing is the limit, not this


def fraction_strings(counts: dict[str, int], sizes: dict[str, int]) -> dict[str, str]:
    """Each dataset's fraction with one number of decimals for all, the fewest that turns every one
    back into its count: a list of fractions that reads evenly ('0.317', '0.389', '1.000'), each
    exact. 10**decimals > size always fits, so a mixture of small datasets gets few decimals."""
    for decimals in range(1, MAX_DECIMALS + 1):
        texts = {n: fraction_at(counts[n], sizes[n], decimals) for n in counts}
        if all(t is not None for t in texts.values()):
            return {n: t for n, t in texts.items() if t is not None}
    raise AssertionError(f"no fraction of {MAX_DECIMALS} decimals gives the counts {counts} of {sizes}")


def fraction_at(count: int, size: int, decimals: int) -> str | None:
    """A fraction with ``decimals`` decimals that open-instruct turns back into ``count`` of ``size``,
    or None where that many decimals cannot say it.

    It takes ``int(float(text) * size)`` samples, so ``count / size`` itself can fall one short
    (0.29 * 100 = 28.999...): the smallest fraction at or above it is tried, then the next one up,
    both below (count + 1) / size. A whole dataset is 1 ('1.000': not above 1.0, so a fraction).
    """
    if count >= size:
        return "1." + "0" * decimals
    scale = 10**decimals
    lowest = -(-count * scale // size)  # ceil(count / size * scale), in integers
    for numerator in (lowest, lowest + 1):
        if numerator * size >= (count + 1) * scale:
            break
        text = f"0.{numerator:0{decimals}d}"
        if int(float(text) * size) == count:
            return text
    return None


def fraction_string(count: int, size: int) -> str:
    """One dataset's fraction as :func:`fraction_strings` writes it alone."""
    return fraction_strings({"": count}, {"": size})[""]


# TokenizerConfig.chat_template_name names one of CHAT_TEMPLATES; unset, the template is
# tokenizer_name_or_path's (get_tokenizer_tulu_v2_2): the base's, as mergeopt counts without
# data.chat_template, but no Jinja file can be given
OWN = "chat_template_name names a registered one, else tokenizer_name_or_path's; it takes no Jinja file"


def render(ctx: Context) -> str:
    plan = ctx.plan
    mixer: list[str] = []
    for name, value in values(ctx).items():
        mixer += [str(ctx.datasets[name]), value]
    config = {"dataset_mixer_list": mixer, "dataset_mixer_list_splits": ["train"]}
    kind = "integer sample counts" if plan.counts is not None else "fractions of each dataset"
    cli = " ".join(["--dataset_mixer_list", *mixer])
    lines = [ctx.header(FORMAT), f"# values: {kind}", f"# on the command line: {cli}", *layout_notes(ctx)]
    if ctx.recipe is not None and ctx.recipe.data.chat_template is not None:
        lines += sliced.own_template_note(ctx, "open-instruct", OWN)
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="open-instruct",
    filename="open_instruct.yaml",
    unit="samples",
    needs_paths=True,
    meaning="dataset_mixer_list: per dataset, a fraction of it ('0.5', with a dot) or a count ('1200').",
    render=render,
    needs_sizes=True,
)
