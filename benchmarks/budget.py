"""How long to train the experts? The proxy's ranking against the training length: ``python benchmarks/budget.py``.

Issue 16, point 6. The merged proxy stands in for models trained on a mixture only while the loss is
close to linear in θ between the experts; MergeMix advises short expert horizons, and
``mergeopt diagnose`` flags experts far from θ0 and loss barriers between them. This measures it on
the tiny world: for each length in ``--steps`` (default 17, 50, 150, 450 optimizer steps of 512
tokens), ``recipes/tiny_grid.yaml`` is trained with ``train.steps`` set to that length for the four
experts and the mixture runs alike, everything else (data, lr 2e-3 decayed linearly to 0 over the
run, seed) the recipe's; the learning rate's schedule is the recipe's, so a constant rate (MergeMix's
setting) is not measured. Then, on each length's own experts and runs:

* the rank check (:func:`mergeopt.evaluation.rank.rank_grid`, as ``mergeopt rank`` runs it): the
  merged proxy's Spearman [95% bootstrap CI], Kendall and regret on the target (mean dev loss), and
  the baselines' (interpolation of the experts, LightGBM and the mixing law, leave-one-out), seed 0,
  1,000 resamples; and the same statistics on the runs every length has (``SUBSET[:--subset-size]``);
* the diagnostics (:func:`mergeopt.evaluation.diagnose.diagnose_recipe`, 5 points per edge):
  ‖τ_i‖/‖θ0‖, the mean cos(τ_i, τ_j), the TIES sign-conflict rate, the edges' barriers and the flags.

Which runs: below ``--subset-from`` (450) steps the step-1/3 lattice, 20 runs; from it, only the first
``--subset-size`` rows of ``SUBSET`` (default 8: the experts and the 4 face centres; 4 trains the
experts alone, diagnosed but not ranked), because on a shared 2-core machine the lattice at 450
steps (9,000 steps of training) did not fit the time there was. At 150 steps the truth is the
committed ``benchmarks/results/tiny_grid/grid.csv``: the experts and one interior mixture are
trained here and must reproduce their committed rows (the largest difference is recorded), as
tests/test_fidelity.py checks. Trained with 2 torch threads, as that grid was (a CPU kernel splits
its reductions by thread, which training shows in a loss's third decimal).

Runs train into ``--scratch`` (default /tmp/budget/steps-N, never the repository). A finished run is
never retrained (``mergeopt train`` keeps its run.json; a killed one resumes from its last 10-step
checkpoint), and each length's numbers are kept in ``steps-N/result.json`` (delete it to measure that
length again), so a killed run of this script resumes. Cost: training is about 0.1 s per step and run
on 2 idle cores, several times that on a busy machine; the committed results took about 50 minutes
there. Writes benchmarks/results/budget.{json,md} and budget.png.

    python benchmarks/budget.py [--steps 17 50 150 450] [--subset-size 8] [--scratch /tmp/budget]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergeopt import worlds
from mergeopt.config import Recipe, load_recipe
from mergeopt.evaluation import baselines
from mergeopt.evaluation.baselines import LABELS
from mergeopt.evaluation.diagnose import diagnose_recipe
from mergeopt.evaluation.rank import rank_grid
from mergeopt.evaluation.rank_report import write_outputs
from mergeopt.evaluation.rank_stats import rank_statistics
from mergeopt.loading.problem import load_problem
from mergeopt.objectives.objective import Objective
from mergeopt.reporting.diagnostics import write_diagnostics
from mergeopt.runtime.exact_csv import read_csv
from mergeopt.worlds.train import train

RECIPE = "recipes/tiny_grid.yaml"
RESULTS = Path(__file__).parent / "results"
COMMITTED = RESULTS / "tiny_grid" / "grid.csv"
COMMITTED_STEPS = 150
THREADS = 2
POINTS = 5
NAMES = ("arith", "reverse", "brackets", "markov")
# the diagnostics compared with the proxy's quality, and which way each is expected to move as it worsens
DIAGNOSTICS = {
    "mean_relative_norm": ("mean ‖τ‖/‖θ0‖", "up"),
    "mean_cosine": ("mean cos(τ_i, τ_j)", "down"),
    "sign_conflict_rate": ("TIES sign-conflict rate", "up"),
    "max_relative_barrier": ("max barrier / loss", "up"),
    "mean_relative_barrier": ("mean barrier / loss", "up"),
    "flags": ("flags raised", "up"),
}


def _mixture(**weights: float) -> dict[str, float]:
    return {n: weights.get(n, 0.0) for n in NAMES}


T, TT = 1 / 3, 2 / 3
# the runs of the long lengths: rows of the step-1/3 lattice (exactly its floats), in training order,
# so that a shorter prefix (--subset-size) keeps every finished run's index (mixtures/NNN)
SUBSET = (
    *(_mixture(**{n: 1.0}) for n in NAMES),  # the experts
    *(_mixture(**{n: T for n in NAMES if n != left_out}) for left_out in NAMES),  # the face centres
    _mixture(arith=TT, reverse=T),
    _mixture(reverse=TT, brackets=T),
    _mixture(brackets=TT, markov=T),
    _mixture(markov=TT, arith=T),
)


# at the committed grid's length only the experts and this one interior mixture are trained: their
# rows must reproduce the committed ones (as tests/test_fidelity.py checks), and the committed grid
# is that length's truth
CHECK_MIXTURE = _mixture(brackets=T, markov=TT)


def recipe_for(steps: int, scratch: Path, mixtures: list[dict] | None = None) -> Recipe:
    """The tiny grid's recipe at ``steps``, every run and output under ``scratch/steps-N``; the runs
    ``mixtures`` instead of the recipe's lattice when given."""
    folder = scratch / f"steps-{steps}"
    runs = [] if mixtures is None else [f"train.mixtures={json.dumps({'kind': 'list', 'weights': mixtures})}"]
    return load_recipe(
        RECIPE,
        [
            *runs,
            f"train.steps={steps}",
            f"train.output_dir={folder}",
            f"output_dir={folder}/fit",
            f"rank.grid={folder}/grid.csv",
            "device=cpu",
            *(f"model.experts.{n}={folder}/experts/{n}" for n in NAMES),
        ],
    )


def committed_difference(grid: pd.DataFrame) -> dict:
    """Largest |loss − committed loss| over the runs, matched on their weights (the 150-step check)."""
    committed = read_csv(COMMITTED)
    weights = [f"w_{n}" for n in NAMES]
    losses = [c for c in committed.columns if c.startswith("loss_")]
    key = lambda frame: frame[weights].round(6).astype(str).agg(",".join, axis=1)  # noqa: E731
    joined = committed.set_index(key(committed)).join(grid.set_index(key(grid)), rsuffix="_new", how="inner")
    diff = np.abs(joined[losses].to_numpy() - joined[[f"{c}_new" for c in losses]].to_numpy())
    tokens_equal = bool((joined["tokens"] == joined["tokens_new"]).all())
    return {
        "runs_matched": len(joined),
        "max_abs_loss_difference": float(diff.max()),
        "tokens_equal": tokens_equal,
    }


def rank_check(recipe: Recipe, folder: Path, grid: Path) -> tuple[dict, dict]:
    """The rank report of the proxy and the baselines on ``grid``; also written to ``folder/rank``."""
    resolved, _ = worlds.resolve_recipe(recipe, lambda _m: None)
    objective = Objective.from_recipe(resolved)
    problem = load_problem(resolved, progress=False, objective=objective)
    report, pairs, _, baselines = rank_grid(
        problem, objective, grid, resolved.rank, resolved.seed, progress=False
    )
    weights = read_csv(grid)[[f"w_{n}" for n in NAMES]]
    write_outputs(report, pairs, folder / "rank", weights, baselines)
    proxy, truth = pairs["target"]
    return report, {"weights": weights.to_numpy().tolist(), "proxy": proxy.tolist(), "truth": truth.tolist()}


def diagnostics(recipe: Recipe, folder: Path) -> dict:
    """The diagnose numbers the issue asks to compare with the proxy's quality; diagnose.* into ``folder/diagnose``."""
    record = diagnose_recipe(recipe, points=POINTS)
    write_diagnostics(record, folder / "diagnose")
    vectors = record.task_vectors
    k = len(record.experts)
    cosines = [vectors.cosine[i][j] for i, j in combinations(range(k), 2)]
    barriers = [e.barrier for e in record.edges]
    relative = [e.relative_barrier for e in record.edges]
    losses = record.losses
    return {
        "relative_norm": dict(vectors.relative_norm),
        "mean_relative_norm": float(np.mean(list(vectors.relative_norm.values()))),
        "mean_cosine": float(np.mean(cosines)),
        "min_cosine": float(np.min(cosines)),
        "sign_conflict_rate": vectors.sign_conflicts.rate,
        "max_barrier": float(np.max(barriers)),
        "mean_barrier": float(np.mean(barriers)),
        "max_relative_barrier": float(np.max(relative)),
        "mean_relative_barrier": float(np.mean(relative)),
        "convex_edges": sum(e.convex for e in record.edges),
        "edges": len(record.edges),
        "own_domain_share": {e: losses.share[e].get(e) for e in record.experts},
        "base_target": losses.base["target"],
        "expert_target": {e: losses.experts[e]["target"] for e in record.experts},
        "flags": [{"kind": f.kind, "experts": list(f.experts), "value": f.value} for f in record.flags],
    }


def subset_statistics(pairs: dict, size: int) -> dict:
    """The proxy's and the baselines' target statistics on the rows ``SUBSET[:size]`` of a grid: the
    comparison every length has, when the long ones train only those (as benchmarks/baselines.py
    scores the baselines, the experts' own losses being the grid's vertex rows)."""
    weights = np.asarray(pairs["weights"])
    kept = [[m[n] for n in NAMES] for m in SUBSET[:size]]
    rows = [i for i, w in enumerate(weights) if any(np.allclose(w, m) for m in kept)]
    weights = weights[rows]
    truth = np.asarray(pairs["truth"])[rows]
    experts = np.array([truth[weights[:, i] == 1.0][0] for i in range(len(NAMES))])
    predicted = {
        "proxy": np.asarray(pairs["proxy"])[rows],
        "interpolation": baselines.interpolation(weights, experts),
        "lightgbm_loo": baselines.lightgbm_loo(weights, truth, seed=0),
        "mixing_law_loo": baselines.mixing_law_loo(weights, truth),
    }
    out = {"runs": len(rows)}
    for name, values in predicted.items():
        stats = rank_statistics(values, truth, n_bootstrap=1000, seed=0, k=3, name=name)
        out[name] = {k: stats[k] for k in ("spearman", "spearman_ci", "kendall", "regret")}
    return out


def expert_epochs(scratch: Path, steps: int) -> dict[str, float]:
    """Passes each expert made over its training set: the tokens it trained on over the set's tokens."""
    from transformers import AutoTokenizer

    from mergeopt.worlds.training_data import load_examples

    recipe, _ = worlds.resolve_recipe(recipe_for(steps, scratch), lambda _m: None)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.base)
    out = {}
    for name in NAMES:
        examples = load_examples(recipe.train.data[name], tokenizer, recipe.train.max_length)
        trained = json.loads((Path(recipe.model.experts[name]) / "run.json").read_text())["tokens"]
        out[name] = trained / sum(e.input_ids.numel() for e in examples)
    return out


def measure(steps: int, scratch: Path, subset: int | None) -> dict:
    """Train (what is missing), rank and diagnose one length; ``subset``: train only SUBSET[:subset]."""
    folder = scratch / f"steps-{steps}"
    cached = folder / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    committed = steps == COMMITTED_STEPS
    if committed:
        mixtures = [*SUBSET[: len(NAMES)], CHECK_MIXTURE]
    else:
        mixtures = None if subset is None else list(SUBSET[:subset])
    recipe = recipe_for(steps, scratch, mixtures)
    started = time.perf_counter()
    trained = train(recipe, progress=False, log=lambda m: print(f"[{steps} steps] {m}", flush=True))
    train_s = time.perf_counter() - started
    grid_path = COMMITTED if committed else trained
    grid = read_csv(grid_path)
    if mixtures is not None and len(mixtures) == len(NAMES):  # the experts alone: nothing to rank
        result = {"steps": steps, "runs": len(grid), "tokens_per_run": float(grid["tokens"].mean())}
        result.update(
            {"train_and_evaluate_s": train_s, "proxy": None, "diagnostics": diagnostics(recipe, folder)}
        )
        result["diagnostics"]["flag_count"] = len(result["diagnostics"]["flags"])
        cached.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"[{steps} steps] experts only, flags {[f['kind'] for f in result['diagnostics']['flags']]}",
            flush=True,
        )
        return result
    report, pairs = rank_check(recipe, folder, grid_path)
    target = report["metrics"]["target"]
    truth = np.asarray(pairs["truth"])
    proxy = np.asarray(pairs["proxy"])
    result = {
        "steps": steps,
        "runs": len(grid),
        "tokens_per_run": float(grid["tokens"].mean()),
        "train_and_evaluate_s": train_s,  # 0-ish when every run was already trained
        "proxy": {
            k: target[k]
            for k in (
                "spearman",
                "spearman_ci",
                "kendall",
                "kendall_ci",
                "pairwise_accuracy",
                "regret",
                "top1_hit",
            )
        },
        "baselines": {
            name: {k: stats["target"][k] for k in ("spearman", "spearman_ci", "kendall", "regret")}
            for name, stats in report["baselines"].items()
        },
        "truth_target_range": float(truth.max() - truth.min()),
        "truth_target_best": float(truth.min()),
        "proxy_mean_abs_error": float(np.mean(np.abs(proxy - truth))),
        "proxy_mean_error": float(np.mean(proxy - truth)),
        "diagnostics": diagnostics(recipe, folder),
        "pairs": pairs,
    }
    result["diagnostics"]["flag_count"] = len(result["diagnostics"]["flags"])
    if committed:
        result["truth"] = "benchmarks/results/tiny_grid/grid.csv"
        result["committed_grid_check"] = committed_difference(read_csv(trained))
    cached.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[{steps} steps] Spearman {target['spearman']:.3f}, regret {target['regret']:.3f}, "
        f"flags {[f['kind'] for f in result['diagnostics']['flags']]}",
        flush=True,
    )
    return result


def value(row: dict, key: str) -> float:
    return row["diagnostics"]["flag_count"] if key == "flags" else row["diagnostics"][key]


def directions(rows: list[dict]) -> dict:
    """For each diagnostic: its change between consecutive lengths and whether it moved the way that
    predicts the proxy's Spearman change (worse Spearman with the 'bad' direction). The Spearman is the
    one every length has: on the SUBSET rows. Lengths that were not ranked are left out."""
    rows = [r for r in rows if r["proxy"] is not None]
    out = {"steps": [r["steps"] for r in rows]}
    spearman = [r["subset"]["proxy"]["spearman"] for r in rows]
    for key, (_, bad) in DIAGNOSTICS.items():
        values = [value(r, key) for r in rows]
        agree = []
        for i in range(1, len(rows)):
            d_diag, d_rho = values[i] - values[i - 1], spearman[i] - spearman[i - 1]
            if d_diag == 0 or d_rho == 0:
                agree.append(None)
                continue
            worse = d_diag > 0 if bad == "up" else d_diag < 0
            agree.append(worse == (d_rho < 0))
        out[key] = {"values": values, "agrees_with_spearman": agree}
    return out


def subset_words(size: int) -> str:
    words = ["the 4 experts"]
    if size > len(NAMES):
        words.append(f"{min(size, 8) - len(NAMES)} face centres (1/3 on each of three domains)")
    if size > 8:
        words.append(f"{size - 8} edge points (2/3 and 1/3 on two domains)")
    return ", ".join(words)


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    rows = result["lengths"]
    ranked = [r for r in rows if r["proxy"] is not None]
    ranked_steps = result["directions"]["steps"]
    subset_runs = ranked[0]["subset"]["runs"]
    lines = [
        "# How long to train the experts: the proxy's ranking against the training length",
        "",
        f"Generated by `python benchmarks/budget.py` on {result['generated']} UTC ({result['machine']}, torch "
        f"{result['torch']}, {THREADS} threads). Tiny world, `{RECIPE}` with `train.steps` set per row for the "
        "experts and the mixture runs alike (512 tokens a step, lr 2e-3 decayed linearly to 0 over the run, "
        "seed 0). Target: the mean dev loss. Seed 0, 1,000 bootstrap resamples; regret is normalised by the "
        "grid's range. The baselines' columns give Spearman (regret).",
        "",
        "## The proxy and the baselines on each length's grid",
        "",
        "Runs: the step-1/3 lattice (20: 4 experts, 16 mixtures), or at the long lengths, where training "
        f"the lattice cost too much on 2 CPU cores, its first {subset_runs} rows in `SUBSET`: "
        f"{subset_words(subset_runs)}.",
        "",
        "| steps | runs | tokens / run | proxy Spearman [95% CI] | Kendall | regret | top-1 | "
        + " | ".join(LABELS[b] for b in ranked[0]["baselines"])
        + " | truth's range | proxy − truth (mean) |",
        "| ---: | ---: | ---: | --- | ---: | ---: | --- |" + " ---: |" * (len(ranked[0]["baselines"]) + 2),
    ]
    for r in rows:
        p = r["proxy"]
        if p is None:
            lines.append(
                f"| {r['steps']} | {r['runs']} | {r['tokens_per_run']:,.0f} | not ranked: only the experts were "
                "trained |" + " |" * (len(ranked[0]["baselines"]) + 5)
            )
            continue
        ci = ", ".join(fmt(v) for v in p["spearman_ci"])
        base = " | ".join(f"{fmt(b['spearman'])} ({fmt(b['regret'])})" for b in r["baselines"].values())
        lines.append(
            f"| {r['steps']} | {r['runs']} | {r['tokens_per_run']:,.0f} | {fmt(p['spearman'])} [{ci}] | "
            f"{fmt(p['kendall'])} | {fmt(p['regret'])} | {'yes' if p['top1_hit'] else 'no'} | {base} | "
            f"{fmt(r['truth_target_range'])} | {r['proxy_mean_error']:+.3f} |"
        )
    names = [n for n in ranked[0]["subset"] if n != "runs"]
    lines += [
        "",
        f"## The same {subset_runs} mixtures at every length",
        "",
        "| steps | " + " | ".join(f"{LABELS[n]} Spearman [95% CI] (regret)" for n in names) + " |",
        "| ---: |" + " --- |" * len(names),
    ]
    for r in ranked:
        cells = []
        for n in names:
            st = r["subset"][n]
            ci = ", ".join(fmt(v) for v in st["spearman_ci"])
            cells.append(f"{fmt(st['spearman'])} [{ci}] ({fmt(st['regret'])})")
        lines.append(f"| {r['steps']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The diagnostics",
        "",
        "| steps | epochs per expert ("
        + ", ".join(NAMES)
        + ") | ‖τ‖/‖θ0‖ (same order) | mean cos | sign conflicts | "
        "barrier max (mean) | barrier / loss max (mean) | convex edges | flags |",
        "| ---: | --- | --- | ---: | ---: | --- | --- | ---: | --- |",
    ]
    for r in rows:
        d = r["diagnostics"]
        norms = ", ".join(fmt(d["relative_norm"][n]) for n in NAMES)
        epochs = ", ".join(f"{r['expert_epochs'][n]:.1f}" for n in NAMES)
        kinds: dict[str, int] = {}
        for f in d["flags"]:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        flags = ", ".join(f"{k} × {v}" for k, v in kinds.items()) or "none"
        lines.append(
            f"| {r['steps']} | {epochs} | {norms} | {fmt(d['mean_cosine'])} | {fmt(d['sign_conflict_rate'])} | "
            f"{fmt(d['max_barrier'], 4)} ({fmt(d['mean_barrier'], 4)}) | "
            f"{d['max_relative_barrier']:.2%} ({d['mean_relative_barrier']:.2%}) | "
            f"{d['convex_edges']}/{d['edges']} | {flags} |"
        )
    lines += [
        "",
        "## Does each diagnostic move with the proxy's quality?",
        "",
        "Between consecutive lengths: does the diagnostic move in the direction that signals a worse "
        f"proxy exactly when the proxy's Spearman on the {subset_runs} common mixtures falls? (yes / no; "
        "n/a where either does not move.)",
        "",
        "| diagnostic | worse when | values | "
        + " | ".join(f"{a} → {b} steps" for a, b in zip(ranked_steps, ranked_steps[1:]))
        + " |",
        "| --- | --- | --- |" + " --- |" * (len(ranked_steps) - 1),
    ]
    for key, moved in result["directions"].items():
        if key == "steps":
            continue
        label, bad = DIAGNOSTICS[key]
        values = ", ".join(str(v) if key == "flags" else fmt(v) for v in moved["values"])
        agree = " | ".join(
            "n/a" if a is None else ("yes" if a else "no") for a in moved["agrees_with_spearman"]
        )
        lines.append(f"| {label} | {bad} | {values} | {agree} |")
    check = next((r["committed_grid_check"] for r in rows if "committed_grid_check" in r), None)
    if check is not None:
        lines += [
            "",
            f"At {COMMITTED_STEPS} steps the grid is the committed `benchmarks/results/tiny_grid/grid.csv`: "
            f"{check['runs_matched']} runs matched, largest loss difference {check['max_abs_loss_difference']:.1e}, "
            f"token counts {'equal' if check['tokens_equal'] else 'different'}.",
        ]
    lines += [
        "",
        "What these points can and cannot show: each length is one grid trained with one seed, so each "
        f"row is one draw; with {len(ranked)} ranked lengths a correlation across lengths is not estimable "
        "(any monotone sequence of 3 points has rank correlation ±1), and the table above says only whether "
        "each diagnostic moved the same way as the proxy's quality. Overlapping Spearman intervals mean a "
        f"difference between lengths is within the resampling noise of {subset_runs} to 20 mixtures.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Spearman, regret and the diagnostics against the length, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = result["lengths"]
    rows = [r for r in every if r["proxy"] is not None]
    steps = [r["steps"] for r in rows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    rho = [r["proxy"]["spearman"] for r in rows]
    lo = [r["proxy"]["spearman"] - r["proxy"]["spearman_ci"][0] for r in rows]
    hi = [r["proxy"]["spearman_ci"][1] - r["proxy"]["spearman"] for r in rows]
    top.errorbar(steps, rho, yerr=[lo, hi], marker="o", capsize=4, label="merged proxy, own grid [95% CI]")
    top.plot(
        steps,
        [r["subset"]["proxy"]["spearman"] for r in rows],
        marker="o",
        ls="--",
        label="merged proxy, common runs",
    )
    for name in rows[0]["baselines"]:
        top.plot(
            steps, [r["baselines"][name]["spearman"] for r in rows], ls=":", marker=".", label=LABELS[name]
        )
    top.set_ylabel("Spearman (target)")
    top.set_title("Tiny world: the merged proxy against the training length")
    top.legend(fontsize=7, loc="best")
    middle.plot(
        steps, [r["proxy"]["regret"] for r in rows], marker="s", color="crimson", label="proxy, own grid"
    )
    middle.plot(
        steps,
        [r["subset"]["proxy"]["regret"] for r in rows],
        marker="s",
        ls="--",
        color="salmon",
        label="proxy, common runs",
    )
    middle.set_ylabel("normalised regret")
    middle.set_ylim(bottom=0)
    middle.legend(fontsize=7, loc="best")
    all_steps = [r["steps"] for r in every]
    for n in NAMES:
        bottom.plot(
            all_steps,
            [r["diagnostics"]["relative_norm"][n] for r in every],
            marker="o",
            label=f"‖τ‖/‖θ0‖ {n}",
        )
    bottom.set_ylabel("‖τ‖/‖θ0‖")
    bottom.set_xlabel("training steps (experts and mixture runs)")
    bottom.set_xscale("log")
    bottom.minorticks_off()
    bottom.set_xticks(all_steps, [str(s) for s in all_steps])
    right = bottom.twinx()
    for key, style, marker, label in (
        ("max_relative_barrier", dict(color="k", ls="--"), "^", "max barrier / loss (%)"),
        ("sign_conflict_rate", dict(color="gray", ls="-."), "v", "sign conflicts (%)"),
    ):
        right.plot(
            all_steps, [100 * r["diagnostics"][key] for r in every], marker=marker, label=label, **style
        )
    right.set_ylabel("%")
    handles = bottom.get_legend_handles_labels()
    extra = right.get_legend_handles_labels()
    bottom.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[17, 50, 150, 450])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/budget"))
    parser.add_argument(
        "--subset-from", type=int, default=450, help="lengths from this many steps train only the SUBSET rows"
    )
    parser.add_argument(
        "--subset-size",
        type=int,
        default=8,
        help=f"the first N rows of SUBSET; {len(NAMES)}: the experts alone, diagnosed but not ranked",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "budget.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    steps = sorted(args.steps)
    rows = [measure(s, args.scratch, args.subset_size if s >= args.subset_from else None) for s in steps]
    common = args.subset_size if args.subset_size > len(NAMES) else len(SUBSET)
    for row in rows:
        row["expert_epochs"] = expert_epochs(args.scratch, row["steps"])
        if row["proxy"] is not None:
            row["subset"] = subset_statistics(row["pairs"], common)
    result = {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "recipe": RECIPE,
        "threads": THREADS,
        "steps": steps,
        "lengths": rows,
    }
    result["directions"] = directions(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
