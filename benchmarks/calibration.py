"""Calibrating the proxy with a few real runs, simulated on the committed grids: ``python benchmarks/calibration.py``.

A team that can afford n real training runs asks two things: which mixtures to train, and which
mixture to recommend afterwards. This benchmark answers both on the committed grids of trained runs
(``benchmarks/results/{tiny_grid,smollm2}``): each grid row's true target loss is revealed only when
a method asks to train that mixture. The proxy's value at each row is the merged proxy's target loss
from the grid's committed rank check (``rank_pairs.csv``). After n = 1 ... 6 runs, each method
recommends one row, and its regret is (true loss of the pick − best true loss) / true range.

Methods, each with the same n runs budget:
- **calibrated**: :mod:`mergeopt.evaluation.calibration` (proxy as the GP's prior mean), the first
  run at the proxy's pick and every next one by expected improvement; recommends the cautious
  pick (lowest mean + 1 sd). What ``mergeopt calibrate`` does by default.
- **calibrated, lowest-mean pick**: the same runs, recommending the lowest posterior mean instead
  of the cautious pick (``calibrate.pick: mean``).
- **proxy alone**: the proxy's pick, whatever n (the runs are not used).
- **proxy top-n**: train the proxy's n favourites, recommend the best of them.
- **regression**: the same GP without the proxy term, on its own runs (a random first one, then
  expected improvement): Bayesian optimisation of the mixture without the merge.
- **regression, same runs**: that GP on the calibrated method's runs (same data, no proxy).
- **random**: n random rows, recommend the best of them.

Seeds: each seed draws 80% of the grid's rows as the candidate set (and the random methods' draws),
so the interval shows how the result depends on which mixtures exist. The full grid is also scored.
The weak-proxy check replaces the tiny world's proxy with proxy + Gaussian noise scaled, per seed, so
that it ranks the truth at Spearman ≈ 0.5: the calibration must then do no worse than regression.
Writes benchmarks/results/calibration.{json,md} and calibration.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import stats

from mergeopt.evaluation import calibration
from mergeopt.runtime.exact_csv import read_csv

RESULTS = Path(__file__).parent / "results"
WORLDS = {"tiny": "tiny_grid", "smollm2": "smollm2"}
RUNS = 6
SEEDS = 20
SUBSET = 0.8
WEAK_RHO = 0.5
SLOPE = "proxy_slope"  # the calibrated model's posterior mean of b after each run, beside the regrets
METHODS = (
    "calibrated",
    "calibrated_mean_pick",
    "proxy",
    "proxy_top_n",
    "regression",
    "regression_same_runs",
    "random",
)
LABELS = {
    "calibrated": "calibrated proxy",
    "calibrated_mean_pick": "calibrated proxy, lowest-mean pick",
    "proxy": "proxy alone",
    "proxy_top_n": "proxy top-n, best run",
    "regression": "regression (GP, own runs)",
    "regression_same_runs": "regression on the calibrated runs",
    "random": "random runs, best run",
}


def load(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, true target, proxy target) of a committed grid, from its rank_pairs.csv."""
    pairs = read_csv(RESULTS / folder / "rank_pairs.csv")
    weights = pairs[[c for c in pairs.columns if c.startswith("w_")]].to_numpy()
    return weights, pairs["truth_target"].to_numpy(), pairs["proxy_target"].to_numpy()


def regret(truth: np.ndarray, chosen: int) -> float:
    spread = truth.max() - truth.min()
    return float((truth[chosen] - truth.min()) / spread) if spread > 0 else 0.0


def sequential(
    weights, truth, proxy, use_proxy: bool, first: int
) -> tuple[list[int], list[int], list[int], list[float]]:
    """Run RUNS rounds: train the proposal, refit, recommend. Returns the runs in order, the
    cautious and lowest-mean picks after each, and the posterior mean of the proxy's slope b after
    each (how far the model trusts the proxy; 0 without the proxy term)."""
    runs: list[int] = []
    picks: list[int] = []
    mean_picks: list[int] = []
    slopes: list[float] = []
    proposal = first
    for _ in range(RUNS):
        runs.append(proposal)
        posterior = calibration.fit(weights[runs], truth[runs], proxy[runs], proxy, use_proxy)
        decision = calibration.decide(posterior, weights, proxy, runs, samples=0)
        picks.append(decision.pick)
        mean_picks.append(
            calibration.decide(posterior, weights, proxy, runs, batch=0, samples=0, caution=0).pick
        )
        slopes.append(posterior.slope[0])
        proposal = decision.proposals[0] if decision.proposals else proposal
    return runs, picks, mean_picks, slopes


def picks_on(weights, truth, proxy, runs, use_proxy: bool) -> list[int]:
    """The recommendation after each prefix of ``runs`` (no choice of runs involved)."""
    out = []
    for n in range(1, len(runs) + 1):
        posterior = calibration.fit(weights[runs[:n]], truth[runs[:n]], proxy[runs[:n]], proxy, use_proxy)
        out.append(calibration.decide(posterior, weights, proxy, runs[:n], samples=0).pick)
    return out


def best_of(truth, runs) -> list[int]:
    return [runs[int(np.argmin(truth[runs[:n]]))] for n in range(1, len(runs) + 1)]


def simulate(weights, truth, proxy, rng: np.random.Generator) -> dict[str, list[float]]:
    """Regret after n = 1 ... RUNS real runs, for every method, on one candidate set, and (under
    ``SLOPE``) the calibrated model's posterior mean of the proxy's slope after each run."""
    order = np.argsort(proxy, kind="stable")
    runs, picks, mean_picks, slopes = sequential(weights, truth, proxy, True, int(order[0]))
    first_random = int(rng.integers(len(truth)))
    _, regression, _, _ = sequential(weights, truth, proxy, False, first_random)
    random_runs = list(rng.permutation(len(truth))[:RUNS])
    chosen = {
        "calibrated": picks,
        "calibrated_mean_pick": mean_picks,
        "proxy": [int(order[0])] * RUNS,
        "proxy_top_n": best_of(truth, list(order[:RUNS])),
        "regression": regression,
        "regression_same_runs": picks_on(weights, truth, proxy, runs, False),
        "random": best_of(truth, random_runs),
    }
    return {**{method: [regret(truth, i) for i in rows] for method, rows in chosen.items()}, SLOPE: slopes}


def weak_proxy(truth, proxy, rng: np.random.Generator) -> np.ndarray:
    """proxy + σ·z with σ set (bisection on a fixed z) so that Spearman(proxy', truth) ≈ WEAK_RHO."""
    z = rng.standard_normal(len(proxy)) * proxy.std()
    low, high = 0.0, 100.0
    for _ in range(60):
        sigma = (low + high) / 2
        rho = stats.spearmanr(proxy + sigma * z, truth).statistic
        low, high = (sigma, high) if rho > WEAK_RHO else (low, sigma)
    return proxy + (low + high) / 2 * z


def _mean_and_interval(values: np.ndarray) -> tuple[list[float], list[list[float]]]:
    """Mean over seeds (axis 0) and its 95% percentile-bootstrap interval (2,000 seeded resamples)."""
    rng = np.random.default_rng(0)
    boot = values[rng.integers(len(values), size=(2000, len(values)))].mean(axis=1)
    return values.mean(axis=0).round(4).tolist(), np.percentile(boot, [2.5, 97.5], axis=0).round(4).T.tolist()


def summarise(per_seed: list[dict[str, list[float]]]) -> dict:
    out = {}
    for method in METHODS:
        values = np.array([seed[method] for seed in per_seed])  # (seeds, RUNS)
        mean, ci = _mean_and_interval(values)
        out[method] = {
            "mean": mean,
            "ci": ci,
            "share_within_0.02": (values <= 0.02).mean(axis=0).round(3).tolist(),
        }
    return out


def paired(per_seed: list[dict[str, list[float]]]) -> dict:
    """Calibrated minus each regression, seed by seed (negative: the calibration is better)."""
    calibrated = np.array([seed["calibrated"] for seed in per_seed])
    out = {}
    for other in ("regression", "regression_same_runs"):
        mean, ci = _mean_and_interval(calibrated - np.array([seed[other] for seed in per_seed]))
        out[other] = {"mean_difference": mean, "ci": ci}
    return out


def measure(weights, truth, proxy, proxies=None) -> dict:
    """The full grid, then SEEDS seeded 80% subsets (``proxies``: a per-seed proxy, the weak case)."""
    full = simulate(weights, truth, proxy, np.random.default_rng(0)) if proxies is None else None
    per_seed = []
    rhos = []
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        p = proxy if proxies is None else proxies(rng)
        rhos.append(stats.spearmanr(p, truth).statistic)
        rows = np.sort(rng.choice(len(truth), size=int(round(SUBSET * len(truth))), replace=False))
        per_seed.append(simulate(weights[rows], truth[rows], p[rows], rng))
    slopes = np.array([seed[SLOPE] for seed in per_seed])  # (seeds, RUNS)
    result = {
        "runs": len(truth),
        "proxy_spearman": float(np.mean(rhos)),
        "seeds": summarise(per_seed),
        "calibrated_minus": paired(per_seed),
        SLOPE: dict(zip(("mean", "ci"), _mean_and_interval(slopes))),
    }
    if full is not None:
        result["full_grid"] = full
    return result


def markdown(results: dict) -> str:
    lines = [
        "# Calibrating the proxy with n real runs (simulated on the committed grids)",
        "",
        f"Normalised regret of each method's recommendation after n real runs; mean over {SEEDS} seeds "
        f"(each a random {SUBSET:.0%} of the grid's rows) with a 95% bootstrap interval of the mean.",
        "",
    ]
    for name, result in results.items():
        lines += [
            f"## {name} ({result['runs']} runs in the grid, proxy Spearman {result['proxy_spearman']:.3f})",
            "",
            "| method | " + " | ".join(f"n = {n}" for n in range(1, RUNS + 1)) + " |",
            "| --- |" + " ---: |" * RUNS,
        ]
        for method in METHODS:
            s = result["seeds"][method]
            cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, (lo, hi) in zip(s["mean"], s["ci"])]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Calibrated minus regression, paired by seed (negative: the calibration is better):",
            "",
        ]
        lines.append("| against | " + " | ".join(f"n = {n}" for n in range(1, RUNS + 1)) + " |")
        lines.append("| --- |" + " ---: |" * RUNS)
        for other, d in result["calibrated_minus"].items():
            cells = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, (lo, hi) in zip(d["mean_difference"], d["ci"])]
            lines.append(f"| {LABELS[other]} | " + " | ".join(cells) + " |")
        slope = result[SLOPE]
        lines += [
            "",
            "The calibrated model's posterior mean of the proxy's slope b (1: the proxy's differences "
            "trusted as they are, 0: ignored), mean over seeds:",
            "",
            "| | " + " | ".join(f"n = {n}" for n in range(1, RUNS + 1)) + " |",
            "| --- |" + " ---: |" * RUNS,
            "| slope b | "
            + " | ".join(f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, (lo, hi) in zip(slope["mean"], slope["ci"]))
            + " |",
        ]
        if "full_grid" in result:
            lines += ["", "The full grid (one candidate set, deterministic):", ""]
            lines.append("| method | " + " | ".join(f"n = {n}" for n in range(1, RUNS + 1)) + " |")
            lines.append("| --- |" + " ---: |" * RUNS)
            for method in METHODS:
                cells = [f"{v:.3f}" for v in result["full_grid"][method]]
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Mean regret after n runs with its interval, one panel per world, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=True)
    n = np.arange(1, RUNS + 1)
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items()):
        for i, method in enumerate(METHODS):
            s = result["seeds"][method]
            lo, hi = np.array(s["ci"]).T
            ax.plot(n, s["mean"], marker="o", ms=3, color=f"C{i}", label=LABELS[method])
            ax.fill_between(n, lo, hi, color=f"C{i}", alpha=0.12)
        ax.axhline(0.02, color="grey", ls=":", lw=1)
        ax.set_title(f"{name} (proxy ρ {result['proxy_spearman']:.2f})", fontsize=9)
        ax.set_xlabel("real runs n")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("normalised regret of the recommendation")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    results = {}
    for world, folder in WORLDS.items():
        weights, truth, proxy = load(folder)
        results[world] = measure(weights, truth, proxy)
    weights, truth, proxy = load(WORLDS["tiny"])
    results["tiny, weak proxy"] = measure(weights, truth, proxy, lambda rng: weak_proxy(truth, proxy, rng))
    (RESULTS / "calibration.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "calibration.md").write_text(markdown(results))
    plot(results, RESULTS / "calibration.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
