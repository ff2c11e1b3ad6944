"""Rank agreement between a proxy and the truth over a set of mixtures: the numbers behind every rank check.

A proxy (the merged model, or a small model) is only useful for choosing a mixture if it orders
mixtures the way models really trained on them do. These functions measure that: rank correlations
(Spearman, Kendall, from scipy.stats) with seeded bootstrap intervals, the share of mixture pairs
ordered correctly, whether the proxy's favourites are the true favourites, and the regret of
trusting the proxy, normalised to [0, 1] so that metrics on different scales compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from mergeopt.errors import UserError
from mergeopt.runtime.exact_csv import line_of


def _as_vector(values, label: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{label}: scores are not numbers") from None
    if array.ndim != 1:
        raise UserError(f"{label}: expected one score per mixture (1-D), got shape {array.shape}")
    missing = np.flatnonzero(~np.isfinite(array))
    if missing.size:
        raise UserError(
            f"{label}: {missing.size} NaN or infinite value(s), first at row {missing[0] + 1}; "
            "rank checks never drop rows silently, remove or fix them"
        )
    return array


def _spearman(proxy: np.ndarray, truth: np.ndarray) -> float:
    return float(stats.spearmanr(proxy, truth).statistic)


def _kendall(proxy: np.ndarray, truth: np.ndarray) -> float:
    return float(stats.kendalltau(proxy, truth).statistic)


def pairwise_accuracy(proxy: np.ndarray, truth: np.ndarray, block: int = 1024) -> float:
    """Share of mixture pairs with distinct true values that the proxy orders the same way.

    A pair the proxy ties counts half: a coin flip is what such a proxy offers. Blocks of rows keep
    memory at ``block × n`` for large grids.
    """
    agree, pairs = 0.0, 0
    for start in range(0, len(truth), block):
        rows = slice(start, start + block)
        dt = np.sign(truth[rows, None] - truth[None, :])
        dp = np.sign(proxy[rows, None] - proxy[None, :])
        upper = np.arange(start, start + dt.shape[0])[:, None] < np.arange(len(truth))[None, :]
        counted = upper & (dt != 0)
        pairs += int(counted.sum())
        agree += float((counted & (dp == dt)).sum()) + 0.5 * float((counted & (dp == 0)).sum())
    return agree / pairs if pairs else math.nan


def _normalized_regret(truth_low: np.ndarray, chosen: int) -> float:
    """(true score of the chosen mixture − best true score) / true range, on lower-is-better scores."""
    spread = float(truth_low.max() - truth_low.min())
    return 0.0 if spread == 0 else float((truth_low[chosen] - truth_low.min()) / spread)


def _top_k(scores_low: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best (lowest) scores; ties go to the earlier row, so results are reproducible."""
    return np.argsort(scores_low, kind="stable")[:k]


PAIRWISE_MAX = 256  # resamples of up to this many mixtures get Kendall's tau from all pairs at once
PAIRWISE_BLOCK = 1 << 22  # pair comparisons held at a time (resamples × n × n)
# resampled scores held at once (resamples × mixtures): the bootstrap draws every resample in one
# call, so --bootstrap 10000000000000 was a numpy MemoryError traceback (and a count that fits
# the address space but not the memory, an OOM kill); 2e7 is ~0.5 GB of indices and scores
BOOTSTRAP_DRAWS = 20_000_000


def _spearman_rows(proxy: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair: Pearson's r of the average ranks, as scipy.stats.spearmanr."""
    rp, rt = stats.rankdata(proxy, axis=1), stats.rankdata(truth, axis=1)
    rp -= rp.mean(axis=1, keepdims=True)
    rt -= rt.mean(axis=1, keepdims=True)
    return (rp * rt).sum(axis=1) / np.sqrt((rp * rp).sum(axis=1) * (rt * rt).sum(axis=1))


def _kendall_rows(proxy: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair, as scipy.stats.kendalltau: (concordant − discordant) /
    sqrt((pairs − pairs tied in proxy)(pairs − pairs tied in truth)), counted over all pairs of a
    block of rows at once; past :data:`PAIRWISE_MAX` mixtures scipy's O(n log n) per row is faster."""
    rows, n = proxy.shape
    if n > PAIRWISE_MAX:
        return np.array([_kendall(p, t) for p, t in zip(proxy, truth)])
    out = np.empty(rows)
    pairs = n * (n - 1) / 2
    step = max(1, PAIRWISE_BLOCK // (n * n))
    for start in range(0, rows, step):
        block = slice(start, start + step)
        dp = np.sign(proxy[block, :, None] - proxy[block, None, :])
        dt = np.sign(truth[block, :, None] - truth[block, None, :])
        score = (dp * dt).sum(axis=(1, 2)) / 2  # each unordered pair counted twice, the diagonal 0
        tied_p = ((dp == 0).sum(axis=(1, 2)) - n) / 2
        tied_t = ((dt == 0).sum(axis=(1, 2)) - n) / 2
        out[block] = score / np.sqrt((pairs - tied_p) * (pairs - tied_t))
    return out


def _bootstrap(proxy, truth, n_bootstrap: int, seed: int, confidence: float) -> dict:
    """Percentile intervals over mixtures resampled with replacement; constant resamples are skipped.

    Draw for draw this is ``scipy.stats.bootstrap(paired=True, method="percentile")`` with the same
    generator (the same indices, drawn in one call as scipy draws them; tests/test_rank.py compares
    them); kept by hand to skip constant resamples, where scipy's statistic would be NaN, and to
    score every resample in a few array operations rather than two scipy calls each."""
    n = len(proxy)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    p, t = proxy[idx], truth[idx]
    varied = (np.ptp(p, axis=1) > 0) & (np.ptp(t, axis=1) > 0)
    p, t = p[varied], t[varied]
    tail = 100 * (1 - confidence) / 2

    def interval(values: np.ndarray) -> list[float]:
        if not len(values):
            return [math.nan, math.nan]
        return [float(v) for v in np.percentile(values, [tail, 100 - tail])]

    return {
        "spearman_ci": interval(_spearman_rows(p, t)),
        "kendall_ci": interval(_kendall_rows(p, t)),
        "bootstrap_used": int(varied.sum()),
    }


def rank_statistics(
    proxy,
    truth,
    *,
    higher_is_better: bool = False,
    k: int = 3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    name: str = "scores",
    undefined_when_constant: bool = False,
) -> dict:
    """How well ``proxy`` ranks the mixtures that ``truth`` scores (one entry per mixture in each).

    Correlations are scipy's; every selection statistic is computed on lower-is-better scores, so a
    higher-is-better metric is mirrored once here and nowhere else. ``regret`` is in [0, 1], 0 when
    the proxy's choice is truly best (or every mixture is truly equal), 1 when it is truly worst.
    With ``undefined_when_constant`` (table mode), a constant proxy or truth makes the selection
    statistics undefined, as the correlations are: the proxy's pick would be a tie-break, so
    ``top1_hit`` and ``topk_hit`` are None and ``topk_overlap`` and ``regret`` NaN.
    """
    proxy = _as_vector(proxy, f"{name} (proxy)")
    truth = _as_vector(truth, f"{name} (truth)")
    if proxy.shape != truth.shape:
        raise UserError(f"{name}: proxy has {proxy.size} mixtures but truth has {truth.size}")
    if proxy.size < 2:
        raise UserError(f"{name}: rank checks need at least 2 mixtures, got {proxy.size}")
    if k < 1 or n_bootstrap < 0 or not 0 < confidence < 1:
        raise UserError(f"{name}: need k ≥ 1, n_bootstrap ≥ 0 and 0 < confidence < 1")
    if n_bootstrap * proxy.size > BOOTSTRAP_DRAWS:
        raise UserError(
            f"{n_bootstrap:,} bootstrap resamples of {proxy.size} mixtures draw {n_bootstrap * proxy.size:,} "
            f"scores, more than the {BOOTSTRAP_DRAWS:,} held in memory at once: use fewer resamples "
            "(--bootstrap, or rank.bootstrap in a recipe; default 1000)"
        )
    n, k = proxy.size, min(k, proxy.size)
    sign = -1.0 if higher_is_better else 1.0
    proxy_low, truth_low = sign * proxy, sign * truth
    degenerate = np.ptp(proxy) == 0 or np.ptp(truth) == 0
    proxy_top, truth_top = _top_k(proxy_low, k), _top_k(truth_low, k)
    best_true = truth_low.min()
    undefined = degenerate and undefined_when_constant
    return {
        "n": n,
        "higher_is_better": bool(higher_is_better),
        "spearman": math.nan if degenerate else _spearman(proxy, truth),
        "kendall": math.nan if degenerate else _kendall(proxy, truth),
        **_bootstrap(proxy, truth, n_bootstrap, seed, confidence),
        "pairwise_accuracy": pairwise_accuracy(proxy, truth),
        "k": k,
        "top1_hit": None if undefined else bool(truth_low[proxy_top[0]] == best_true),
        "topk_hit": None if undefined else bool(np.any(truth_low[proxy_top] == best_true)),
        "topk_overlap": math.nan if undefined else len(set(proxy_top.tolist()) & set(truth_top.tolist())) / k,
        "regret": math.nan if undefined else _normalized_regret(truth_low, int(proxy_top[0])),
        "proxy_best_row": int(proxy_top[0]),
        "true_best_row": int(truth_top[0]),
    }


def varies(*scores) -> bool:
    """Whether every one of the score vectors holds two different values (a constant one ranks nothing)."""
    return all(np.ptp(np.asarray(v, dtype=np.float64)) > 0 for v in scores)


def nearest_line(report: dict) -> str:
    """``"line N of grid.csv"``: the grid mixture nearest the fitted one (a report from before the
    line was recorded: its row + 2, the line when the grid has no blank lines)."""
    fitted = report["fitted_mixture"]
    return line_of(report["grid"], fitted.get("line", fitted["row"] + 2))


def mixture_regret(
    fitted_weights: Mapping[str, float], grid_weights: pd.DataFrame, truth, higher_is_better: bool = False
) -> dict:
    """Regret of a fitted mixture, judged at the grid mixture nearest to it (Euclidean on weights).

    A fitted mixture is rarely a grid point, and only grid points have true scores; the distance is
    returned so a reader can tell a close stand-in from a far one. Grid columns are named by expert,
    or ``w_<expert>``.
    """
    columns = {n: n if n in grid_weights.columns else f"w_{n}" for n in fitted_weights}
    extra = sorted(set(map(str, grid_weights.columns)) - set(columns.values()))
    if extra or not set(columns.values()) <= set(grid_weights.columns):
        raise UserError(
            f"grid weight columns {sorted(map(str, grid_weights.columns))} do not match the fitted experts "
            f"{sorted(fitted_weights)} (name a column by expert or w_<expert>)"
        )
    names = sorted(fitted_weights)
    grid = grid_weights[[columns[n] for n in names]].to_numpy(dtype=np.float64)
    truth = _as_vector(truth, "grid truth")
    if len(truth) != len(grid):
        raise UserError(f"grid has {len(grid)} mixtures but truth has {len(truth)} scores")
    point = np.array([float(fitted_weights[n]) for n in names])
    distances = np.linalg.norm(grid - point, axis=1)
    row = int(np.argmin(distances))
    truth_low = -truth if higher_is_better else truth
    return {
        "row": row,
        "index": grid_weights.index.tolist()[row],
        "distance": float(distances[row]),
        "regret": _normalized_regret(truth_low, row),
        "true_score": float(truth[row]),
    }
