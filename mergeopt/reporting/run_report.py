"""report.md in the run directory: the answer, its evidence and the figures, to look at instead of read.

A fit ends with a mixture.json that only a program enjoys. The report puts on one page what a
person checks before trusting it: the recommended mixture beside the uniform one and every single
expert, how the search got there (the loss curve or the search's values, and the weights' path on
the simplex), with a rank check, how well the merged proxy ordered the trained grid, and after
``mergeopt diagnose``, the experts' diagnostics and the flags raised on them. It is
Markdown with relative links to PNGs in the same directory, so it renders on GitHub, in JupyterLab
and in VS Code, and travels with the directory. Built only from the run directory's files (through
:mod:`mergeopt.reporting.analysis`), so ``python -m mergeopt.rank`` can rewrite it after adding a rank check.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mergeopt.reporting.analysis import (
    Run,
    group_table,
    load_run,
    mixture_table,
    of_other_experts,
    plot_simplex,
    rank_table,
)
from mergeopt.reporting.diagnostics import report_section
from mergeopt.reporting.outcome_warnings import warning_lines
from mergeopt.reporting.report import four_places, loss_terms_weighed, markdown_table
from mergeopt.run_files import DiagnoseFile, MixtureFile, RankReport, read_run_file
from mergeopt.runtime.files import save_figure_atomic, write_text_atomic

REPORT = "report.md"
SIMPLEX = "simplex.png"


def _metric_terms(m: dict) -> list[str] | None:
    """The objective's term labels when it has any term besides losses (a zero-order fit of
    metrics), else None: then the dev losses above are the whole objective."""
    objective = m.get("objective") or {}
    if "scores" not in objective or all(t["kind"] == "loss" for t in objective["terms"]):
        return None
    return [t["label"] for t in objective["terms"]]


def _score_section(m: dict) -> list[str]:
    """The objective terms of the fitted, uniform and single-expert mixtures, as the summary prints
    them: what a metric fit optimised, beside the dev losses it did not."""
    scores = m["objective"]["scores"]
    labels = list(next(iter(scores.values()))["fit"])
    held = any(parts["heldout"] for parts in scores.values())
    rows = {
        row: {
            label: four_places(parts["fit"][label])
            + (f" / {four_places(parts['heldout'][label])}" if held else "")
            for label in labels
        }
        for row, parts in scores.items()
    }
    return [
        "### Objective terms",
        "",
        "Each term's score on the fit part of its dev set"
        + (" / on the held-out part" if held else "")
        + " (`objective.terms`; the search ranked mixtures by their weighted sum on the fit part).",
        "",
        markdown_table(pd.DataFrame.from_dict(rows, orient="index")),
        "",
    ]


def _warning_lines(m: dict) -> list[str]:
    """The warnings the fit printed on its outcome (a NaN that stopped it, a search that ended worse
    than the uniform mixture or an expert alone), kept with the run."""
    lines = warning_lines(m)
    return [f"**Note:** {line[0].upper()}{line[1:]}." for line in lines] + ([""] if lines else [])


def _mixture_section(run: Run) -> list[str]:
    m = run.mixture
    table = mixture_table(run)
    fitted = table.loc["fitted"]
    best_single = table.drop(index=["fitted", "uniform"])["heldout_loss"].min()
    terms = _metric_terms(m)
    losses = loss_terms_weighed(m)
    if terms:
        aim = f"objective **{', '.join(terms)}**"
    elif losses:  # the dev losses below weigh the sets as these terms do
        aim = f"objective **{', '.join(losses)}** (the dev losses below weigh the sets as it does)"
    else:
        aim = f"target **{m['target']}**"
    lines = [
        "## Recommended mixture",
        "",
        f"Strategy **{m['strategy']}**, merge **{m['method']['name']}**, {aim}, "
        f"seed {m['seed']}, {m['processes']} process(es) on {m['device']}."
        + (f" The weights are shares of training {m['unit']} (`weights.unit`)." if m.get("unit") else ""),
        "",
        *_warning_lines(m),
        markdown_table(table),
        "",
    ]
    if fitted["heldout_loss"] == fitted["heldout_loss"]:  # not NaN: the dev sets hold something out
        lines += [
            f"Held-out dev loss: fitted {fitted['heldout_loss']:.4f}, uniform "
            f"{four_places(table.loc['uniform', 'heldout_loss'])}, best single expert {four_places(best_single)}.",
            "",
        ]
    if terms:
        lines += _score_section(m)
    groups = group_table(run)
    if groups is not None:
        lines += [
            "### Both levels of the hierarchical mixture",
            "",
            "Each expert's weight is its group's share times its share within the group "
            "(`weights.groups`; an expert no group names is a group of its own).",
            "",
            markdown_table(groups),
            "",
        ]
    return lines


def _search_section(run: Run) -> list[str]:
    lines = ["## How the fit got there", ""]
    for figure, caption in (
        ("loss_curve.png", "dev loss and weights per optimizer step"),
        ("search_curve.png", "objective value per evaluation and the weights evaluated"),
    ):
        if (run.path / figure).is_file():
            lines += [f"![{caption}]({figure})", ""]
    if (run.path / SIMPLEX).is_file():
        lines += [f"![weights on the simplex]({SIMPLEX})", ""]
    return lines


def _rank_section(run: Run) -> list[str]:
    table = rank_table(run)
    if run.rank.get("grid"):
        compared = f"{run.rank['n_mixtures']} trained mixtures from `{run.rank['grid']}`"
    else:  # table mode (`mergeopt rank --proxy A --truth B`): no grid, two tables
        compared = f"{run.rank['n_mixtures']} mixtures, `{run.rank['proxy']}` against `{run.rank['truth']}`"
    lines = [
        "## Does the merged proxy rank mixtures like training does?",
        "",
        f"{compared}; intervals are seeded bootstrap "
        f"{run.rank['options']['confidence']:.0%} percentiles; regret is normalised to [0, 1].",
        "",
        markdown_table(table, 3),
        "",
    ]
    if "baselines" in run.rank:  # grid mode: the proxy beside the baselines, or why each was not computed
        from mergeopt.evaluation.rank_report import baseline_table

        lines += [baseline_table(run.rank), ""]
    fitted = run.rank.get("fitted_mixture")
    if fitted:
        from mergeopt.evaluation.rank_stats import nearest_line

        lines += [
            f"Fitted mixture: nearest grid mixture on {nearest_line(run.rank)} "
            f"(distance {fitted['distance']:.3f}), normalised regret {fitted['regret']:.3f}.",
            "",
        ]
    if (run.path / "rank_scatter.png").is_file():
        lines += ["![proxy against truth](rank_scatter.png)", ""]
    if run.mixture is None and (run.path / SIMPLEX).is_file():  # a fit's report shows it in its own section
        lines += [f"![the grid's mixtures on the simplex]({SIMPLEX})", ""]
    return lines


def check_report_inputs(directory: str | Path, replaced: Iterable[str] = ()) -> None:
    """Read the run files that report.md will be rewritten from, all but the ``replaced`` ones.

    A command that rewrites report.md after its work (diagnose) calls this before the work, so a
    file there that this mergeopt cannot read (a newer mergeopt's, a damaged one) is refused at
    once and named where the user has it, not after every evaluation in the staging directory.
    """
    root = Path(directory)
    for model in (MixtureFile, RankReport, DiagnoseFile):
        if model.FILE not in replaced and (root / model.FILE).is_file():
            read_run_file(model, root)


def other_experts_line(file: str, experts: list[str], command: str) -> str:
    """Why a run file of other experts than the fit's is left out of report.md (and what to do)."""
    return (
        f"{file} is of other experts ({', '.join(experts)}) than this fit's mixture.json: it describes "
        f"a run this directory no longer holds; rerun `mergeopt {command}` with this recipe, or remove it"
    )


def _left_out(title: str, file: str, other: dict[str, list[str]], command: str) -> list[str]:
    return [f"## {title}", "", f"Left out: {other_experts_line(file, other[file], command)}.", ""]


def write_report(directory: str | Path, mixture: dict | None = None, name: str | None = None) -> Path:
    """Write simplex.png (when the run has weights) and report.md into ``directory``; returns the report.

    ``name``: the run's name in the title when ``directory`` is a staging directory
    (:mod:`mergeopt.runtime.rundir`), not the run directory itself.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run = load_run(directory, mixture)
    if run.mixture is not None or run.rank_pairs is not None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        try:
            plot_simplex(run, ax)
            fig.tight_layout()
            save_figure_atomic(fig, run.path / SIMPLEX)
        finally:
            plt.close(fig)
    lines = [f"# mergeopt run: {name or run.path.name}", ""]
    if run.mixture is not None:
        lines += _mixture_section(run) + _search_section(run)
    other = of_other_experts(run)
    if RankReport.FILE in other:
        lines += _left_out(
            "Does the merged proxy rank mixtures like training does?", RankReport.FILE, other, "rank"
        )
    elif run.rank is not None:
        lines += _rank_section(run)
    if DiagnoseFile.FILE in other:
        lines += _left_out("Diagnostics", DiagnoseFile.FILE, other, "diagnose")
    elif run.diagnose is not None:
        lines += report_section(DiagnoseFile.model_validate(run.diagnose), run.path)
    return write_text_atomic(run.path / REPORT, "\n".join(lines).rstrip() + "\n")
