"""What `mergeopt merge --dtype` does to the losses fit reported: ``python benchmarks/export_dtype.py RUN``

fit scores the merge in float32 (``model.eval_dtype``'s default, over a merge computed in float32),
so mixture.json's losses are a float32 model's; ``mergeopt merge`` writes the base's ``config.json``
dtype unless told otherwise, and a bfloat16 checkpoint is that model rounded. docs/guides/export.md
says how far the rounding moves the losses against how far the fitted mixture is ahead of the
uniform one; this script measures it, so the sentence has a result behind it.

RUN is a finished fit's output directory (the ``recipe.yaml`` and ``mixture.json`` fit wrote). For
the fitted mixture (``--mixture RUN/mixture.json``) and the uniform one (``--weights``, every expert
1/K), ``mergeopt merge`` is run as a user runs it (a subprocess, ``python -m mergeopt merge``) once
with the default ``--dtype`` and once per ``--dtypes`` entry that writes another dtype than the
default (a float32 merge when the default is bfloat16, a bfloat16 one when it is float32). Every
written checkpoint is loaded with ``AutoModelForCausalLM.from_pretrained`` as it is stored (the
file's own dtype, transformers' default) and, when that is not float32, upcast to float32 too
(``dtype=torch.float32``: the rounded weights, computed in float32). Each loading is scored on the
recipe's dev sets with mergeopt's own code, as mixture.json's closing evaluation scores the merge
(``mergeopt.objectives.term_scores.load_dev_sets`` with the recipe's seed and held-out split,
``evaluation_batches`` of ``optim.eval_batch_size``, ``per_set_loss_sums``, ``target_loss`` with the
objective's set weights): the dev loss over every record of every set, and the held-out loss over
the held-out part, mixture.json's ``dev_loss``/``heldout_loss`` and ``uniform_*``.

The float32 checkpoints must reproduce mixture.json's losses (``--tolerance``, 1e-4 by default;
the measured difference is recorded): otherwise the comparison is not of the model fit scored, and
the script exits 1 after writing its results.

Writes ``--out``/export_dtype.{json,md} (default benchmarks/results). The SmolLM2 world's run
(recipes/smollm2.yaml; its three LoRA experts trained alone, see benchmarks/precision.py's
docstring, 33 minutes on 2 CPU cores, then ``mergeopt fit`` with ``rank.grid=null``, 6 minutes)
took 2.3 minutes: four merges of 135M parameters and six evaluations of 144 dev records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.precision import environment as precision_environment  # noqa: E402
from mergeopt.config import load_recipe  # noqa: E402
from mergeopt.export.merge import output_dtype  # noqa: E402
from mergeopt.objectives.chat import with_template  # noqa: E402
from mergeopt.objectives.data import evaluation_batches  # noqa: E402
from mergeopt.objectives.loss import per_set_loss_sums, target_loss  # noqa: E402
from mergeopt.objectives.objective import Objective  # noqa: E402
from mergeopt.objectives.term_scores import load_dev_sets  # noqa: E402
from mergeopt.worlds import resolve_recipe  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("fit", "heldout")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def config_dtype(path: str | Path) -> str | None:
    """The dtype a checkpoint's config.json records (``dtype``, or the older ``torch_dtype``)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    config = read_json(file)
    return config.get("dtype") or config.get("torch_dtype")


def merge(recipe: Path, selection: list[str], dtype: str | None, out: Path) -> dict:
    """``python -m mergeopt merge`` into ``out``; its wall time, warnings and the written dtype."""
    command = [sys.executable, "-m", "mergeopt", "merge", str(recipe), *selection, "--out", str(out)]
    command += ["--overwrite", "--quiet"] + ([] if dtype is None else ["--dtype", dtype])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    manifest = read_json(out / "mergeopt_merge.json")
    warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    return {
        "command": shlex.join(["mergeopt", *command[3:]]),
        "dtype": manifest["dtype"],
        "config_dtype": config_dtype(out),
        "mib": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20,
        "warnings": warnings,
        "seconds": seconds,
    }


@torch.no_grad()
def losses(path: Path, dtype: torch.dtype | None, sets, set_weights, batch_size: int, pad_id: int) -> dict:
    """A written checkpoint loaded as a user loads it (``dtype`` None: as stored), scored as
    mixture.json's closing evaluation scores the merge: dev loss over every record, held-out loss
    over the held-out part, per-set means over every record."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
    sums, counts = {}, {}
    for part in PARTS:
        sums[part] = torch.zeros(len(sets), dtype=torch.float64)
        counts[part] = torch.zeros(len(sets), dtype=torch.float64)
        for batch in evaluation_batches(sets, part, batch_size, pad_id):
            s, c = per_set_loss_sums(model, {}, batch, len(sets))
            sums[part] += s.double()
            counts[part] += c.double()
    del model
    all_means = (sums["fit"] + sums["heldout"]) / (counts["fit"] + counts["heldout"])
    held_means = sums["heldout"] / counts["heldout"]
    ones = torch.ones_like(all_means)
    return {
        "loaded_dtype": loaded,
        "dev": float(target_loss(all_means, ones, set_weights)),
        "heldout": float(target_loss(held_means, ones, set_weights)),
        "per_set": {s.name: float(v) for s, v in zip(sets, all_means)},
        "seconds": time.perf_counter() - start,
    }


def environment(argv: list[str]) -> dict:
    """precision.py's record of the machine and commit, with transformers' version (it loads the
    written checkpoints)."""
    import transformers

    return {**precision_environment(argv), "transformers": transformers.__version__}


def measure(run: Path, work: Path, dtypes: list[str], tolerance: float) -> dict:
    recipe_path, mixture_path = run / "recipe.yaml", run / "mixture.json"
    mixture = read_json(mixture_path)
    recipe = load_recipe(recipe_path, [])
    resolved, _ = resolve_recipe(recipe, lambda _m: None)
    names = resolved.expert_names
    base_dtype = config_dtype(resolved.model.base)
    default = output_dtype(None, {"dtype": base_dtype} if base_dtype else {})

    from transformers import AutoTokenizer

    tokenizer = with_template(AutoTokenizer.from_pretrained(resolved.model.base), resolved.data.chat_template)
    objective = Objective.from_recipe(resolved)
    sets = load_dev_sets(resolved.data, resolved.seed, tokenizer, objective.metric_terms)
    set_weights = objective.reported_set_weights()
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    batch_size = objective.batch_size

    selections = {
        "fitted": ["--mixture", str(mixture_path)],
        "uniform": ["--weights", ",".join(f"{n}=1" for n in names), "--normalize"],
    }
    reported = {
        "fitted": {
            "dev": mixture["dev_loss"],
            "heldout": mixture["heldout_loss"],
            "per_set": mixture["per_set_dev_loss"]["fitted"],
        },
        "uniform": {
            "dev": mixture["uniform_dev_loss"],
            "heldout": mixture["uniform_heldout_loss"],
            "per_set": mixture["per_set_dev_loss"]["uniform"],
        },
    }
    written = [None] + [d for d in dtypes if d != default]  # None: the default --dtype
    checkpoints = []
    for which, selection in selections.items():
        for dtype in written:
            label = f"{which}, {_flag(dtype)}"
            out = work / f"{which}-{dtype or 'default'}"
            print(f"merging {label} ...", flush=True)
            record = {"mixture": which, "label": label, "merge": merge(recipe_path, selection, dtype, out)}
            loadings = {"as stored": None}
            if record["merge"]["dtype"] != "float32":
                loadings["upcast to float32"] = torch.float32
            record["loadings"] = {}
            for loading, as_dtype in loadings.items():
                print(f"  evaluating it {loading} ...", flush=True)
                scored = losses(out, as_dtype, sets, set_weights, batch_size, pad_id)
                scored["minus_mixture_json"] = {
                    "dev": scored["dev"] - reported[which]["dev"],
                    "heldout": scored["heldout"] - reported[which]["heldout"],
                    "per_set": {n: v - reported[which]["per_set"][n] for n, v in scored["per_set"].items()},
                }
                record["loadings"][loading] = scored
            checkpoints.append(record)

    float32 = []  # |float32 checkpoint − mixture.json| of every loss it reports
    for c in checkpoints:
        if c["merge"]["dtype"] == "float32":
            d = c["loadings"]["as stored"]["minus_mixture_json"]
            float32 += [abs(d["dev"]), abs(d["heldout"]), *(abs(v) for v in d["per_set"].values())]
    reproduced = {"max_abs_difference": max(float32) if float32 else None, "tolerance": tolerance}
    reproduced["ok"] = bool(float32) and reproduced["max_abs_difference"] <= tolerance

    gaps = {  # how far the fitted mixture is ahead of the uniform one (uniform − fitted)
        "mixture.json": {p: reported["uniform"][p] - reported["fitted"][p] for p in ("dev", "heldout")}
    }
    for dtype in written:
        pair = {c["mixture"]: c for c in checkpoints if c["label"].endswith(_flag(dtype))}
        for loading in pair["fitted"]["loadings"]:
            key = f"{pair['fitted']['merge']['dtype']} checkpoint, {loading}"
            gaps[key] = {
                p: pair["uniform"]["loadings"][loading][p] - pair["fitted"]["loadings"][loading][p]
                for p in ("dev", "heldout")
            }
    return {
        "run": str(run),
        "recipe": {
            "base": recipe.model.base,
            "experts": dict(recipe.model.experts),
            "dev_sets": [d.name for d in resolved.data.dev],
            "dev_records": {s.name: {p: len(getattr(s, p)) for p in PARTS} for s in sets},
            "heldout_fraction": resolved.data.heldout_fraction,
            "eval_batch_size": batch_size,
        },
        "fit_dtypes": mixture["stack"].get("dtypes"),  # what fit stacked, computed and evaluated in
        "base_config_dtype": base_dtype,
        "expert_config_dtypes": {n: config_dtype(p) for n, p in resolved.model.experts.items()},
        "default_dtype": default,
        "mixture_json": {"weights": mixture["weights"], **reported},
        "checkpoints": checkpoints,
        "fitted_minus_uniform_gap": gaps,
        "float32_reproduces_mixture_json": reproduced,
    }


def _flag(dtype: str | None) -> str:
    return "default --dtype" if dtype is None else f"--dtype {dtype}"


def markdown(report: dict) -> str:
    env, rec, mix = report["environment"], report["recipe"], report["mixture_json"]
    weights = ", ".join(f"{n} {w:.3f}" for n, w in mix["weights"].items())
    repro = report["float32_reproduces_mixture_json"]
    lines = [
        "# Written checkpoint dtype and the losses fit reported",
        "",
        "`mergeopt merge` of a finished fit at its fitted mixture and at the uniform one, written in",
        "the default `--dtype` (the base's `config.json` dtype) and in the other dtypes asked for, each",
        "checkpoint loaded with `AutoModelForCausalLM.from_pretrained` as stored and, if narrower,",
        "upcast to float32, and scored on the recipe's dev sets as mixture.json's closing evaluation",
        "scores the merge (dev loss: every record; held-out loss: the held-out part; target: "
        "`data.target`'s weighting). Produced by `benchmarks/export_dtype.py`.",
        "",
        f"Run: `{report['run']}`, base `{rec['base']}` (config dtype {report['base_config_dtype']}), experts "
        + ", ".join(f"{n} ({report['expert_config_dtypes'][n]})" for n in rec["experts"])
        + "; fit's "
        + ", ".join(f"{k} {v}" for k, v in (report["fit_dtypes"] or {}).items())
        + " (mixture.json's `stack.dtypes`). "
        f"`mergeopt merge`'s default `--dtype` here: **{report['default_dtype']}**. Fitted mixture: {weights}. "
        "Dev records (fit part + held-out part): "
        + ", ".join(f"{n} {c['fit']} + {c['heldout']}" for n, c in rec["dev_records"].items())
        + ".",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
        f"transformers {env['transformers']}, Python {env['python']}; {env['date_utc']} UTC at mergeopt "
        f"commit {env['git_commit']}" + (" (with uncommitted changes)" if env["git_dirty"] else "") + ".",
        "",
    ]
    if report["default_dtype"] == "float32":
        lines += [
            "The default writes float32 here (the base's `config.json` says so): the bfloat16 rows are what",
            "the default writes for a bfloat16 base, and what `--dtype bfloat16` writes for any.",
            "",
        ]
    lines += [
        "| model | loaded as | dev loss | Δ vs mixture.json | held-out loss | Δ vs mixture.json |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for which in ("fitted", "uniform"):
        r = mix[which]
        lines.append(
            f"| {which}, mixture.json (float32 merge) | — | {r['dev']:.5f} | | {r['heldout']:.5f} | |"
        )
        for c in report["checkpoints"]:
            if c["mixture"] != which:
                continue
            for loading, s in c["loadings"].items():
                d = s["minus_mixture_json"]
                lines.append(
                    f"| {c['label']} ({c['merge']['dtype']}, {c['merge']['mib']:.0f} MiB) | {loading} "
                    f"({s['loaded_dtype']}) | {s['dev']:.5f} | {d['dev']:+.5f} | {s['heldout']:.5f} | "
                    f"{d['heldout']:+.5f} |"
                )
    lines += [
        "",
        "How far the fitted mixture is ahead of the uniform one (uniform − fitted):",
        "",
        "| losses of | dev | held-out |",
        "| --- | ---: | ---: |",
    ]
    for key, gap in report["fitted_minus_uniform_gap"].items():
        lines.append(f"| {key} | {gap['dev']:.5f} | {gap['heldout']:.5f} |")
    verdict = "reproduce" if repro["ok"] else "**do not** reproduce"
    lines += [
        "",
        f"The float32 checkpoints {verdict} mixture.json's losses (dev, held-out and per set): largest "
        f"|difference| {repro['max_abs_difference']:.2g}, tolerance {repro['tolerance']:g}.",
        "",
        "Per-set dev losses (every record), Δ vs mixture.json's `per_set_dev_loss`:",
        "",
        "| model | loaded as | " + " | ".join(rec["dev_sets"]) + " |",
        "| --- | --- |" + " ---: |" * len(rec["dev_sets"]),
    ]
    for c in report["checkpoints"]:
        for loading, s in c["loadings"].items():
            cells = [
                f"{s['per_set'][n]:.4f} ({s['minus_mixture_json']['per_set'][n]:+.4f})"
                for n in rec["dev_sets"]
            ]
            lines.append(f"| {c['label']} | {loading} | " + " | ".join(cells) + " |")
    lines += ["", "Merges (wall seconds on a shared machine; not a speed measurement):", ""]
    for c in report["checkpoints"]:
        m = c["merge"]
        warned = "; warned: " + " ".join(m["warnings"]) if m["warnings"] else ""
        lines.append(f"- `{m['command']}`: {m['seconds']:.0f} s{warned}")
    lines += ["", "Command:", "", f"    MERGEOPT_CACHE={env['mergeopt_cache']} {env['command']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "run", type=Path, nargs="?", help="a finished fit's output directory (recipe.yaml, mixture.json)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16"],
        help="dtypes written besides the default --dtype (one equal to the default is not written twice)",
    )
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="float32 checkpoint vs mixture.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", action="store_true", help="write export_dtype.md from export_dtype.json only"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    json_path, md_path = args.out / "export_dtype.json", args.out / "export_dtype.md"
    if args.render:
        md_path.write_text(markdown(read_json(json_path)), encoding="utf-8")
        return 0
    if args.run is None:
        parser.error("RUN (a finished fit's output directory) is needed unless --render")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergeopt-export-dtype-") as tmp:
        report = measure(args.run, args.work or Path(tmp), args.dtypes, args.tolerance)
    report["seconds"] = time.perf_counter() - start
    report["environment"] = environment(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    print(md_path.read_text(encoding="utf-8"))
    return 0 if report["float32_reproduces_mixture_json"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
