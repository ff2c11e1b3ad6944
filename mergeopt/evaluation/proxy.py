"""The merged proxy on a grid of mixtures: dev losses and metric scores of θ(w) for every row of a grid table.

Ranking checks compare these numbers with models really trained on each mixture (``grid.csv`` from
``mergeopt.worlds.train``, or any table with one ``w_<expert>`` column per expert). Nothing is written to
disk: the model is evaluated at each mixture, each layer merging as it runs. Metric terms
(``score_<label>`` columns) are scored by :func:`mergeopt.objectives.term_scores.score_terms`, the very code
that scored the trained runs, on the same records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from mergeopt.config import ObjectiveTerm, Recipe
from mergeopt.errors import UserError
from mergeopt.evaluation.tables import WEIGHT_SUM_TOLERANCE
from mergeopt.objectives.loss import evaluate_sums
from mergeopt.objectives.term_scores import load_custom, metric_terms, score_column, score_terms

WEIGHT_PREFIX = "w_"
LOSS_PREFIX = "loss_"


def _first_bad_row(values: pd.Series) -> int | None:
    """The 1-based data row of the first missing, non-numeric or infinite value (None if all are fine)."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | ~numbers.abs().lt(float("inf"))
    return int(bad.to_numpy().nonzero()[0][0]) + 1 if bad.any() else None


def read_grid(path: str | Path, expert_names: Sequence[str]) -> pd.DataFrame:
    """Read and check a grid table: one weight column per expert, rows on the simplex."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid table {path} does not exist")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: not a readable CSV table ({str(err).splitlines()[0]})") from None
    weight_columns = [c for c in table.columns if c.startswith(WEIGHT_PREFIX)]
    unknown = sorted({c[len(WEIGHT_PREFIX) :] for c in weight_columns} - set(expert_names))
    if unknown:
        raise UserError(f"{path}: column w_{unknown[0]} names an expert the recipe does not have")
    missing = [n for n in expert_names if f"{WEIGHT_PREFIX}{n}" not in table.columns]
    if missing:
        raise UserError(f"{path}: no weight column w_{missing[0]} for expert {missing[0]!r}")
    weights = table[[f"{WEIGHT_PREFIX}{n}" for n in expert_names]]
    for column in weights.columns:
        bad = _first_bad_row(weights[column])
        if bad is not None:
            raise UserError(f"{path}: column {column} must be a number in every row, row {bad} is not")
    sums = weights.sum(axis=1)
    bad = ((sums - 1).abs() > WEIGHT_SUM_TOLERANCE) | (weights < 0).any(axis=1)
    if bad.any():
        row = int(bad.idxmax())
        raise UserError(
            f"{path}: row {row + 2} weights sum to {sums[row]:.6f}, not 1 (±{WEIGHT_SUM_TOLERANCE:g}), or are negative"
        )
    if table.empty:
        raise UserError(f"{path}: the grid table has no rows")
    return table


def grid_weights(table: pd.DataFrame, expert_names: Sequence[str]) -> torch.Tensor:
    """(rows, K) weights, renormalised so each row sums to 1 exactly."""
    w = torch.tensor(table[[f"{WEIGHT_PREFIX}{n}" for n in expert_names]].to_numpy(), dtype=torch.float64)
    return w / w.sum(dim=1, keepdim=True)


def truth_columns(recipe: Recipe) -> dict[str, str]:
    """Metric name in the rank report -> grid column holding its truth: dev sets, then metric terms."""
    columns = {d.name: f"{LOSS_PREFIX}{d.name}" for d in recipe.data.dev}
    for term in metric_terms(recipe):
        if term.label in columns or term.label == "target":
            raise UserError(
                f"objective term {term.label!r} has the name of a dev set or of the target; "
                "give it another name (objective.terms[].name) so the rank report can tell them apart"
            )
        columns[term.label] = score_column(term)
    return columns


def check_truth(table: pd.DataFrame, recipe: Recipe, path: str | Path) -> None:
    """Every truth the recipe asks for is a column of numbers; called before any model is loaded."""
    for name, column in truth_columns(recipe).items():
        is_loss = column.startswith(LOSS_PREFIX)
        if column not in table.columns:
            if is_loss:
                raise UserError(f"{path}: no column {column} with the true loss of dev set {name!r}")
            raise UserError(
                f"{path}: no column {column} with the true score of objective term {name!r}; rerun "
                "python -m mergeopt.train with this recipe, which scores the finished runs without retraining"
            )
        bad = _first_bad_row(table[column])
        if bad is not None:
            what = f"the true loss of dev set {name!r}" if is_loss else f"the true score of {name!r}"
            raise UserError(
                f"{path}: column {column} ({what}) must be a number in every row, row {bad} is not"
            )


def proxy_grid(
    problem,
    table: pd.DataFrame,
    batch_size: int,
    terms: Sequence[ObjectiveTerm] = (),
    progress: bool = True,
) -> pd.DataFrame:
    """Per grid mixture: every dev set's mean token loss and every metric term's score, on the whole sets.

    The columns are named as in grid.csv (``loss_<dev set>``, ``score_<label>``) so they pair with
    the truth by name. Scores need ``problem.tokenizer``.
    """
    names = problem.stack.expert_names
    custom = load_custom(terms)
    loss_columns = [f"{LOSS_PREFIX}{s.name}" for s in problem.sets]
    rows = []
    for w in tqdm(grid_weights(table, names), desc="proxy on grid", unit="mixture", disable=not progress):
        sums, counts = evaluate_sums(
            problem.model,
            problem.stack,
            w,
            problem.sets,
            "all",
            batch_size,
            problem.pad_id,
            problem.device,
            problem.loss_chunk,
        )
        row = dict(zip(loss_columns, (sums / counts.clamp_min(1)).tolist()))
        scores = {}
        if terms:
            with problem.stack.at(w.to(problem.device)) as merged:
                scores = score_terms(
                    merged, problem.tokenizer, problem.sets, terms, custom, batch_size, problem.device
                )
        row.update({score_column(t): scores[t.label] for t in terms})
        rows.append(row)
    columns = [*loss_columns, *(score_column(t) for t in terms)]
    return pd.DataFrame(rows, columns=columns, index=table.index)


def proxy_losses(problem, table: pd.DataFrame, batch_size: int, progress: bool = True) -> pd.DataFrame:
    """Mean token loss of every dev set at every grid mixture, evaluated on the whole dev sets."""
    return proxy_grid(problem, table, batch_size, progress=progress)
