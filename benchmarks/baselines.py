"""The merged proxy against the rank reports' baselines on the committed grids: ``python benchmarks/baselines.py``.

Reads each committed grid of trained runs (``benchmarks/results/{tiny_grid,smollm2}/grid.csv``) and
the proxy's target statistics from its committed rank report, and scores the three baselines of
:mod:`mergeopt.evaluation.baselines` on the target (the mean of the dev-set losses) with the same
rank statistics (seed 0, 1,000 bootstrap resamples). The experts are each grid's one-hot runs
(`mergeopt train` trains them as the grid's vertices), so their own losses are its vertex rows and
no model is loaded: the numbers a rank report gives, for grids whose report predates the baselines.

Then the cost of the mixing law's leave-one-out, the slowest baseline (one least-squares fit per
run): :func:`mergeopt.evaluation.baselines.fit_mixing_law`, which gives the least squares the law's
Jacobian, against the same least squares from the same start with scipy's finite differences
(K + 2 more evaluations of the law per iteration), timed in this one run on the tiny grid's target
and on the first 64 of RegMix's 1M-parameter runs (17 domains, tests/data/regmix), with the largest
relative difference of their predictions and the Spearman of each against the truth.

Last, the leave-one-out fits of both regressions as a rank report makes them
(:func:`mergeopt.evaluation.baselines.baseline_predictions`), in this process and in a pool of
processes (``rank.workers``), on the tiny grid's five metrics and on RegMix's first 64 runs with
two and with eight of its validation losses: seconds, the ratio, and whether the predictions are
identical (they must be). The default pool threshold (``POOL_MIN_WORK``) comes from these rows.
Writes benchmarks/results/baselines.{json,md}.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import spearmanr

from mergeopt.evaluation import baselines
from mergeopt.evaluation.rank_stats import rank_statistics
from mergeopt.runtime.exact_csv import read_csv

RESULTS = Path(__file__).parent / "results"
REGMIX = Path(__file__).parent.parent / "tests" / "data" / "regmix"
REGMIX_RUNS = 64
GRIDS = {"tiny": "tiny_grid", "smollm2": "smollm2"}
KEYS = ("spearman", "spearman_ci", "kendall", "regret")


def measure(folder: str) -> dict:
    grid = read_csv(RESULTS / folder / "grid.csv")
    names = [c[2:] for c in grid.columns if c.startswith("w_")]
    weights = grid[[f"w_{n}" for n in names]].to_numpy()
    target = grid[[f"loss_{n}" for n in names]].to_numpy().mean(axis=1)
    experts = np.array([target[weights[:, i] == 1.0][0] for i in range(len(names))])
    predicted = {
        "interpolation": baselines.interpolation(weights, experts),
        "lightgbm_loo": baselines.lightgbm_loo(weights, target, seed=0),
        "mixing_law_loo": baselines.mixing_law_loo(weights, target),
    }
    proxy = json.loads((RESULTS / folder / "rank_report.json").read_text())["metrics"]["target"]
    rows = {"proxy": {k: proxy[k] for k in KEYS}}
    for name, values in predicted.items():
        stats = rank_statistics(values, target, n_bootstrap=1000, seed=0, k=3, name=name)
        rows[name] = {k: stats[k] for k in KEYS}
    return {
        "grid": f"benchmarks/results/{folder}/grid.csv",
        "runs": len(grid),
        "experts": names,
        "target": rows,
    }


def _finite_difference_fit(weights: np.ndarray, y: np.ndarray):
    """The mixing law's least squares as it was before the Jacobian: scipy's 2-point differences."""
    start = baselines.mixing_law_start(weights, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = least_squares(
            lambda p: baselines.mixing_law(p, weights) - y, start, method="trf", max_nfev=2000
        )
    return lambda w: baselines.mixing_law(fitted.x, np.atleast_2d(w))


def _timed_loo(weights: np.ndarray, y: np.ndarray, fit) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    predicted = baselines.leave_one_out(weights, y, fit)
    return predicted, time.perf_counter() - start


def mixing_law_cost() -> dict:
    """Leave-one-out seconds with the Jacobian and with finite differences, on two grids."""
    grid = read_csv(RESULTS / "tiny_grid" / "grid.csv")
    names = [c[2:] for c in grid.columns if c.startswith("w_")]
    mixtures = read_csv(REGMIX / "train_mixture_1m.csv").iloc[:REGMIX_RUNS, 1:]
    losses = read_csv(REGMIX / "train_pile_loss_1m.csv").iloc[:REGMIX_RUNS]
    cases = {
        "tiny grid, target (20 runs, 4 experts)": (
            grid[[f"w_{n}" for n in names]].to_numpy(float),
            grid[[f"loss_{n}" for n in names]].to_numpy(float).mean(axis=1),
        ),
        f"RegMix 1M, {losses.columns[1]} ({REGMIX_RUNS} runs, {mixtures.shape[1]} domains)": (
            mixtures.to_numpy(float),
            losses.iloc[:, 1].to_numpy(float),
        ),
    }
    out = {}
    for case, (weights, y) in cases.items():
        jacobian, jacobian_s = _timed_loo(weights, y, baselines.fit_mixing_law)
        differences, differences_s = _timed_loo(weights, y, _finite_difference_fit)
        out[case] = {
            "jacobian_s": jacobian_s,
            "finite_differences_s": differences_s,
            "speedup": differences_s / jacobian_s,
            "max_relative_difference": float(np.max(np.abs(jacobian - differences) / np.abs(differences))),
            "spearman_jacobian": float(spearmanr(jacobian, y).statistic),
            "spearman_finite_differences": float(spearmanr(differences, y).statistic),
        }
    return out


def _timed_predictions(weights, truths, workers):
    experts = {m: np.ones(weights.shape[1]) for m in truths}  # interpolation: not what is timed
    start = time.perf_counter()
    predicted, _ = baselines.baseline_predictions(weights, truths, experts, 0, workers=workers)
    return predicted, time.perf_counter() - start


def pool_cost() -> dict:
    """Both regressions' leave-one-out fits in this process and in a pool of every usable CPU."""
    grid = read_csv(RESULTS / "tiny_grid" / "grid.csv")
    names = [c[2:] for c in grid.columns if c.startswith("w_")]
    tiny = {f"loss_{n}": grid[f"loss_{n}"].to_numpy(float) for n in names}
    tiny["target"] = np.mean(list(tiny.values()), axis=0)
    mixtures = read_csv(REGMIX / "train_mixture_1m.csv").iloc[:REGMIX_RUNS, 1:].to_numpy(float)
    losses = read_csv(REGMIX / "train_pile_loss_1m.csv").iloc[:REGMIX_RUNS]
    regmix = {c: losses[c].to_numpy(float) for c in losses.columns[1:]}
    cases = {
        "tiny grid, 5 metrics (20 runs, 4 experts)": (grid[[f"w_{n}" for n in names]].to_numpy(float), tiny),
        f"RegMix 1M, 2 metrics ({REGMIX_RUNS} runs, 17 domains)": (mixtures, dict(list(regmix.items())[:2])),
        f"RegMix 1M, 8 metrics ({REGMIX_RUNS} runs, 17 domains)": (mixtures, dict(list(regmix.items())[:8])),
    }
    workers = baselines.usable_cpus()
    out = {}
    for case, (weights, truths) in cases.items():
        serial, serial_s = _timed_predictions(weights, truths, 1)
        pooled, pooled_s = _timed_predictions(weights, truths, workers)
        fits = 2 * len(weights) * len(truths)
        out[case] = {
            "fits": fits,
            "work": fits * weights.size,  # fits x runs x experts: what the default compares
            "workers": workers,
            "serial_s": serial_s,
            "pool_s": pooled_s,
            "speedup": serial_s / pooled_s,
            "identical": all(
                np.array_equal(serial[b][m], pooled[b][m])
                for b in ("lightgbm_loo", "mixing_law_loo")
                for m in truths
            ),
        }
    return out


def markdown(results: dict) -> str:
    lines = [
        "# The merged proxy against the baselines on the committed grids",
        "",
        "Target (mean dev-set loss); regressions leave-one-out on the other runs; seed 0, 1,000 resamples.",
        "",
        "| grid | predictor | Spearman [95% CI] | Kendall | regret of its pick |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for world, result in results.items():
        if world in ("mixing_law_cost", "pool_cost"):
            continue
        for name, s in result["target"].items():
            ci = ", ".join(f"{v:.3f}" for v in s["spearman_ci"])
            lines.append(
                f"| {world} ({result['runs']} runs) | {baselines.LABELS[name]} | {s['spearman']:.3f} [{ci}] | "
                f"{s['kendall']:.3f} | {s['regret']:.3f} |"
            )
    lines += [
        "",
        "## The mixing law's leave-one-out: the law's Jacobian against finite differences",
        "",
        "One least-squares fit per run, timed in one run; the same start and the same trust-region solver.",
        "",
        "| grid | with the Jacobian | finite differences | speed-up | largest relative difference | Spearman (both) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for case, c in results["mixing_law_cost"].items():
        lines.append(
            f"| {case} | {c['jacobian_s']:.1f} s | {c['finite_differences_s']:.1f} s | {c['speedup']:.1f}× | "
            f"{c['max_relative_difference']:.1e} | {c['spearman_jacobian']:.4f} / {c['spearman_finite_differences']:.4f} |"
        )
    lines += [
        "",
        "## Both regressions' leave-one-out fits in a pool of processes (rank.workers)",
        "",
        f"As a rank report makes them, in this process and in a pool; {os.cpu_count()} CPUs, timed in one run.",
        "",
        "| case | fits | fits x runs x experts | mergeopt's default | in this process | in a pool | speed-up | identical |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for case, c in results["pool_cost"].items():
        lines.append(
            f"| {case} | {c['fits']} | {c['work']:,} | "
            f"{'a pool' if c['work'] >= baselines.POOL_MIN_WORK else 'this process'} | {c['serial_s']:.1f} s | "
            f"{c['pool_s']:.1f} s ({c['workers']} workers) | {c['speedup']:.2f}× | {'yes' if c['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    results = {world: measure(folder) for world, folder in GRIDS.items()}
    results["mixing_law_cost"] = mixing_law_cost()
    results["pool_cost"] = pool_cost()
    (RESULTS / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "baselines.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
