"""What a fit leaves in its run directory: the file names, their writing, and the warnings said beside them.

Why a module of its own: ``mergeopt.fit`` runs the search and builds mixture.json's content;
this module turns that content into files (mixture.json, the trace or the evaluations, the plots,
recipe.yaml, report.md) inside a staged directory that the caller publishes in one swap, and says
which files a fit owns, so a rerun replaces exactly those and keeps other commands' files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mergeopt.config import Recipe, recipe_to_yaml
from mergeopt.reporting.report import plot_loss_curve, plot_search_curve
from mergeopt.run_files import MixtureFile
from mergeopt.runtime.files import write_csv_atomic, write_json_atomic, write_text_atomic
from mergeopt.runtime.resume import CHECKPOINT_DIR
from mergeopt.runtime.rundir import Staging, staged

GRADIENT_FILES = ("mixture.json", "trace.csv", "recipe.yaml", "loss_curve.png", "simplex.png", "report.md")
SEARCH_FILES = (
    "mixture.json",
    "evaluations.csv",
    "recipe.yaml",
    "search_curve.png",
    "simplex.png",
    "report.md",
)


def output_files(recipe: Recipe) -> tuple[str, ...]:
    """The files a finished run directory holds (rank adds its own when rank.grid is set)."""
    files = GRADIENT_FILES if recipe.search.strategy == "gradient" else SEARCH_FILES
    if recipe.rank.grid is not None:
        from mergeopt.evaluation.rank_report import OUTPUT_FILES as RANK_FILES

        files = (*files, *RANK_FILES)
    return files


def owned_files(recipe: Recipe) -> tuple[str, ...]:
    """What a fit replaces in its output_dir: its outputs, either strategy's, and its checkpoint.

    Another command's files there (diagnose's, a later ``mergeopt rank``'s) are kept.
    """
    files = (*GRADIENT_FILES, *SEARCH_FILES, CHECKPOINT_DIR)
    if recipe.rank.grid is not None:
        from mergeopt.evaluation.rank_report import OUTPUT_FILES as RANK_FILES

        files = (*files, *RANK_FILES)
    return files


def write_outputs(
    recipe: Recipe,
    mixture: dict,
    trace: Sequence[dict],
    names: Sequence[str],
    staging: Staging | None = None,
) -> Path:
    """Write the run's files into ``staging`` (published by the caller), or publish them at once."""
    record = MixtureFile.model_validate(mixture).to_json()  # the schema is checked before anything is written
    if staging is None:
        with staged(recipe.output_dir, owned_files(recipe)) as staging:
            write_outputs(recipe, mixture, trace, names, staging)
        return Path(recipe.output_dir)
    run_name = Path(recipe.output_dir).name
    out = staging.path
    write_text_atomic(out / "recipe.yaml", recipe_to_yaml(recipe, absolute_paths=True))
    if mixture["strategy"] == "gradient":
        columns = ["step", "loss", "heldout_loss", *(f"w_{n}" for n in names)]
        write_csv_atomic(out / "trace.csv", trace, columns)
        plot_loss_curve(trace, names, out / "loss_curve.png", title=f"mergeopt fit: {run_name}")
    else:
        from mergeopt.search.zero_order import evaluation_columns

        write_csv_atomic(out / "evaluations.csv", trace, evaluation_columns(names, trace))
        title = f"mergeopt fit ({mixture['strategy']}): {run_name}"
        plot_search_curve(trace, names, out / "search_curve.png", "objective value (lower is better)", title)
    from mergeopt.reporting.run_report import write_report

    staging.carry_over()  # report.md also sums up the other commands' files in the directory
    write_report(out, mixture, run_name)  # simplex.png and report.md, from the files above and the mixture
    write_json_atomic(out / "mixture.json", record)
    return out
