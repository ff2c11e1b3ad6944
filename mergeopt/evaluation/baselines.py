"""What the merged proxy is measured against in every rank report: a free baseline and two that use real runs.

A proxy earns its cost only if it ranks mixtures better than what a team gets without it:

* ``interpolation``: each mixture's score predicted as Σ_i w_i · s(θ_i), the straight line between
  the experts' own scores. It costs nothing beyond the K experts the proxy needs anyway, and it is
  what "mix the experts' numbers" amounts to.
* ``lightgbm_loo``: RegMix's regression (LightGBM on the mixture weights), fitted on the other
  n - 1 real runs of the grid and asked for the held-out one (leave-one-out), with the booster the
  surrogate strategy fits (:func:`mergeopt.search.surrogate.fit_surrogate`, its default settings).
* ``mixing_law_loo``: the Data Mixing Laws form s(w) = c + k · exp(Σ_j t_j w_j) (Ye et al., 2024),
  fitted by scipy's least squares on the other n - 1 runs, leave-one-out.

The two regressions see n - 1 real runs per prediction: they say what the grid's runs alone could
tell, which the proxy must beat to be worth its K experts, and how far (issue 16's calibration joins
the two). Each returns one predicted score per grid mixture, scored by the same rank statistics as
the proxy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

NAMES = ("interpolation", "lightgbm_loo", "mixing_law_loo")
LABELS = {
    "proxy": "merged proxy",
    "interpolation": "interpolation Σ w_i s(θ_i)",
    "lightgbm_loo": "LightGBM, leave-one-out",
    "mixing_law_loo": "mixing law c + k·exp(t·w), leave-one-out",
}
NEEDS = {
    "proxy": "the K experts",
    "interpolation": "the K experts",
    "lightgbm_loo": "n - 1 real runs",
    "mixing_law_loo": "n - 1 real runs",
}


def interpolation(weights: np.ndarray, expert_scores: np.ndarray) -> np.ndarray:
    """Σ_i w_i s(θ_i) for each mixture (rows of ``weights``, n × K) from the K experts' scores."""
    weights = np.asarray(weights, dtype=np.float64)
    expert_scores = np.asarray(expert_scores, dtype=np.float64)
    if expert_scores.shape != (weights.shape[1],):
        raise ValueError(f"{expert_scores.shape[0]} expert scores for {weights.shape[1]} experts")
    return weights @ expert_scores


def _leave_one_out(
    weights: np.ndarray, truth: np.ndarray, fit, fitted: Callable[[], object] | None = None
) -> np.ndarray:
    """Each run's score predicted by ``fit(weights, truth)`` (which returns a function of w) on the
    others; ``fitted()`` is called after each fit (a progress bar's update)."""
    weights, truth = np.asarray(weights, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    predicted = np.empty(len(truth))
    for i in range(len(truth)):
        keep = np.arange(len(truth)) != i
        predicted[i] = fit(weights[keep], truth[keep])(weights[i : i + 1])[0]
        if fitted is not None:
            fitted()
    return predicted


def lightgbm_loo(
    weights: np.ndarray, truth: np.ndarray, seed: int, fitted: Callable[[], object] | None = None
) -> np.ndarray:
    """Each run's score predicted by LightGBM fitted on the other runs (the surrogate's settings)."""
    from mergeopt.config import SurrogateSearch
    from mergeopt.search.surrogate import fit_surrogate

    def fit(w: np.ndarray, y: np.ndarray):
        return lambda x: fit_surrogate(w, {"s": y}, SurrogateSearch(), seed).predict(x)["s"]

    return _leave_one_out(weights, truth, fit, fitted)


def _mixing_law_start(weights: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(c, k, t) to start from: c one score range below every score, t from a line through log(y - c)."""
    c = float(y.min()) - max(float(np.ptp(y)), 1e-6)
    design = np.column_stack([np.ones(len(y)), weights])
    coef, *_ = np.linalg.lstsq(design, np.log(y - c), rcond=None)
    return np.concatenate([[c, math.exp(coef[0])], coef[1:]])


EXPONENT_CLIP = 50.0  # t·w is clipped to ±50 so that exp never overflows while the fit wanders


def _mixing_law(params: np.ndarray, w: np.ndarray) -> np.ndarray:
    """c + k·exp(t·w) for each row of ``w``, with params = (c, k, t_1, …, t_K)."""
    return params[0] + params[1] * np.exp(np.clip(w @ params[2:], -EXPONENT_CLIP, EXPONENT_CLIP))


def mixing_law_jacobian(params: np.ndarray, w: np.ndarray) -> np.ndarray:
    """∂/∂(c, k, t) of :func:`_mixing_law` at each row of ``w`` (n × (K + 2)): 1, exp(t·w) and
    k·exp(t·w)·w_j, with 0 for t where t·w is clipped (the clipped law does not move with t there).

    Given to the least squares in place of finite differences, which cost K + 2 evaluations of the
    law per iteration: the leave-one-out took 1.8 times less time on the tiny grid and 2.6 times
    less on 64 RegMix runs over 17 domains, its predictions within 4e-5 of the finite differences'
    and ranked alike (benchmarks/results/baselines.md)."""
    exponent = w @ params[2:]
    scale = np.exp(np.clip(exponent, -EXPONENT_CLIP, EXPONENT_CLIP))
    inside = np.abs(exponent) < EXPONENT_CLIP
    return np.column_stack([np.ones(len(w)), scale, (params[1] * scale * inside)[:, None] * w])


def fit_mixing_law(weights: np.ndarray, y: np.ndarray):
    """The least-squares c + k·exp(t·w) through (weights, y); returns the fitted function of w.

    Started from a line through log(y - c) with c below every score; the signs of t let a score fall
    or rise with each weight, and the least squares may cross k = 0 where a score is concave in w.
    """
    from scipy.optimize import least_squares

    weights, y = np.asarray(weights, dtype=np.float64), np.asarray(y, dtype=np.float64)
    start = _mixing_law_start(weights, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = least_squares(
            lambda p: _mixing_law(p, weights) - y,
            start,
            jac=lambda p: mixing_law_jacobian(p, weights),
            method="trf",
            max_nfev=2000,
        )
    params = fitted.x
    return lambda w: _mixing_law(params, np.atleast_2d(np.asarray(w, dtype=np.float64)))


def mixing_law_loo(
    weights: np.ndarray, truth: np.ndarray, fitted: Callable[[], object] | None = None
) -> np.ndarray:
    """Each run's score predicted by the mixing law fitted on the other runs."""
    return _leave_one_out(weights, truth, fit_mixing_law, fitted)


def skipped(n: int, k: int) -> dict[str, str]:
    """The baselines a grid of ``n`` runs over ``k`` experts cannot support, with the reason."""
    out = {}
    if n - 1 < k + 2:
        out["mixing_law_loo"] = f"{n - 1} runs per fit, fewer than its {k + 2} parameters"
    if n - 1 < 2:
        out["lightgbm_loo"] = f"{n - 1} run per fit"
    return out


def baseline_predictions(
    weights: np.ndarray,
    truths: Mapping[str, np.ndarray],
    expert_scores: Mapping[str, np.ndarray],
    seed: int,
    progress: bool = False,
    asked: Sequence[str] = NAMES,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """({baseline: {metric: predicted score per grid row}}, {baseline: why it was skipped}).

    ``truths`` and ``expert_scores`` are keyed by metric: the grid's true scores (n per metric) and
    the K experts' own scores (the proxy at each one-hot mixture). ``asked`` names the baselines to
    compute (the recipe's rank.baselines); the others are skipped, saying so. ``progress`` shows a
    bar over the regressions' fits (one per run and metric each: minutes on a large grid).
    """
    from tqdm.auto import tqdm

    weights = np.asarray(weights, dtype=np.float64)
    left_out = {name: why for name, why in skipped(len(weights), weights.shape[1]).items() if name in asked}
    left_out.update({name: "left out by rank.baselines" for name in NAMES if name not in asked})
    predictions: dict[str, dict[str, np.ndarray]] = {}
    if "interpolation" not in left_out:
        predictions["interpolation"] = {m: interpolation(weights, expert_scores[m]) for m in truths}
    regressions = [name for name in ("lightgbm_loo", "mixing_law_loo") if name not in left_out]
    total = len(regressions) * len(truths) * len(weights)
    with tqdm(
        total=total, desc="baselines, leave-one-out", unit="fit", disable=not progress or not total
    ) as bar:
        if "lightgbm_loo" in regressions:
            predictions["lightgbm_loo"] = {
                m: lightgbm_loo(weights, y, seed, bar.update) for m, y in truths.items()
            }
        if "mixing_law_loo" in regressions:
            predictions["mixing_law_loo"] = {
                m: mixing_law_loo(weights, y, bar.update) for m, y in truths.items()
            }
    return predictions, left_out
