"""Hugging Face ``datasets``: a runnable Python snippet, and the same arguments as YAML.

Followed: huggingface/datasets src/datasets/combine.py, ``interleave_datasets(datasets,
probabilities=None, seed=None, info=None, split=None, stopping_strategy="first_exhausted")``
(datasets 5.2, the version installed here): with probabilities, each example is taken from a
source drawn with those probabilities, so they are per-sample probabilities (mergeopt writes the
sample shares); ``first_exhausted`` stops when one source runs out (no example repeated),
``all_exhausted`` restarts exhausted sources until every one has been seen. Files are loaded with
``load_dataset(loader, data_files=..., split="train")`` and ``save_to_disk`` directories with
``load_from_disk``. Datasets of different record layouts (text, prompt/completion, messages) join
into one with every column, None where a record has none; the header says so, since a trainer that
reads one layout for the whole dataset (TRL's SFTTrainer) stops on it or misreads records.
``messages`` datasets whose messages ``datasets`` types differently (tool-calling conversations
beside plain ones) cannot be joined at all and are refused (:func:`sliced.check_message_types`).

Without a budget the snippet interleaves with ``first_exhausted``: the proportions hold in
expectation and nothing repeats. With a budget the counts are exact: each dataset is shuffled,
cut (or repeated past its end) to its count, and the parts are concatenated and shuffled.
"""

from __future__ import annotations

import yaml

from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.token_stats import source_of


def _sources(ctx: Context) -> dict[str, tuple[str, str]]:
    """name -> (loader, path): the loader is 'json', 'csv', 'parquet', 'arrow' or 'disk'."""
    out = {}
    for name in ctx.plan.names:
        source = source_of(ctx.datasets[name])
        out[name] = (source.loader, str(source.path))
    return out


def layout_note(ctx: Context) -> list[str]:
    """A header line where the datasets' records differ in layout: ``interleave_datasets`` and
    ``concatenate_datasets`` join them into one dataset with every column, None where a record has
    none, which a trainer that reads one layout for the whole dataset (TRL's SFTTrainer, see
    :mod:`mergeopt.export.formats.trl`) stops on or misreads."""
    from mergeopt.export.formats.trl import LAYOUT_NAMES

    layouts = sliced.record_layouts(ctx, "datasets", LAYOUT_NAMES)
    if len(set(layouts.values())) < 2:
        return []
    said = ", ".join(f"{n} {k}" for n, k in layouts.items())
    return [
        f"# the datasets' records differ ({said}): the mixture holds all their columns, None where a "
        "record has none; a trainer that reads one layout for the whole dataset (TRL's SFTTrainer) stops "
        'on it or misreads records: give every record one layout first (conversations as {"messages": ...})'
    ]


def _dict_literal(values: dict, indent: str = "    ") -> str:
    body = "".join(f"{indent}{k!r}: {v!r},\n" for k, v in values.items())
    return "{\n" + body + "}"


JOINER = "interleave_datasets (concatenate_datasets under a budget)"


def render_python(ctx: Context) -> str:
    sliced.check_message_types(ctx, PYTHON.name, JOINER)
    plan = ctx.plan
    sources = _sources(ctx)
    probabilities = {n: plan.sample_shares[n] for n in plan.names}
    parts = [
        ctx.header(PYTHON),
        *layout_note(ctx),
        "from datasets import concatenate_datasets, interleave_datasets, load_dataset, load_from_disk",
        "",
        '# name: (loader, path); loader "disk" is a save_to_disk directory',
        f"SOURCES = {_dict_literal(sources)}",
        "# probability that each drawn sample comes from each dataset (sum 1)",
        f"PROBABILITIES = {_dict_literal(probabilities)}",
    ]
    if plan.counts is not None:
        parts.append("# samples of each dataset under the budget (repeated past its end if need be)")
        parts.append(f"COUNTS = {_dict_literal(ctx.whole_samples(PYTHON))}")
    parts += [
        f"SEED = {ctx.seed}",
        "",
        "",
        "def load(loader, path):",
        '    if loader == "disk":',
        "        return load_from_disk(path)",
        '    return load_dataset(loader, data_files=path, split="train")',
        "",
        "",
    ]
    if plan.counts is None:
        parts += [
            "parts = [load(*SOURCES[name]) for name in PROBABILITIES]",
            "mixture = interleave_datasets(",
            "    parts,",
            "    probabilities=list(PROBABILITIES.values()),",
            "    seed=SEED,",
            '    stopping_strategy="first_exhausted",',
            ")",
        ]
    else:
        parts += [
            "def take(dataset, count):",
            "    shuffled = dataset.shuffle(seed=SEED)",
            "    return shuffled.select([i % len(shuffled) for i in range(count)])",
            "",
            "",
            "parts = [take(load(*SOURCES[name]), COUNTS[name]) for name in COUNTS]",
            "mixture = concatenate_datasets(parts).shuffle(seed=SEED)",
        ]
    return "\n".join(parts) + "\n"


def render_yaml(ctx: Context) -> str:
    sliced.check_message_types(ctx, YAML.name, JOINER)
    plan = ctx.plan
    sources = []
    for name, (loader, path) in _sources(ctx).items():
        key = "path" if loader == "disk" else "data_files"
        sources.append({"name": name, "loader": loader, key: path})
    config: dict = {
        "sources": sources,
        "probabilities": [plan.sample_shares[n] for n in plan.names],
        "seed": ctx.seed,
        "stopping_strategy": "first_exhausted",
    }
    if plan.counts is not None:
        config["counts"] = ctx.whole_samples(YAML)
    usage = [
        "# Use: parts = [load_dataset(s['loader'], data_files=s['data_files'], split='train')",
        "#       (load_from_disk(s['path']) for loader 'disk') for s in sources];",
        "#      interleave_datasets(parts, probabilities=..., seed=..., stopping_strategy=...).",
        "# counts (with a budget): exact samples per dataset, to cut or repeat each part to before mixing.",
    ]
    lines = [ctx.header(YAML), *usage, *layout_note(ctx)]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


_MEANING = "probabilities: the probability that each drawn sample comes from that dataset (sum 1)."
PYTHON = Format(
    name="hf-datasets",
    filename="hf_datasets.py",
    unit="samples",
    needs_paths=True,
    meaning=_MEANING,
    render=render_python,
)
YAML = Format(
    name="hf-datasets-yaml",
    filename="hf_datasets.yaml",
    unit="samples",
    needs_paths=True,
    meaning=_MEANING,
    render=render_yaml,
)
