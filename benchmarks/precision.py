"""What `model.stack_dtype` and `model.compute_dtype` cost the merged proxy: losses, ranking and fitted w.

Run from the repository root (tiny world about 2 min, SmolLM2 world about 25 min on 2 CPU cores;
the SmolLM2 experts must be trained first, see below):

    MERGEOPT_CACHE=/work/cache nice -n 10 .venv/bin/python benchmarks/precision.py \
        --worlds tiny smollm2 --smollm2-experts /work/runs/smollm2/experts

For each world and each precision variant (stack float32 + compute float32 = the reference;
stack bfloat16; stack int8 = K − 1 differences as int8 with one absmax scale per expert and row;
compute bfloat16 over a float32 stack, its loss evaluations in float32 as ``model.eval_dtype``
defaults to; the same with evaluations in bfloat16), with everything else the recipe's:

1. the merged proxy's mean token loss of every dev set, and of the target (``data.target: all``:
   Σ_s a_s L_s / Σ_s a_s with the weights ``load_problem`` derives, as ``mergeopt.evaluation.rank`` forms it),
   at every mixture of the world's committed grid of trained runs, on the whole dev sets
   (``mergeopt.evaluation.proxy.proxy_losses``);
2. against the reference: max |Δ loss| over every dev set and the target and every mixture, the
   Spearman correlation (scipy.stats.spearmanr) of the variant's target proxy with the
   reference's over the grid mixtures, and each variant's Spearman against the true target
   losses of the trained runs (the grid's ``loss_<set>`` columns weighted the same way);
3. the mixture the gradient strategy fits (``mergeopt.fit.fit``, output under ``--work``) and its
   L1 distance to the reference's fitted w;

and the stack's size (``problem.stack.nbytes()``). The issue's targets: stack int8 Spearman vs
the reference ≥ 0.99 and fitted w within 0.02 (L1) of the reference; compute bfloat16 fitted w
within 0.02 of float32; int4, if offered, as int8. An int4 stack is not offered
(``model.stack_dtype`` takes float32, bfloat16, float16, int8); the variant "stack int4 values"
rounds the differences to 4-bit values (|q| ≤ 7, one absmax scale per expert and row) and keeps
them in int8 storage, so it measures what a packed int4 stack would cost the proxy.
The variants mergeopt does not offer (fewer int8 levels, grouped 4-bit values) are built by
swapping one of the stack builder's public functions (``mergeopt.merging.stacking.quantize_rows``,
``mergeopt.merging.stacking.linear_differences``) for the variant's run, and restored after it.

``--variants`` runs a subset (short names, e.g. ``--variants "stack int4 values"``) and adds it
to the world's stored variants, compared with the stored reference.

Worlds:

- ``tiny``: recipes/tiny.yaml (the tiny world's built-in experts, built into $MERGEOPT_CACHE on
  first use) against benchmarks/results/tiny_grid/grid.csv. That grid's runs, experts included,
  were trained by recipes/tiny_grid.yaml, whose experts differ from the built-in ones, so the
  Spearman vs truth of this world is not the README's 0.841.
- ``tiny_grid``: recipes/tiny_grid.yaml with the experts the grid's truth was trained with
  (``--tiny-grid-experts DIR`` holding arith/reverse/brackets/markov), e.g. trained alone by
  ``python -m mergeopt.train recipes/tiny_grid.yaml train.output_dir=DIR/.. model.experts=...
  'train.mixtures={kind: list, weights: [<the four one-hot mixtures>]}'``.
- ``smollm2``: recipes/smollm2.yaml against benchmarks/results/smollm2/grid.csv, the experts in
  ``--smollm2-experts DIR`` (code/prose/math), trained alone with
  ``python -m mergeopt.train recipes/smollm2.yaml train.output_dir=/work/runs/smollm2
  model.experts='{code: /work/runs/smollm2/experts/code, ...}'
  'train.mixtures={kind: list, weights: [{code: 1, prose: 0, math: 0}, ...]}'`` (a one-hot
  mixture is trained as the expert itself, so only the three experts are trained).

Results: ``--out``/precision.json and precision.md. A world already in precision.json and not
rerun is kept, so the worlds can be run one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import mergeopt
import mergeopt.merging.stacking
from mergeopt.config import load_recipe
from mergeopt.evaluation.proxy import proxy_losses, read_grid
from mergeopt.fit import fit
from mergeopt.loading.problem import load_problem
from mergeopt.objectives.objective import Objective
from mergeopt.worlds import resolve_recipe

VARIANTS = {
    "reference (stack float32, compute float32)": [
        "model.stack_dtype=float32",
        "model.compute_dtype=float32",
    ],
    "stack bfloat16": ["model.stack_dtype=bfloat16", "model.compute_dtype=float32"],
    "stack int8": ["model.stack_dtype=int8", "model.compute_dtype=float32"],
    # the fit's steps in bfloat16, its loss evaluations in model.eval_dtype's default (float32)
    "compute bfloat16 (stack float32)": ["model.stack_dtype=float32", "model.compute_dtype=bfloat16"],
    # evaluations in bfloat16 too: why model.eval_dtype defaults to float32
    "compute bfloat16, eval bfloat16 (stack float32)": [
        "model.stack_dtype=float32",
        "model.compute_dtype=bfloat16",
        "model.eval_dtype=bfloat16",
    ],
}
# An int4 stack is not offered yet: this variant measures whether it would hold the targets, with
# the differences rounded to 4-bit values (|q| ≤ 7, one absmax scale per expert and row) and kept in
# int8 storage, which gives the numbers a packed int4 stack would give.
INT4 = "stack int4 values (simulated in int8 storage)"
VARIANTS[INT4] = ["model.stack_dtype=int8", "model.compute_dtype=float32"]
LEVELS = {INT4: 7}
# 4-bit values with one absmax scale per expert and group of GROUP columns of a row (the grouping
# GPTQ and AWQ use for int4 weights), applied to the float32 differences as they are stacked and
# kept in float32 storage: the proxy a grouped int4 stack would give (not its size)
GROUP = 64
INT4_GROUPED = f"stack int4 values, groups of {GROUP} (simulated in float32 storage)"
VARIANTS[INT4_GROUPED] = ["model.stack_dtype=float32", "model.compute_dtype=float32"]
REFERENCE = next(iter(VARIANTS))
# the targets: (minimum Spearman vs the reference or None, maximum L1 of fitted w or None)
TARGETS = {
    "stack int8": (0.99, 0.02),
    INT4: (0.99, 0.02),
    INT4_GROUPED: (0.99, 0.02),
    "compute bfloat16 (stack float32)": (None, 0.02),
}


@contextlib.contextmanager
def quantization_levels(levels: int | None):
    """Build the stack with ``levels`` as the largest |q| of its int8 differences (None: as shipped)."""
    if levels is None:
        yield
        return
    original = mergeopt.merging.stacking.quantize_rows
    mergeopt.merging.stacking.quantize_rows = functools.partial(original, levels=levels)
    try:
        yield
    finally:
        mergeopt.merging.stacking.quantize_rows = original


def world_specs(args) -> dict[str, dict]:
    smollm2 = Path(args.smollm2_experts).resolve()
    tiny_grid = Path(args.tiny_grid_experts).resolve()
    return {
        "tiny": {
            "recipe": "recipes/tiny.yaml",
            "grid": "benchmarks/results/tiny_grid/grid.csv",
            "overrides": [],
            "note": "The tiny world's built-in experts (tiny://experts), not the experts the grid's runs "
            "were trained with (recipes/tiny_grid.yaml trains its own): Spearman vs truth is lower than "
            "the README's 0.841, which the tiny_grid rows below reproduce.",
        },
        "tiny_grid": {
            "recipe": "recipes/tiny_grid.yaml",
            "grid": "benchmarks/results/tiny_grid/grid.csv",
            "overrides": [
                "model.experts={"
                + ", ".join(f"{n}: {tiny_grid / n}" for n in ("arith", "reverse", "brackets", "markov"))
                + "}",
                "rank.grid=null",
            ],
            "note": "The experts recipes/tiny_grid.yaml trains (the grid's own vertices, retrained "
            "alone: their dev losses equal the grid's expert rows within 1e-6).",
        },
        "smollm2": {
            "recipe": "recipes/smollm2.yaml",
            "grid": "benchmarks/results/smollm2/grid.csv",
            "overrides": [
                "model.experts={" + ", ".join(f"{n}: {smollm2 / n}" for n in ("code", "prose", "math")) + "}",
                "rank.grid=null",
            ],
            "note": "LoRA experts (r = 8) merged into dense checkpoints by `mergeopt train`, so the "
            "stack is dense and stack_dtype applies to every stacked parameter.",
        },
    }


def spearman(a, b) -> float | None:
    """scipy's Spearman ρ; None where it is undefined (a constant column)."""
    rho = float(spearmanr(np.asarray(a), np.asarray(b)).statistic)
    return None if math.isnan(rho) else rho


def grouped_4bit(rows: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """``rows`` (K − 1, *shape) rounded to 4-bit values with one absmax scale per expert, row and
    group of ``group`` columns, returned dequantised in their own dtype."""
    k1 = rows.shape[0]
    flat = rows.reshape(k1, rows.shape[1] if rows.dim() > 2 else 1, -1).float()
    columns = flat.shape[2]
    padded = torch.nn.functional.pad(flat, (0, -columns % group))
    groups = padded.reshape(k1, flat.shape[1], -1, group)
    scale = groups.abs().amax(dim=3, keepdim=True) / 7.0
    q = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-7, 7)
    values = (q * scale).reshape(k1, flat.shape[1], -1)[..., :columns]
    return values.reshape(rows.shape).to(rows.dtype)


@contextlib.contextmanager
def grouped_differences(enabled: bool):
    """Stack the differences rounded by :func:`grouped_4bit` (the anchor form's differences)."""
    if not enabled:
        yield
        return
    original = mergeopt.merging.stacking.linear_differences

    def rounded(*args, **kwargs):
        anchor, rows, differ = original(*args, **kwargs)
        return anchor, grouped_4bit(rows), differ

    mergeopt.merging.stacking.linear_differences = rounded
    try:
        yield
    finally:
        mergeopt.merging.stacking.linear_differences = original


def run_variant(name: str, spec: dict, overrides: list[str], table, work: Path, quiet: bool) -> dict:
    """Proxy losses on the grid, then the gradient fit, for one precision variant."""
    with quantization_levels(LEVELS.get(name)), grouped_differences(name == INT4_GROUPED):
        return _run_variant(name, spec, overrides, table, work, quiet)


def _run_variant(name: str, spec: dict, overrides: list[str], table, work: Path, quiet: bool) -> dict:
    recipe = load_recipe(spec["recipe"], overrides)
    resolved, _ = resolve_recipe(recipe, log=lambda _m: None)
    start = time.perf_counter()
    objective = Objective.from_recipe(resolved)
    problem = load_problem(resolved, progress=False, objective=objective)
    load_s = time.perf_counter() - start
    a = problem.set_weights.double().numpy()
    a = a / a.sum()
    loss_columns = [f"loss_{d.name}" for d in resolved.data.dev]
    start = time.perf_counter()
    proxy = proxy_losses(problem, objective, table, progress=not quiet)
    proxy_s = time.perf_counter() - start
    target = proxy[loss_columns].to_numpy() @ a
    stack = problem.stack
    stack_info = {
        "bytes": int(stack.nbytes()),
        "mib": stack.nbytes() / 2**20,
        "stacked_parameters": int(stack.num_stacked_parameters()),
        "stacked_tensors": len(stack.deltas),
        "delta_dtype": str(next(iter(stack.deltas.values())).dtype) if stack.deltas else None,
        "anchor_dtype": str(next(iter(stack.anchor.values())).dtype) if stack.anchor else None,
        "compute_dtype": str(stack.compute_dtype),
        "eval_dtype": str(stack.eval_dtype or stack.compute_dtype),
    }
    del problem, stack
    gc.collect()

    out_dir = work / name.split(" (")[0].replace(" ", "_")
    fit_recipe = load_recipe(spec["recipe"], [*overrides, f"output_dir={out_dir}"])
    messages: list[str] = []
    start = time.perf_counter()
    mixture = fit(fit_recipe, progress=False, log=messages.append, resume="restart")
    fit_s = time.perf_counter() - start
    gc.collect()
    return {
        "overrides": overrides,
        "proxy": {c: proxy[c].tolist() for c in loss_columns},
        "proxy_target": target.tolist(),
        "stack": stack_info,
        "fitted_weights": mixture["weights"],
        "fit": {
            **{k: mixture.get(k) for k in ("dev_loss", "heldout_loss", "uniform_dev_loss")},
            **{k: mixture.get("search", {}).get(k) for k in ("steps", "best_step", "stopped_early")},
        },
        "output_dir": str(out_dir),
        "seconds": {"load": load_s, "proxy_grid": proxy_s, "fit": fit_s},
    }


def compare(results: dict, truth_target: np.ndarray, loss_columns: list[str], names: list[str]) -> None:
    """Fill each variant's comparison with the reference and the truth, and the targets."""
    ref = results.get(REFERENCE)
    for name, r in results.items():
        if "error" in r:
            continue
        r["spearman_vs_truth"] = spearman(r["proxy_target"], truth_target)
        if ref is None or "error" in ref:
            continue
        deltas = {
            c: float(np.max(np.abs(np.array(r["proxy"][c]) - np.array(ref["proxy"][c]))))
            for c in loss_columns
        }
        deltas["target"] = float(np.max(np.abs(np.array(r["proxy_target"]) - np.array(ref["proxy_target"]))))
        r["max_abs_delta_loss"] = max(deltas.values())
        r["max_abs_delta_loss_per_column"] = deltas
        r["spearman_vs_reference"] = spearman(r["proxy_target"], ref["proxy_target"])
        r["spearman_vs_reference_per_set"] = {
            c: spearman(r["proxy"][c], ref["proxy"][c]) for c in loss_columns
        }
        r["fitted_w_l1_to_reference"] = float(
            sum(abs(r["fitted_weights"][n] - ref["fitted_weights"][n]) for n in names)
        )
        target = TARGETS.get(name)
        if target is None:
            r["target"] = None
            continue
        min_rho, max_l1 = target
        checks = []
        if min_rho is not None:
            checks.append(r["spearman_vs_reference"] is not None and r["spearman_vs_reference"] >= min_rho)
        if max_l1 is not None:
            checks.append(r["fitted_w_l1_to_reference"] <= max_l1)
        r["target"] = {"spearman_vs_reference_min": min_rho, "fitted_w_l1_max": max_l1, "met": all(checks)}


def run_world(world: str, spec: dict, args, previous: dict | None = None) -> dict:
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    resolved, _ = resolve_recipe(recipe, log=print)
    names = resolved.expert_names
    table = read_grid(spec["grid"], names)
    loss_columns = [f"loss_{d.name}" for d in resolved.data.dev]
    weights = np.array([d.weight for d in resolved.data.dev], dtype=np.float64)
    truth_target = table[loss_columns].to_numpy() @ (weights / weights.sum())
    # a subset run adds to the stored variants (those still defined here)
    results = {k: v for k, v in (previous or {}).items() if k in VARIANTS} if args.variants else {}
    work = Path(args.work) / world
    for name, variant in VARIANTS.items():
        if args.variants and not any(v == name.split(" (")[0] for v in args.variants):
            continue
        print(f"[{world}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            results[name] = run_variant(
                name, spec, [*spec["overrides"], f"device={args.device}", *variant], table, work, args.quiet
            )
            env = environment([])
            results[name]["measured"] = {k: env[k] for k in ("date_utc", "git_commit", "git_dirty")}
        except Exception as err:  # a crash in a precision path is a finding: record it and go on
            results[name] = {
                "overrides": [*spec["overrides"], *variant],
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
            print(results[name]["traceback"], file=sys.stderr, flush=True)
        print(f"[{world}] {name}: {time.perf_counter() - start:.1f} s", flush=True)
    compare(results, truth_target, loss_columns, names)
    return {
        "recipe": spec["recipe"],
        "grid": spec["grid"],
        "overrides": spec["overrides"],
        "note": spec.get("note"),
        "experts": dict(resolved.model.experts),
        "n_mixtures": len(table),
        "expert_names": names,
        "target_set_weights": dict(
            zip([d.name for d in resolved.data.dev], (weights / weights.sum()).tolist())
        ),
        "truth_target": truth_target.tolist(),
        "grid_weights": table[[f"w_{n}" for n in names]].to_numpy().tolist(),
        "variants": results,
    }


def environment(argv: list[str]) -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = None
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mergeopt": getattr(mergeopt, "__version__", None),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join([Path(sys.executable).name, *sys.argv[:1], *argv]),
        "mergeopt_cache": os.environ.get("MERGEOPT_CACHE"),
    }


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _measured(m: dict | None) -> str:
    if not m:
        return "before per-variant records"
    dirty = " (uncommitted changes)" if m["git_dirty"] else ""
    return f"{m['date_utc'][:16]}, {(m['git_commit'] or '?')[:7]}{dirty}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Precision knobs and the merged proxy",
        "",
        "`model.stack_dtype` and `model.compute_dtype` against the float32 reference: the merged proxy's",
        "dev losses at every mixture of a committed grid of trained runs (whole dev sets), its ranking of",
        "those mixtures, and the mixture the gradient strategy fits. Produced by `benchmarks/precision.py`.",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} with {env['torch_threads']} "
        f"threads, Python {env['python']}; latest run {env['date_utc']} UTC at mergeopt commit {env['git_commit']}"
        + (" (with uncommitted changes)" if env["git_dirty"] else "")
        + '; each variant\'s own run is under "measured" (the uncommitted changes of the runs that column',
        "records were README edits).",
        "",
        "Columns: max |Δ loss| is over every dev set, the target and every grid mixture; Spearman vs",
        "reference compares the target-loss proxies over the grid mixtures; Spearman vs truth ranks the",
        "proxy's target loss against the trained runs' (the reference's row is the baseline); L1 is",
        "Σ_i |w_i − w_i(reference)| of the fitted mixtures. Targets (the issue): stack int8 Spearman vs",
        "reference ≥ 0.99 and L1 ≤ 0.02; compute bfloat16 L1 ≤ 0.02; int4 as int8. An int4 stack is not",
        "offered (`model.stack_dtype` takes float32, bfloat16, float16, int8): its row measures 4-bit",
        "values (|q| ≤ 7, one absmax scale per expert and row) kept in int8 storage, the numbers a packed",
        "int4 stack would give, at int8's size; the grouped int4 row rounds the differences to 4-bit",
        f"values with one scale per expert, row and {GROUP} columns, kept in float32 storage (its MiB are",
        "float32's). \"compute bfloat16\" runs the fit's steps in bfloat16 and",
        "its loss evaluations (proxy losses, held-out early stopping) in float32, `model.eval_dtype`'s",
        'default; "eval bfloat16" evaluates in bfloat16 too, to show why that default.',
    ]
    for world, w in report["worlds"].items():
        names = w["expert_names"]
        lines += [
            "",
            f"## {world}: `{w['recipe']}`, {w['n_mixtures']} mixtures of `{w['grid']}`",
            "",
        ]
        if w.get("note"):
            lines += [w["note"], ""]
        lines += [
            "| variant | max \\|Δ loss\\| | Spearman vs reference | Spearman vs truth | fitted w ("
            + ", ".join(names)
            + ") | L1 to reference | stack MiB | target met |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | :---: |",
        ]
        for name, r in w["variants"].items():
            if "error" in r:
                lines.append(f"| {name} | crashed: `{r['error'].splitlines()[0][:120]}` | | | | | | no |")
                continue
            is_ref = name == REFERENCE
            fitted = ", ".join(f"{r['fitted_weights'][n]:.3f}" for n in names)
            target = r.get("target")
            met = "—" if target is None else ("yes" if target["met"] else "no")
            lines.append(
                f"| {name} | {'0 (itself)' if is_ref else _fmt(r.get('max_abs_delta_loss'), 5)} | "
                f"{'1 (itself)' if is_ref else _fmt(r.get('spearman_vs_reference'))} | "
                f"{_fmt(r.get('spearman_vs_truth'))} | {fitted} | "
                f"{'0 (itself)' if is_ref else _fmt(r.get('fitted_w_l1_to_reference'))} | "
                f"{r['stack']['mib']:.2f} | {met} |"
            )
        lines += [
            "",
            "Wall time per variant (s): load, proxy on the grid, fit. Not a speed measurement: the",
            "2-core machine was shared with other jobs, and identical work varied several-fold between",
            "runs (compare the reference fits of tiny and tiny_grid).",
        ]
        lines += [""]
        lines += [
            "| variant | load | proxy grid | fit | fit steps | best step | fit dev loss | measured |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, r in w["variants"].items():
            if "error" in r:
                continue
            s = r["seconds"]
            lines.append(
                f"| {name} | {s['load']:.1f} | {s['proxy_grid']:.1f} | {s['fit']:.1f} | "
                f"{r['fit'].get('steps', 'n/a')} | {r['fit'].get('best_step', 'n/a')} | "
                f"{_fmt(r['fit'].get('dev_loss'))} | {_measured(r.get('measured'))} |"
            )
    lines += ["", "Commands:", ""]
    for command in report.get("commands", []):
        lines += [f"    {command}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", nargs="+", default=["tiny"], choices=["tiny", "tiny_grid", "smollm2"])
    parser.add_argument("--variants", nargs="*", help="subset by short name, e.g. 'stack int8'")
    parser.add_argument("--smollm2-experts", default="/work/runs/smollm2/experts")
    parser.add_argument("--tiny-grid-experts", default="/work/runs/tiny-grid/experts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="/tmp/mergeopt-precision", help="fit output directories")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--render", action="store_true", help="write precision.md from precision.json only")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = Path(args.out)
    json_path, md_path = out / "precision.json", out / "precision.md"
    if args.render:
        md_path.write_text(markdown(json.loads(json_path.read_text())))
        return 0
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"worlds": {}, "commands": []}
    report["environment"] = environment(argv)
    specs = world_specs(args)
    for world in args.worlds:
        start = time.perf_counter()
        stored = report["worlds"].get(world, {}).get("variants")
        report["worlds"][world] = run_world(world, specs[world], args, stored)
        report["worlds"][world]["seconds"] = time.perf_counter() - start
        report["worlds"][world]["environment"] = report["environment"]
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
        md_path.write_text(markdown(report))
    command = f"MERGEOPT_CACHE={os.environ.get('MERGEOPT_CACHE', '')} python benchmarks/precision.py {shlex.join(argv)}"
    if command not in report["commands"]:
        report["commands"].append(command)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    md_path.write_text(markdown(report))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
