"""The per-layer merge's cost: a fit step against a plain training step of the same model, and the peer.

Run (from the repository root, on a quiet machine; about 10 minutes on 2 CPU cores):

    python benchmarks/layer_merge.py [--repeats 5] [--out benchmarks/results/layer_merge]

``--config`` measures another architecture's random model the same way (its config.json), without
the 8B plans and the peer: ``--config tests/data/configs/mixtral-140m.json --out
benchmarks/results/layer_merge_moe`` for a mixture of experts (fused expert weights, grouped_mm).

What it measures, on a random ``random://tests/data/configs/llama-100m.json`` Llama (P = 124.7M,
untied embeddings) with K = 4 random experts (mergeopt's ``random://`` world: base plus low-rank
plus noise task vectors at 1e-3 of each weight's norm), float32, one batch of 8 x 128 seeded random
tokens (every token after the first scored):

* plain step: every parameter requires grad; forward, mean token cross-entropy, ``backward()``.
* fit step: the mixture logits' step as ``mergeopt.search.gradient`` runs it: ``dev_loss`` through
  the per-layer merge (w handed to the mixture buffers by functional_call, each layer merged as it
  runs and again in the backward, the chunked loss), ``backward()``.
Both without and with activation checkpointing per decoder layer (the plain step checkpoints the
same layers with the same torch function).

Time: one process holds the plain model and the fit problem, runs warm-up steps, then
``--repeats`` timed steps of each variant interleaved (the order alternates); medians, and
time ratio = median(fit) / median(plain) under the same checkpointing. Target ≤ 1.15.

Memory: each case runs in a fresh subprocess (this script with ``--case``), which reads its RSS
after the imports, builds what it needs (plain: the model; fit: the base and the stack), runs one
warm-up step, resets the peak (``/proc/self/clear_refs``), runs two steps and reads the peak RSS
(VmHWM). The step peak net of the imports is what a step holds (model or stack, activations,
gradients). memory ratio = peak(fit) / (stack bytes + peak(plain)), under the same checkpointing;
target ≤ 1.10. The process peak including the build is reported too.

The peer: FusionBench's ``TaskWiseMergedModel`` (fusion-bench, which also fits merge coefficients
through functional_call) on the same model shape and batch, measured by
``benchmarks/peer_fusionbench.py`` in its own virtual environment (``--peer-python``; it never
enters mergeopt's dependencies), in the same run. Planned peaks for Llama-3.1-8B shapes come from
the dry-run planner (``mergeopt.memory.plan``), next to the 204 GiB the planner gave before this design.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "tests" / "data" / "configs" / "llama-100m.json"
CONFIG = DEFAULT_CONFIG  # --config replaces it (in this process and the cases it spawns)
CONFIG_8B = REPO / "tests" / "data" / "configs" / "llama-3.1-8b.json"
PREVIOUS_8B_PEAK_GIB = 204  # the planner's peak for recipes/8b.yaml before the per-layer merge
K, BATCH, LENGTH = 4, 8, 128


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def batch():
    from mergeopt.objectives.data import Example, collate

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (BATCH, LENGTH), generator=gen)
    scored = torch.ones(LENGTH, dtype=torch.bool)
    scored[0] = False
    return collate([(0, Example(row, scored.clone())) for row in ids], pad_id=0)


def build_plain(checkpointed: bool):
    from mergeopt.memory import checkpointing
    from mergeopt.worlds import random_world

    model = random_world.build_base(random_world.read_config(f"random://{CONFIG}"), "cpu", torch.float32, 0)
    for p in model.parameters():
        p.requires_grad_(True)
    if checkpointed:
        checkpointing.enable(model)
    data = batch()

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), data.input_ids[:, 1:].reshape(-1)
        )
        loss.backward()

    return step, 0


def build_fit(checkpointed: bool):
    from mergeopt.memory import checkpointing
    from mergeopt.merging.stacking import build_stack
    from mergeopt.objectives.loss import dev_loss
    from mergeopt.worlds import random_world

    config = random_world.read_config(f"random://{CONFIG}")
    model = random_world.build_base(config, "cpu", torch.float32, 0)
    experts = random_world.random_experts(model, config, [f"e{i}" for i in range(K)], 0, "cpu")
    stack = build_stack(model, experts, progress=False)
    if checkpointed:
        checkpointing.enable(model)
    data = batch()
    z = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([z], lr=0.1)

    def step():
        adam.zero_grad(set_to_none=True)
        dev_loss(model, stack, z, data, torch.ones(1), 1024).backward()
        adam.step()

    return step, stack.nbytes()


BUILDERS = {"plain": build_plain, "fit": build_fit}


def memory_case(case: str, checkpointed: bool) -> dict:
    """Run in a fresh process: the peak RSS of two steps, net of the imports."""
    torch.set_num_threads(2)
    base = rss_mib("VmRSS")
    step, stack_bytes = BUILDERS[case](checkpointed)
    built = rss_mib("VmRSS")
    step()
    process_peak = rss_mib("VmHWM") - base  # the build and a first step
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the steps alone
    for _ in range(2):
        step()
    return {
        "rss_after_imports_mib": base,
        "rss_after_build_mib": built,
        "step_peak_mib": rss_mib("VmHWM") - base,
        "process_peak_mib": max(process_peak, rss_mib("VmHWM") - base),
        "stack_mib": stack_bytes / 2**20,
    }


def spawn(case: str, checkpointed: bool) -> dict:
    args = [sys.executable, __file__, "--case", case, "--config", str(CONFIG)]
    args += ["--checkpointing"] if checkpointed else []
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timings(repeats: int, checkpointed: bool) -> dict:
    torch.set_num_threads(2)
    steps = {case: BUILDERS[case](checkpointed)[0] for case in ("plain", "fit")}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {"plain": [], "fit": []}
    for r in range(repeats):
        for case in ("plain", "fit") if r % 2 == 0 else ("fit", "plain"):
            start = time.perf_counter()
            steps[case]()
            times[case].append(time.perf_counter() - start)
    return {case: {"median_s": statistics.median(t), "times_s": t} for case, t in times.items()}


def planned_peaks() -> list[dict]:
    from mergeopt.config import load_recipe
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    rows = []
    card = DeviceMemory("cuda:0", "one 80 GB GPU", 80 * 2**30, 80 * 2**30)
    for k in (4, 8):
        for dtype in ("bfloat16", "int8"):
            path = f"random://{CONFIG_8B}"
            experts = "{" + ", ".join(f"e{i}: '{path}'" for i in range(k)) + "}"
            r = load_recipe(
                REPO / "recipes" / "8b.yaml",
                [f"model.base={path}", f"model.experts={experts}", f"model.stack_dtype={dtype}"],
            )
            inventory, dims = dry_run.read_inventory(r)
            p = plan.plan_memory(r, inventory, dims, card)
            rows.append({"experts": k, "stack_dtype": dtype, "peak_gib": p.peak / 2**30})
    return rows


def peer(python: str) -> dict | None:
    if not Path(python).exists():
        return None
    out = REPO / "benchmarks" / "results" / "peer_fusionbench.json"
    subprocess.run([python, "benchmarks/peer_fusionbench.py", "--out", str(out)], check=True, cwd=REPO)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layer_merge"))
    parser.add_argument("--peer-python", default="/work/fb-venv/bin/python")
    parser.add_argument("--case", choices=list(BUILDERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the random model's config.json")
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="recompute the planned 8B peaks (arithmetic) into the stored results; measure nothing",
    )
    args = parser.parse_args()
    global CONFIG
    CONFIG = Path(args.config).resolve()
    default = CONFIG == DEFAULT_CONFIG
    if args.case:
        print(json.dumps(memory_case(args.case, args.checkpointing)))
        return
    if args.plan_only:
        out = Path(args.out)
        result = json.loads(out.with_suffix(".json").read_text())
        result["planned_8b"] = planned_peaks()
        result["planned_at"] = _planned_at()
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(report(result))
        print(report(result))
        return
    result = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": f"random://{CONFIG.relative_to(REPO)}, K = {K}, float32, batch {BATCH} x {LENGTH}",
        "variants": {},
    }
    for checkpointed in (False, True):
        name = "checkpointed" if checkpointed else "no checkpointing"
        memory = {case: spawn(case, checkpointed) for case in ("plain", "fit")}
        time_ = timings(args.repeats, checkpointed)
        plain, fit = memory["plain"], memory["fit"]
        result["variants"][name] = {
            "memory": memory,
            "memory_ratio": fit["step_peak_mib"] / (fit["stack_mib"] + plain["step_peak_mib"]),
            "time": time_,
            "time_ratio": time_["fit"]["median_s"] / time_["plain"]["median_s"],
        }
    result["planned_8b"] = planned_peaks() if default else None
    result["planned_at"] = _planned_at()
    result["peer"] = peer(args.peer_python) if default else None
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(result))
    print(report(result))


def _planned_at() -> str:
    """When and at which commit the planned peaks were computed (they follow the planner's code)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return f"{date} UTC, commit {commit.stdout.strip() or '?'}"


def report(result: dict) -> str:
    lines = [
        "# Per-layer merge: a fit step against a plain training step",
        "",
        f"{result['model']}; {result['machine']}; {result['date_utc']} UTC. Produced by `benchmarks/layer_merge.py`.",
        "",
        "| checkpointing | plain step s | fit step s | time ratio (≤ 1.15) | plain peak MiB | stack MiB | fit peak MiB | memory ratio (≤ 1.10) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in result["variants"].items():
        m, t = v["memory"], v["time"]
        lines.append(
            f"| {name} | {t['plain']['median_s']:.2f} | {t['fit']['median_s']:.2f} | {v['time_ratio']:.3f} | "
            f"{m['plain']['step_peak_mib']:,.0f} | {m['fit']['stack_mib']:,.0f} | {m['fit']['step_peak_mib']:,.0f} | "
            f"{v['memory_ratio']:.3f} |"
        )
    if result.get("planned_8b"):
        lines += [
            "",
            "Planned peaks for Llama-3.1-8B shapes on one GPU (recipes/8b.yaml), before: "
            f"{PREVIOUS_8B_PEAK_GIB} GiB for four bfloat16 experts"
            + (f" (planned {result['planned_at']})." if result.get("planned_at") else "."),
            "",
            "| experts | stack dtype | planned peak GiB |",
            "| ---: | --- | ---: |",
        ]
        lines += [
            f"| {r['experts']} | {r['stack_dtype']} | {r['peak_gib']:.1f} |" for r in result["planned_8b"]
        ]
    p = result.get("peer")
    if p:
        plain, fb = p["plain"], p["fusionbench"]
        ours = result["variants"]["no checkpointing"]
        lines += [
            "",
            f"The peer in the same run (fusion-bench {p['fusion_bench_version']}, its own venv; whole process peak net of imports):",
            "",
            "| approach | step time / plain step | peak MiB (process, net of imports) |",
            "| --- | ---: | ---: |",
            f"| FusionBench TaskWiseMergedModel | {p['time_ratio']:.3f} | {fb['peak_mib']:,.0f} |",
            f"| mergeopt per-layer merge | {ours['time_ratio']:.3f} | "
            f"{ours['memory']['fit']['process_peak_mib']:,.0f} |",
            f"| plain training step (FusionBench's script) | 1.000 | {plain['peak_mib']:,.0f} |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
