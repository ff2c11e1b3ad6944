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
"""

from __future__ import annotations

import yaml

from mergeopt.export.formats.base import Context, Format
from mergeopt.export.token_stats import source_of


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


def render(ctx: Context) -> str:
    plan = ctx.plan
    counts = ctx.whole_samples(FORMAT)
    summary = ", ".join(f"{n} {counts[n]}" for n in plan.names)
    lines = [ctx.header(FORMAT), f"# samples per dataset: {summary}"]
    return "\n".join(lines) + "\n" + yaml.safe_dump({"datasets": entries(ctx)}, sort_keys=False)


FORMAT = Format(
    name="trl",
    filename="trl_datasets.yaml",
    unit="samples",
    needs_paths=True,
    meaning="split train[:N]: N samples of that dataset; the concatenation is the mixture.",
    render=render,
    needs_sizes=True,
)
