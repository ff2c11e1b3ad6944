"""Does the merged proxy track token shares or sample shares? ``python benchmarks/mixture_unit.py``

``weights.unit`` says what a mixture's weights mean when ``mergeopt train`` draws a run's batches:
``samples`` draws each example's domain with probability w_i, ``tokens`` draws it with probability
proportional to w_i / m_i (m_i: domain i's mean tokens per example), so that w_i is domain i's share
of the trained tokens. Where the domains' examples differ in length, one w is two different
mixtures, and the merged proxy θ0 + Σ w_i (θ_i − θ0) can only be a proxy for one of them at a time.

This trains the lattice of recipes/tiny_grid.yaml (4 experts, 16 interior mixtures at step 1/3, 150
steps of 512 tokens, 2 torch threads) once in each unit, from the same four experts (an expert is
one domain: the same run in either unit), and ranks the merged proxy of those experts against each
grid as ``mergeopt rank`` does (target: the mean of the four dev losses; Spearman with its 95%
bootstrap interval, Kendall, the regret of the proxy's pick; seed 0, 1,000 resamples). The proxy's
scores are the same for both grids, so the difference of the two Spearmans is bootstrapped over the
same resampled rows (paired): an interval that excludes 0 says which unit the proxy tracks.

Writes benchmarks/results/mixture_unit.{json,md}. About 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy import stats

from mergeopt.cli import main as mergeopt
from mergeopt.config import recipe_from_dict
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.worlds.train import train

REPO = Path(__file__).parent.parent
RESULTS = REPO / "benchmarks" / "results"
UNITS = ("samples", "tokens")
THREADS = 2  # the committed tiny grid's training threads
RESAMPLES = 1000
KEYS = ("spearman", "spearman_ci", "kendall", "regret", "top1_hit")


def recipe_tree(work: Path, unit: str) -> dict:
    tree = yaml.safe_load((REPO / "recipes" / "tiny_grid.yaml").read_text())
    names = list(tree["model"]["experts"])
    tree["model"]["experts"] = {n: str(work / "experts" / n) for n in names}  # shared by both units
    tree["weights"] = {**tree.get("weights", {}), "unit": unit}
    tree["train"]["output_dir"] = str(work / unit)
    tree["rank"]["grid"] = str(work / unit / "grid.csv")
    tree["output_dir"] = str(work / unit / "fit")
    tree["device"] = "cpu"
    return tree


def realised_token_shares(grid: pd.DataFrame, names: list[str]) -> np.ndarray:
    """Each run's share of its trained tokens per domain (columns in ``names``' order), as train
    counted them (run.json's ``domain_tokens``), in the grid's row order."""
    shares = []
    for path in grid["path"]:
        counted = json.loads((Path(path) / "run.json").read_text())["domain_tokens"]
        tokens = np.array([counted[name] for name in names], dtype=float)
        shares.append(tokens / tokens.sum())
    return np.array(shares)


def paired_difference(proxy: np.ndarray, truths: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Spearman(proxy, samples grid) − Spearman(proxy, tokens grid), with a paired percentile
    bootstrap over the grid's rows (scipy.stats.bootstrap)."""

    def difference(p, a, b):
        return stats.spearmanr(p, a).statistic - stats.spearmanr(p, b).statistic

    sample = (proxy, truths["samples"], truths["tokens"])
    point = float(difference(*sample))
    result = stats.bootstrap(
        sample,
        difference,
        paired=True,
        vectorized=False,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"spearman_samples_minus_tokens": point, "ci": [float(low), float(high)]}


def measure(work: Path) -> dict:
    torch.set_num_threads(THREADS)
    grids, reports = {}, {}
    for unit in UNITS:
        tree = recipe_tree(work, unit)
        recipe = recipe_from_dict(tree)
        train(recipe, progress=False, log=lambda _m: None)  # a --work run's finished runs are kept
        path = work / f"{unit}.yaml"
        path.write_text(yaml.safe_dump(tree))
        code = mergeopt(["rank", str(path), "--out", str(work / unit / "rank"), "--quiet"])
        if code != 0:
            raise SystemExit(f"mergeopt rank on the {unit} grid exited {code}")
        grids[unit] = read_csv(work / unit / "grid.csv")
        reports[unit] = json.loads((work / unit / "rank" / "rank_report.json").read_text())
    names = [c[2:] for c in grids["samples"].columns if c.startswith("w_")]
    weights = {u: grids[u][[f"w_{n}" for n in names]].to_numpy(float) for u in UNITS}
    order = {u: np.lexsort(weights[u].T[::-1]) for u in UNITS}  # the same mixture on the same row
    weights = {u: weights[u][order[u]] for u in UNITS}
    assert np.array_equal(weights["samples"], weights["tokens"]), "the two grids hold different mixtures"
    truths, proxies = {}, {}
    for u in UNITS:  # the rank report's own target columns, one row per mixture in the same order
        frame = read_csv(work / u / "rank" / "rank_pairs.csv")
        rows = np.lexsort(frame[[f"w_{n}" for n in names]].to_numpy(float).T[::-1])
        truths[u] = frame["truth_target"].to_numpy(float)[rows]
        proxies[u] = frame["proxy_target"].to_numpy(float)[rows]
    assert np.allclose(proxies["samples"], proxies["tokens"], rtol=1e-12), "one proxy, two grids"
    proxy = proxies["samples"]
    interior = (weights["samples"] == 1.0).sum(axis=1) == 0
    off = {
        u: np.abs(realised_token_shares(grids[u], names)[order[u]] - weights[u]).sum(axis=1)[interior]
        for u in UNITS
    }
    return {
        "recipe": "recipes/tiny_grid.yaml (weights.unit set per grid)",
        "experts": names,
        "runs_per_grid": len(proxy),
        "token_shares_off_w": {
            u: {"mean_l1": float(off[u].mean()), "max_l1": float(off[u].max())} for u in UNITS
        },
        "target": {u: {k: reports[u]["metrics"]["target"][k] for k in KEYS} for u in UNITS},
        "paired": paired_difference(proxy, truths),
        "threads": THREADS,
        "torch": torch.__version__,
    }


def markdown(result: dict) -> str:
    off = result["token_shares_off_w"]
    lines = [
        "# Does the merged proxy track token shares or sample shares?",
        "",
        f"The tiny grid's lattice ({result['runs_per_grid']} runs) trained once per `weights.unit`, from the same "
        "four experts; the merged proxy of those experts ranked against each (target: mean dev loss; "
        f"seed 0, {RESAMPLES:,} bootstrap resamples).",
        "",
        "How far each interior run's trained token shares (run.json's `domain_tokens`) lie from its w, "
        f"in L1: samples grid {off['samples']['mean_l1']:.3f} on average (at most {off['samples']['max_l1']:.3f}), "
        f"tokens grid {off['tokens']['mean_l1']:.3f} (at most {off['tokens']['max_l1']:.3f}).",
        "",
        "| grid trained in | Spearman [95% CI] | Kendall | regret of the proxy's pick | proxy's pick is the best run |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for unit, row in result["target"].items():
        low, high = row["spearman_ci"]
        lines.append(
            f"| {unit} | {row['spearman']:.3f} [{low:.3f}, {high:.3f}] | {row['kendall']:.3f} | "
            f"{row['regret']:.4f} | {'yes' if row['top1_hit'] else 'no'} |"
        )
    paired = result["paired"]
    low, high = paired["ci"]
    lines += [
        "",
        f"Spearman on the samples grid minus on the tokens grid: {paired['spearman_samples_minus_tokens']:+.3f} "
        f"[{low:+.3f}, {high:+.3f}] (paired bootstrap over the grid's rows).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergeopt-unit-") as tmp:
        result = measure(args.work or Path(tmp))
    (RESULTS / "mixture_unit.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "mixture_unit.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
