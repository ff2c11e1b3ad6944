"""The merged proxy against the rank reports' baselines on the committed grids: ``python benchmarks/baselines.py``.

Reads each committed grid of trained runs (``benchmarks/results/{tiny_grid,smollm2}/grid.csv``) and
the proxy's target statistics from its committed rank report, and scores the three baselines of
:mod:`mergeopt.evaluation.baselines` on the target (the mean of the dev-set losses) with the same
rank statistics (seed 0, 1,000 bootstrap resamples). The experts are each grid's one-hot runs
(`mergeopt train` trains them as the grid's vertices), so their own losses are its vertex rows and
no model is loaded: the numbers a rank report gives, for grids whose report predates the baselines.
Writes benchmarks/results/baselines.{json,md}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mergeopt.evaluation import baselines
from mergeopt.evaluation.rank_stats import rank_statistics

RESULTS = Path(__file__).parent / "results"
GRIDS = {"tiny": "tiny_grid", "smollm2": "smollm2"}
KEYS = ("spearman", "spearman_ci", "kendall", "regret")


def measure(folder: str) -> dict:
    grid = pd.read_csv(RESULTS / folder / "grid.csv")
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
        for name, s in result["target"].items():
            ci = ", ".join(f"{v:.3f}" for v in s["spearman_ci"])
            lines.append(
                f"| {world} ({result['runs']} runs) | {baselines.LABELS[name]} | {s['spearman']:.3f} [{ci}] | "
                f"{s['kendall']:.3f} | {s['regret']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    results = {world: measure(folder) for world, folder in GRIDS.items()}
    (RESULTS / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "baselines.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
