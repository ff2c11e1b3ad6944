"""The merged proxy on a grid of mixtures: dev losses and metric scores of θ(w) for every row of a grid table.

Ranking checks compare these numbers with models really trained on each mixture (``grid.csv`` from
``mergeopt.worlds.train``, or any table with one ``w_<expert>`` column per expert). No merged model is
written: the model is evaluated at each mixture, each layer merging as it runs. Metric terms
(``score_<label>`` columns) are scored by :func:`mergeopt.objectives.term_scores.score_terms`, the very code
that scored the trained runs, on the same records. The mixtures go through the searches' Evaluator
(cache, torchrun, journal for resume): :func:`proxy_grid`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergeopt.errors import UserError
from mergeopt.evaluation.table_checks import (
    check_enough_mixtures,
    check_mixture_rows,
    check_mixtures_vary,
    check_numbers,
    clip_roundoff,
)
from mergeopt.inputs import existing_file
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.scoring import metric_scores, set_losses
from mergeopt.objectives.term_scores import load_custom, score_column
from mergeopt.runtime.distributed import is_main
from mergeopt.runtime.exact_csv import at_line, read_csv
from mergeopt.runtime.resume import PROXY_EVALUATIONS
from mergeopt.search.evaluator import Evaluator

WEIGHT_PREFIX = "w_"
LOSS_PREFIX = "loss_"
PHASE = "proxy"  # the phase of the grid's evaluations in the journal


def read_grid(path: str | Path, expert_names: Sequence[str], ranked: bool = True) -> pd.DataFrame:
    """Read and check a grid table: one weight column per expert, rows on the simplex.

    ``ranked``: the table's rows are ranked, so they must hold two mixtures at least, in 3 rows at
    least (several seeds of a mixture are rows of their own); calibrate (``ranked=False``) takes any
    runs, one run or several seeds of one mixture alike, or none yet (a header line: the first
    proposal is then the proxy's pick)."""
    from mergeopt.evaluation.tables import check_header

    path = existing_file(path, "grid table")
    check_header(str(path))
    try:
        table = read_csv(path, index_col=False)  # rows' trailing commas: no shift of the columns
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: not a readable CSV table ({str(err).splitlines()[0]})") from None
    weight_columns = [c for c in table.columns if c.startswith(WEIGHT_PREFIX)]
    unknown = sorted({c[len(WEIGHT_PREFIX) :] for c in weight_columns} - set(expert_names))
    if unknown:
        raise UserError(f"{path}: column w_{unknown[0]} names an expert the recipe does not have")
    missing = [n for n in expert_names if f"{WEIGHT_PREFIX}{n}" not in table.columns]
    if missing:
        raise UserError(f"{path}: no weight column w_{missing[0]} for expert {missing[0]!r}")
    columns = [f"{WEIGHT_PREFIX}{n}" for n in expert_names]
    for column in columns:
        check_numbers(table, column, lambda i: at_line(path, i), "a mixture weight")
    if table.empty and ranked:
        raise UserError(f"{path}: the grid table has no rows")
    weights = table[columns].to_numpy(dtype=float)
    check_mixture_rows(weights, columns, lambda i: at_line(path, i))
    table[columns] = weights = clip_roundoff(weights)
    if ranked:  # 2 rows would rank as ±1 whatever the proxy; repeated runs of a mixture may stay
        check_mixtures_vary(weights, str(path))
        check_enough_mixtures(len(table), (str(path),))
    return table


def grid_weights(table: pd.DataFrame, expert_names: Sequence[str]) -> torch.Tensor:
    """(rows, K) weights, renormalised so each row sums to 1 exactly."""
    w = torch.tensor(
        table[[f"{WEIGHT_PREFIX}{n}" for n in expert_names]].to_numpy(dtype=float), dtype=torch.float64
    )
    return w / w.sum(dim=1, keepdim=True)


def truth_columns(objective: Objective) -> dict[str, str]:
    """Metric name in the rank report -> grid column holding its truth: dev sets, then metric terms."""
    columns = {name: f"{LOSS_PREFIX}{name}" for name in objective.dev_names}
    for term in objective.metric_terms:
        if term.label in columns or term.label == "target":
            raise UserError(
                f"objective term {term.label!r} has the name of a dev set or of the target; "
                "give it another name (objective.terms[].name) so the rank report can tell them apart"
            )
        columns[term.label] = score_column(term)
    return columns


def check_grid_unit(runs: Sequence[tuple[int, Path, dict]], path: str | Path, unit: str) -> None:
    """Refuse a grid whose runs drew their mixtures in another unit than the recipe's weights.unit.

    The grid's weights and the fit's are then numbers of two different mixtures (token shares and
    sample shares differ wherever the domains' examples differ in length), and the ranking would
    compare each proxy mixture with another mixture's run. Only the runs ``mergeopt train`` wrote
    can tell (``runs``: their ``run.json``, from
    :func:`~mergeopt.worlds.run_records.grid_run_records`); one that draws a single domain is the
    same in either unit, and grids made elsewhere are not checked.
    """
    from mergeopt.worlds.run_records import drawn_unit

    for row, run, info in runs:
        try:
            drawn = drawn_unit(info["weights"], info)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not mergeopt train's run.json: nothing to check
        if drawn is not None and drawn != unit:
            raise UserError(
                f"{at_line(path, row)}: its run {run} was mixed in {drawn[:-1]} shares, and weights.unit is "
                f"{unit}: set weights.unit: {drawn}, or rank against runs mixed in {unit[:-1]} shares"
            )


def check_truth(table: pd.DataFrame, objective: Objective, path: str | Path) -> None:
    """Every truth the objective asks for is a column of numbers; called before any model is loaded."""
    for name, column in truth_columns(objective).items():
        is_loss = column.startswith(LOSS_PREFIX)
        if column not in table.columns:
            if is_loss:
                raise UserError(f"{path}: no column {column} with the true loss of dev set {name!r}")
            raise UserError(
                f"{path}: no column {column} with the true score of objective term {name!r}; rerun "
                "`mergeopt train` with this recipe, which scores the finished runs without retraining"
            )
        what = f"the true loss of dev set {name!r}" if is_loss else f"the true score of {name!r}"
        check_numbers(table, column, lambda i: at_line(path, i), what)


def grid_scorer(problem, objective: Objective) -> Callable[[np.ndarray], dict[str, float]]:
    """``score(w) -> {loss_<dev set>: mean token loss, score_<label>: score}`` on the whole dev sets."""
    custom = load_custom(objective.metric_terms)
    loss_columns = [f"{LOSS_PREFIX}{s.name}" for s in problem.sets]

    def score(weights: np.ndarray) -> dict[str, float]:
        w = torch.as_tensor(weights, dtype=torch.float64)
        row = dict(zip(loss_columns, set_losses(problem, objective, w, "all").tolist()))
        scores = metric_scores(problem, objective, w, "all", custom)
        row.update({score_column(t): scores[t.label] for t in objective.metric_terms})
        return row

    return score


def target_loss_of(problem) -> Callable[[dict[str, float]], float]:
    """``value(scores)``: the target dev loss Σ_s a_s loss_s / Σ_s a_s from a row of :func:`grid_scorer`."""
    a = problem.set_weights.double().numpy()
    a = a / a.sum()
    loss_columns = [f"{LOSS_PREFIX}{s.name}" for s in problem.sets]
    return lambda scores: float(np.dot(a, [scores[c] for c in loss_columns]))


def proxy_evaluator(
    problem, objective: Objective, progress: bool = True, checkpoint=None, together: bool = False
) -> Evaluator:
    """The Evaluator the proxy's mixtures go through: :func:`grid_scorer`'s scores, valued by the
    target dev loss (what the progress bar shows as best), cached per mixture and, with a
    ``checkpoint``, journaled in ``proxy_evaluations.jsonl`` (see :func:`proxy_grid`)."""
    return Evaluator(
        problem.stack.expert_names,
        grid_scorer(problem, objective),
        target_loss_of(problem),
        key=json.dumps(problem.stack.method, sort_keys=True),
        progress=progress,
        journal=partial(checkpoint.append_evaluation, journal=PROXY_EVALUATIONS)
        if checkpoint is not None and is_main()
        else None,
        replay=checkpoint.read_evaluations(PROXY_EVALUATIONS) if checkpoint is not None else (),
        together=together,
    )


def proxy_grid(
    problem,
    objective: Objective,
    table: pd.DataFrame,
    progress: bool = True,
    checkpoint=None,
    together: bool = False,
) -> pd.DataFrame:
    """Per grid mixture: every dev set's mean token loss and every metric term's score, on the whole sets.

    The columns are named as in grid.csv (``loss_<dev set>``, ``score_<label>``) so they pair with
    the truth by name. Scores need ``problem.tokenizer``. The mixtures are scored through an
    :class:`mergeopt.search.evaluator.Evaluator`, as every search's are: each distinct mixture once,
    under torchrun dealt out over the ranks (``together``: a sharded stack, every rank scores each
    one), and with a :class:`mergeopt.runtime.resume.RunState` journaled as they finish
    (``proxy_evaluations.jsonl``), so a rerun after an interruption replays the finished rows.
    """
    names = problem.stack.expert_names
    evaluator = proxy_evaluator(problem, objective, progress, checkpoint, together)
    loss_columns = [f"{LOSS_PREFIX}{s.name}" for s in problem.sets]
    weights = list(grid_weights(table, names).numpy())
    with evaluator.running("proxy on grid", None, evaluator.uncached(weights)):
        evaluator.prefetch(weights, PHASE)
    rows = [evaluator.scores(w, PHASE) for w in weights]
    columns = [*loss_columns, *(score_column(t) for t in objective.metric_terms)]
    return pd.DataFrame(rows, columns=columns, index=table.index)


def proxy_losses(problem, objective: Objective, table: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Mean token loss of every dev set at every grid mixture, evaluated on the whole dev sets."""
    return proxy_grid(problem, replace(objective, terms=()), table, progress=progress)
