"""allenai open-instruct: ``dataset_mixer_list`` pairs of dataset and fraction-or-count.

Followed: allenai/open-instruct open_instruct/dataset_transformation.py (``get_cached_dataset_tulu``):
the list alternates dataset name and a string; a string containing "." is a float fraction of that
dataset (``int(frac * len(dataset))`` samples), one without is an integer count of samples
(``if frac_or_num_samples > 1.0: new_range = int(...)``); older versions refuse a count above the
dataset's length ("Dataset range exceeds dataset length"), newer ones upsample it
(``calculate_dataset_range``). The README's Tulu 3 commands use ``--dataset_mixer_list
allenai/tulu-3-sft-mixture 1.0``. So the numbers are per-dataset, not shares of the mixture:
without a budget mergeopt writes fractions (at most 1.0, always with a ".") of the largest
mixture in the fitted sample shares that repeats no dataset; with a budget it writes integer
sample counts. A local file path is accepted where a hub name is.
"""

from __future__ import annotations

import yaml

from mergeopt.export.formats.base import Context, Format


def values(ctx: Context) -> dict[str, str]:
    """name -> the string open-instruct parses: a count ('123') or a fraction ('0.5', '1.0')."""
    plan = ctx.plan
    counts = ctx.whole_samples(FORMAT)
    if plan.counts is not None:
        return {n: str(int(counts[n])) for n in plan.names}
    return {n: fraction_string(counts[n], plan.stats[n].samples) for n in plan.names}


def fraction_string(count: int, size: int) -> str:
    """The shortest decimal with a '.' that open-instruct turns back into ``count`` of ``size``.

    It takes ``int(float(text) * size)`` samples, so ``count / size`` itself can fall one short
    (0.29 * 100 = 28.999...); a few more digits, or the middle of the interval, cannot.
    """
    if count >= size:
        return "1.0"
    for digits in range(1, 18):
        text = f"{count / size:.{digits}f}"
        if int(float(text) * size) == count:
            return text
    return f"{(count + 0.5) / size:.17f}".rstrip("0")


def render(ctx: Context) -> str:
    plan = ctx.plan
    mixer: list[str] = []
    for name, value in values(ctx).items():
        mixer += [str(ctx.datasets[name]), value]
    config = {"dataset_mixer_list": mixer, "dataset_mixer_list_splits": ["train"]}
    kind = "integer sample counts" if plan.counts is not None else "fractions of each dataset"
    cli = " ".join(["--dataset_mixer_list", *mixer])
    lines = [ctx.header(FORMAT), f"# values: {kind}", f"# on the command line: {cli}"]
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
