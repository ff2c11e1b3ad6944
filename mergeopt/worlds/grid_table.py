"""grid.csv, the truth ``mergeopt train`` leaves: each finished run evaluated as fit evaluates.

Every row is measured again on every call from the run's saved checkpoint (dev losses on every
record of the dev sets, each objective term's score), so a term added to the recipe later fills its
column without retraining; the score columns of terms a later recipe does not name are carried
over from the earlier grid.csv, never dropped (the runs did not change).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeopt.config import ObjectiveTerm, Recipe
from mergeopt.errors import UserError
from mergeopt.objectives.data import DevSet, evaluation_batches
from mergeopt.objectives.loss import per_set_loss_sums
from mergeopt.objectives.term_scores import score_column, score_terms
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.runtime.files import write_csv_atomic
from mergeopt.runtime.interrupts import check_interrupt
from mergeopt.worlds.grid_measures import measured_path, read_measures, write_measures
from mergeopt.worlds.run_records import RUN_MARKER


def load_run(path: Path, device: torch.device) -> torch.nn.Module:
    """A finished run's saved (dense) checkpoint, in eval mode: what every grid column is measured on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def dev_losses(
    model: torch.nn.Module,
    recipe: Recipe,
    sets,
    pad_id: int,
    device: torch.device,
    where: str = "a run's evaluation",
) -> list[float]:
    """Mean token loss of each dev set (every record, fit and held-out parts) for a loaded run."""
    sums = torch.zeros(len(sets), dtype=torch.float64)
    counts = torch.zeros(len(sets), dtype=torch.float64)
    for batch in evaluation_batches(sets, "all", recipe.optim.eval_batch_size, pad_id):
        check_interrupt(where)
        s, c = per_set_loss_sums(model, {}, batch.to(device), len(sets))
        sums += s.double().cpu()
        counts += c.double().cpu()
    return (sums / counts).tolist()


def grid_rows(
    recipe: Recipe,
    grid_runs: Sequence[tuple[dict[str, float], Path]],
    sets: Sequence[DevSet],
    terms: Sequence[ObjectiveTerm],
    custom,
    tokenizer,
    device: torch.device,
    progress: bool,
) -> list[dict]:
    """grid.csv's rows: each trained run's mixture, dev losses, metric scores and training tokens."""
    names = recipe.expert_names
    pad_id = tokenizer.pad_token_id or 0
    rows = []
    for i, (w, path) in enumerate(tqdm(grid_runs, desc="evaluating runs", unit="run", disable=not progress)):
        where = f"the evaluation of run {path.name}"
        check_interrupt(where)  # nothing is written until grid.csv
        model = load_run(path, device)
        losses = dev_losses(model, recipe, sets, pad_id, device, where)
        scores = score_terms(model, tokenizer, sets, terms, custom, recipe.optim.eval_batch_size, device)
        for label, value in scores.items():  # grid.csv holds the truth: a NaN there misleads every rank
            if not math.isfinite(value):
                raise UserError(f"metric {label!r} returned {value} on run {path}, not a finite number")
        info = json.loads((path / RUN_MARKER).read_text())
        row = {"run": i, "path": str(path), **{f"w_{n}": w[n] for n in names}}
        row.update({f"loss_{s.name}": v for s, v in zip(sets, losses)})
        row.update({score_column(t): scores[t.label] for t in terms})
        row["tokens"] = info["tokens"]
        rows.append(row)
    return rows


def write_grid(
    path: Path,
    rows: list[dict],
    names: Sequence[str],
    sets: Sequence[DevSet],
    terms: Sequence[ObjectiveTerm],
    measures: dict,
) -> Path:
    """grid.csv written whole (atomically): ``run``, ``path``, the weights, each dev set's loss, each
    term's score, the score columns an earlier grid.csv holds that this recipe does not recompute,
    and ``tokens``; then ``grid.measured.json`` beside it, what each column measured (``measures``,
    :func:`mergeopt.worlds.grid_measures.grid_measures`, and the carried columns' earlier entries).

    The earlier measures file is removed before grid.csv is replaced: a kill between the two
    writes leaves a grid that is not checked, never one described by another grid's measures."""
    columns = [
        "run",
        "path",
        *(f"w_{n}" for n in names),
        *(f"loss_{s.name}" for s in sets),
        *(score_column(t) for t in terms),
        "tokens",
    ]
    kept = _kept_score_columns(path, rows, columns)
    columns[-1:-1] = kept
    earlier = read_measures(path, say=False)  # a grid being written anew: nothing to warn of
    measured_path(path).unlink(missing_ok=True)
    written = write_csv_atomic(path, rows, columns)
    write_measures(path, measures, kept, earlier)
    return written


def _kept_score_columns(path: Path, rows: list[dict], columns: Sequence[str]) -> list[str]:
    """Score columns of an earlier grid.csv that this recipe does not recompute, carried over.

    Finished runs are never retrained, so a score measured on one (say exact match, by a recipe
    that named the term) stays true; rerunning train with a recipe without that term must not drop
    it. Rows are matched on the run's path; a column is kept only if every row has its value.
    """
    if not path.is_file():
        return []
    import pandas as pd

    try:
        old = read_csv(path)
    except (OSError, ValueError):
        return []
    extra = [c for c in old.columns if c.startswith("score_") and c not in columns]
    if not extra or "path" not in old.columns or old["path"].duplicated().any():
        return []
    by_path = old.set_index("path")
    kept = [
        c
        for c in extra
        if all(r["path"] in by_path.index and pd.notna(by_path.at[r["path"], c]) for r in rows)
    ]
    for row in rows:
        row.update({c: float(by_path.at[row["path"], c]) for c in kept})
    return kept
