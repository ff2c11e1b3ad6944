"""RegMix's surrogate protocol in the transfer check (``mergeopt transfer --surrogate-fit TRAIN``).

One LightGBM regressor per metric, fitted on TRAIN's mixture weights with a fixed number of
boosting rounds (no test run is used for early stopping), with :class:`SurrogateSearch`'s settings
and the command line's overrides; and what the report says of it, including how many of SMALL's
and LARGE's mixtures TRAIN already holds (a surrogate scored on mixtures it was fitted on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mergeopt.errors import UserError
from mergeopt.evaluation.table_checks import MIN_MIXTURES, WEIGHT_DECIMALS
from mergeopt.evaluation.tables import ScaleTable, metric_values

SURROGATE_OPTIONS = {  # CLI flag → SurrogateSearch field (its defaults are the defaults here)
    "rounds": "n_estimators",
    "learning_rate": "learning_rate",
    "num_leaves": "num_leaves",
    "min_child_samples": "min_child_samples",
}


def surrogate_settings(overrides: Mapping[str, float | int | None]):
    """The LightGBM settings: :class:`SurrogateSearch`'s defaults, with the CLI's overrides."""
    from pydantic import ValidationError

    from mergeopt.config import SurrogateSearch

    given = {SURROGATE_OPTIONS[k]: v for k, v in overrides.items() if v is not None}
    # seeds is the fit's search setting (the mixtures it evaluates to fit on), which transfer never
    # reads: TRAIN's rows are the fit set, checked against min_child_samples by check_train_size.
    # Left at its default, the search's "seeds >= 2 x min_child_samples" refused
    # --min-child-samples above 20 with a traceback (a whole-model error, no field to name)
    minimum = given.get("min_child_samples")
    if isinstance(minimum, int) and minimum > 0:
        given["seeds"] = max(SurrogateSearch.model_fields["seeds"].default, 2 * minimum)
    try:
        return SurrogateSearch(**given)
    except ValidationError as err:
        first = err.errors()[0]
        field = first["loc"][0] if first["loc"] else None
        flag = next((k for k, f in SURROGATE_OPTIONS.items() if f == field), None)
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"--{flag.replace('_', '-')}: {message}" if flag else message) from None


def fit_surrogates(train: ScaleTable, metrics: Sequence[str], settings, seed: int):
    """One deterministic LightGBM regressor per metric on TRAIN, fixed rounds (no early stopping)."""
    from mergeopt.search.surrogate import fit_surrogate

    targets = {m: metric_values(train.frame, m, train.spec) for m in metrics}
    check_train_size(train, settings)
    return fit_surrogate(train.weights, targets, settings, seed)


def check_train_size(train: ScaleTable, settings) -> None:
    """Refuse a TRAIN table too small for LightGBM to split once.

    Why: each side of a split needs ``min_child_samples`` runs, so with fewer than twice that every
    tree is a single leaf and every prediction the same: the report would be all n/a, exit 0, with
    nothing saying the surrogate learnt nothing (a wrong file given as TRAIN looks just like that).
    """
    need = max(2 * settings.min_child_samples, MIN_MIXTURES)
    if len(train.frame) < need:
        raise UserError(
            f"{train.spec}: only {len(train.frame)} run(s) to fit the surrogate on; with --min-child-samples "
            f"{settings.min_child_samples} LightGBM needs at least {need} to split at all (with fewer, every "
            "prediction is the same)"
        )


def surrogate_summary(tables: Mapping[str, ScaleTable], settings, seed: int) -> dict | None:
    if settings is None:
        return None
    train = tables["TRAIN"].weights
    return {
        "model": "LightGBM regressor per metric on the mixture weights",
        "rounds": settings.n_estimators,
        "learning_rate": settings.learning_rate,
        "num_leaves": settings.num_leaves,
        "min_child_samples": settings.min_child_samples,
        "seed": seed,
        "early_stopping": None,
        "train_mixtures_in": {
            role: _in_table(tables[role].weights, train) for role in ("SMALL", "LARGE") if role in tables
        },
    }


def _in_table(weights: np.ndarray, reference: np.ndarray) -> int:
    """How many rows of ``weights`` are also mixtures of ``reference`` (weights rounded to 1e-6)."""
    known = {tuple(r.tolist()) for r in np.round(reference, WEIGHT_DECIMALS)}
    return sum(tuple(r.tolist()) in known for r in np.round(weights, WEIGHT_DECIMALS))
