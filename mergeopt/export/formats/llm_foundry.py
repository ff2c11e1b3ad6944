"""llm-foundry / MosaicML streaming: ``train_loader.dataset.streams.<name>``, ``proportion`` or ``choose``.

Followed: mosaicml/streaming streaming/base/stream.py (commit 004a43a9; ``Stream(remote, local,
split, proportion, repeat, choose|samples, ...)``: at most one of them per stream; ``proportion`` is
relative — "the proportion of the total combined dataset that consists of this sub-dataset" — and
``repeat`` / ``choose`` are absolute; relative and absolute weights cannot be mixed across streams)
and streaming/base/dataset.py, which divides the proportions by their sum and draws ``epoch_size ·
proportion`` samples per stream; the docs page "Mixing Datasets"
(docs.mosaicml.com/projects/streaming, dataset_configuration/mixing_data_sources.html). llm-foundry
passes each ``train_loader.dataset.streams`` entry to ``Stream``. A stream's unit is one sample (one
prompt/response for finetuning), so mergeopt writes sample shares as ``proportion``; with a budget
it writes the exact sample counts as ``choose`` (streaming derives ``repeat`` = choose / stream
size). ``local`` is the path given to ``--datasets``: point it at the MDS directory of that domain,
which is then what the counts are measured from (:mod:`mergeopt.export.token_files`). A path that
is a root of one split (``ROOT/train/index.json``, as llm-foundry's convert scripts write) gets
``split`` too, as llm-foundry's own stream configs name it (``local: ROOT, split: train``); a stream
without ``split`` takes the dataset's (streaming's ``Stream.apply_default``) and would read
``local/<split>``, so the header says to leave it unset. A root of several splits is refused
(:func:`~mergeopt.export.mixture_input.mds_split`). Streaming refuses two streams that read one
directory, ``local/split`` (streaming/base/shared/prefix.py, ``_check_self``: "Reused local
directory"), so two domains given the same data are refused here.
Checked against mosaicml-streaming 0.13.0 and llm-foundry's llmfoundry/data/text_data.py
(``build_text_dataloader``: ``Stream(**stream)`` for each value of ``streams``).
"""

from __future__ import annotations

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.mixture_input import is_mds, mds_split


def _check_locals(ctx: Context, splits: dict[str, str | None]) -> None:
    """One directory (``local/split``) per stream, as streaming requires (it raises "Reused local
    directory")."""
    seen: dict[str, str] = {}
    for name in ctx.plan.names:
        split = splits[name]
        local = str(ctx.datasets[name] / split) if split else str(ctx.datasets[name])
        if local in seen:
            raise UserError(
                f"--to llm-foundry: streams {seen[local]!r} and {name!r} read the same local {local}, "
                "which streaming refuses (Reused local directory): give each domain its own MDS directory"
            )
        seen[local] = name


def render(ctx: Context) -> str:
    plan = ctx.plan
    splits = {name: mds_split(ctx.datasets[name]) for name in plan.names}
    _check_locals(ctx, splits)
    streams = {}
    for name in plan.names:
        stream: dict = {"local": str(ctx.datasets[name])}
        if splits[name]:
            stream["split"] = splits[name]
        if plan.counts is not None:
            stream["choose"] = plan.counts[name]
        else:
            stream["proportion"] = plan.sample_shares[name]
        streams[name] = stream
    config = {"train_loader": {"dataset": {"streams": streams}}}
    lines = [ctx.header(FORMAT)]
    for name in plan.names:
        if not is_mds(ctx.datasets[name]):
            lines.append(
                f"# {name}: {ctx.datasets[name]} is not an MDS directory (no index.json): convert it"
            )
    if any(is_mds(ctx.datasets[n]) and not splits[n] for n in plan.names):
        lines.append(
            "# a stream without split reads its local directory itself: leave train_loader.dataset.split "
            "unset (streaming would read local/<split>)"
        )
    if plan.counts is not None:
        lines.append("# choose: absolute samples per epoch from each stream (the budget's counts)")
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="llm-foundry",
    filename="llm_foundry.yaml",
    unit="samples",
    needs_paths=True,
    meaning="proportion: each stream's share of the samples of an epoch (streaming normalizes to sum 1).",
    render=render,
)
