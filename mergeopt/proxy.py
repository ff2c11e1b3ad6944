"""The merged proxy on a grid of mixtures: dev losses of θ(w) for every row of a grid table, in memory.

Ranking checks compare these numbers with models really trained on each mixture (``grid.csv`` from
``mergeopt.train``, or any table with one ``w_<expert>`` column per expert). Nothing is written to
disk: each mixture is merged into the model's reusable buffers and evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from mergeopt.errors import UserError
from mergeopt.objectives import evaluate_sums

WEIGHT_PREFIX = "w_"
LOSS_PREFIX = "loss_"
SIMPLEX_TOLERANCE = 1e-3


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
    if not all(pd.api.types.is_numeric_dtype(t) for t in weights.dtypes) or weights.isna().any().any():
        raise UserError(f"{path}: weight columns must be numbers in every row")
    sums = weights.sum(axis=1)
    bad = ((sums - 1).abs() > SIMPLEX_TOLERANCE) | (weights < 0).any(axis=1)
    if bad.any():
        row = int(bad.idxmax())
        raise UserError(
            f"{path}: row {row + 2} weights sum to {sums[row]:.6f}, not 1 (±{SIMPLEX_TOLERANCE}), or are negative"
        )
    if table.empty:
        raise UserError(f"{path}: the grid table has no rows")
    return table


def grid_weights(table: pd.DataFrame, expert_names: Sequence[str]) -> torch.Tensor:
    """(rows, K) weights, renormalised so each row sums to 1 exactly."""
    w = torch.tensor(table[[f"{WEIGHT_PREFIX}{n}" for n in expert_names]].to_numpy(), dtype=torch.float64)
    return w / w.sum(dim=1, keepdim=True)


def proxy_losses(problem, table: pd.DataFrame, batch_size: int, progress: bool = True) -> pd.DataFrame:
    """Mean token loss of every dev set at every grid mixture, evaluated on the whole dev sets."""
    names = problem.stack.expert_names
    buffers = problem.stack.allocate_buffers()
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
            buffers=buffers,
        )
        rows.append((sums / counts.clamp_min(1)).tolist())
    return pd.DataFrame(rows, columns=[f"{LOSS_PREFIX}{s.name}" for s in problem.sets], index=table.index)
