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
which is then what the counts are measured from (:mod:`mergeopt.export.token_files`).
Streaming refuses two streams with one ``local`` directory (streaming/base/shared/prefix.py,
``_check_self``: "Reused local directory"), so two domains given the same path are refused here.
Checked against mosaicml-streaming 0.13.0 and llm-foundry's llmfoundry/data/text_data.py
(``build_text_dataloader``: ``Stream(**stream)`` for each value of ``streams``).
"""

from __future__ import annotations

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats.base import Context, Format


def _check_locals(ctx: Context) -> None:
    """One ``local`` directory per stream, as streaming requires (it raises "Reused local directory")."""
    seen: dict[str, str] = {}
    for name in ctx.plan.names:
        local = str(ctx.datasets[name])
        if local in seen:
            raise UserError(
                f"--to llm-foundry: streams {seen[local]!r} and {name!r} have the same local {local}, "
                "which streaming refuses (Reused local directory): give each domain its own MDS directory"
            )
        seen[local] = name


def render(ctx: Context) -> str:
    plan = ctx.plan
    _check_locals(ctx)
    streams = {}
    for name in plan.names:
        stream: dict = {"local": str(ctx.datasets[name])}
        if plan.counts is not None:
            stream["choose"] = plan.counts[name]
        else:
            stream["proportion"] = plan.sample_shares[name]
        streams[name] = stream
    config = {"train_loader": {"dataset": {"streams": streams}}}
    lines = [ctx.header(FORMAT)]
    for name in plan.names:
        if not (ctx.datasets[name] / "index.json").is_file():
            lines.append(
                f"# {name}: {ctx.datasets[name]} is not an MDS directory (no index.json): convert it"
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
