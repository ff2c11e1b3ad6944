"""The sharded expert stack (``model.shard: fsdp``) on CPU processes against one process holding it all.

Run (from the repository root, on a quiet machine; about 10 minutes on 2 CPU cores):

    python benchmarks/sharded_stack.py [--steps 3] [--out benchmarks/results/sharded_stack]

Smoke run (a tiny Llama, one timed step, 1 and 2 processes; under a minute, written to a temporary
folder unless ``--out`` says otherwise):

    python benchmarks/sharded_stack.py --quick

``--rewrite`` writes the .md again from the .json (no measurement).

What it measures, on a random ``random://tests/data/configs/llama-100m.json`` Llama (P = 124.7M)
with K = 4 random experts (mergeopt's ``random://`` world), float32 stack and compute, one fit step
of 8 sequences x 128 seeded tokens overall (a ``random://dev`` dev set; each rank scores every N-th
sequence, :func:`mergeopt.objectives.data.rank_batch`):

* 1 process, ``model.shard=none`` (the single-process per-layer fit), with 1 thread (the fair
  per-rank comparison) and with 2 threads (the whole machine);
* 2 and 4 processes started by torchrun (``python -m torch.distributed.run --standalone``),
  ``model.shard=fsdp``, gloo, 1 thread each: every rank keeps a block of rows of every stacked
  matrix (:mod:`mergeopt.merging.sharded_merge`, :mod:`mergeopt.loading.sharded_load`).

Each process (this script with ``--case``) joins the process group, builds the recipe in Python and
loads it through the real path, ``mergeopt.loading.problem.load_problem``, then runs the gradient strategy's
step as ``mergeopt.search.gradient.fit_gradient`` does: ``dev_loss`` on this rank's share of the
batch, ``backward()``, the all-reduce of the loss and of the K-vector gradient, Adam. With
activation checkpointing on (the recipe's ``optim.activation_checkpointing``), then off: one
warm-up step and ``--steps`` timed steps each (a barrier before each step).

* stack bytes: ``stack.nbytes()`` on each rank against the whole stack (the 1-process run's), and
  that share x N (1.0: exactly 1/N).
* memory: peak RSS (VmHWM) net of the RSS after the imports, per rank: right after the load
  (the build's peak), over the timed steps (the peak reset through ``/proc/self/clear_refs`` after
  the warm-up step) and over the whole process; the max over the ranks.
* step time: each rank's median step; the max over the ranks; ratio against the 1-process,
  1-thread run of the same script run under the same checkpointing. CPU time per step
  (``time.process_time``, each rank's median summed over the ranks): the work a step costs, which
  other jobs on the machine inflate far less than they inflate wall time.
* traffic: bytes this rank gathered and reduce-scattered per step
  (``mergeopt.merging.sharded_merge.TRAFFIC``) against the minimum: one merged copy of every stacked
  matrix per module that reads it, in the compute dtype.

The machine's 2 cores are shared by all processes: 4 ranks timeshare them, so the step times show
the cost of the collectives and of timesharing, not the speed-up that N devices would give.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from layer_merge import rss_mib  # this folder is on sys.path when the script runs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "data" / "configs" / "llama-100m.json"
K, BATCH, LENGTH = 4, 8, 128
RUNS = ((1, 1), (1, 2), (2, 1), (4, 1))  # (processes, threads per process); 2 threads in all at most
QUICK_RUNS = ((1, 1), (2, 1))
# --quick: llama-100m's architecture at the sizes of tests/test_random_world.py's tiny Llama
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def recipe_tree(config: Path, shard: str, output_dir: str) -> dict:
    """A random world: base and K experts from ``config``, one seeded dev set of 128-token rows."""
    path = f"random://{config}"
    return {
        "seed": 0,
        "device": "cpu",
        "output_dir": output_dir,
        "model": {
            "base": path,
            "experts": {f"e{i}": path for i in range(K)},
            "shard": shard,
            "compute_dtype": "float32",
        },
        "data": {"dev": [{"name": "dev", "path": "random://dev"}], "max_length": LENGTH, "max_examples": 40},
        "optim": {"batch_size": BATCH, "activation_checkpointing": True},
    }


def minimum_gathered(model: torch.nn.Module) -> dict:
    """minimum: bytes of one merged copy of every stacked matrix per module reading it, in the
    compute dtype; embedding: the part of it read by embedding lookups (their backward needs no
    weight); unmerged: how many unmerged matrices are sharded and gathered as they are read."""
    from torch.nn.utils import parametrize

    from mergeopt.merging.layer_merge import MergedParameter

    out = {"minimum": 0, "embedding": 0, "unmerged": 0}
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            merge = plist[0]
            if not isinstance(merge, MergedParameter):
                out["unmerged"] += 1
                continue
            shape = getattr(merge, "shape", None) or tuple(plist.original.shape)  # sharded: the whole
            if len(shape) >= 2:
                nbytes = math.prod(shape) * merge.compute_dtype.itemsize
                out["minimum"] += nbytes
                out["embedding"] += nbytes if isinstance(module, torch.nn.Embedding) else 0
    return out


def fit_step(problem):
    """One step of ``fit_gradient`` (grad_accum 1) on this rank's share of each batch."""
    from mergeopt.objectives.data import training_batches
    from mergeopt.objectives.loss import dev_loss
    from mergeopt.runtime.distributed import all_reduce_sum

    batches = training_batches(problem.sets, [0], BATCH, problem.pad_id, seed=0)
    z = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([z], lr=0.1)

    def step() -> float:
        adam.zero_grad(set_to_none=True)
        batch = next(batches).to(problem.device)
        loss = dev_loss(problem.model, problem.stack, z, batch, problem.set_weights, problem.loss_chunk)
        loss.backward()
        total = float(all_reduce_sum(loss.detach().clone()))
        all_reduce_sum(z.grad)
        adam.step()
        return total

    return step


def rank_case(args) -> None:
    """One process of a run: load the problem, time its steps, write every rank's numbers (rank 0)."""
    torch.set_num_threads(args.threads)
    import accelerate  # noqa: F401  (imported before the baseline: load_problem's lazy imports)
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401

    from mergeopt.config import recipe_from_dict
    from mergeopt.loading import sharded_load  # noqa: F401
    from mergeopt.loading.problem import load_problem
    from mergeopt.memory import checkpointing  # noqa: F401
    from mergeopt.merging.sharded_merge import TRAFFIC, reset_traffic
    from mergeopt.runtime.distributed import all_gather_objects, process_rank_and_size

    imports = rss_mib("VmRSS")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        dist.init_process_group("gloo")
    with tempfile.TemporaryDirectory() as scratch:
        recipe = recipe_from_dict(recipe_tree(Path(args.config), args.shard, scratch))
        start = time.perf_counter()
        problem = load_problem(recipe, progress=False)
    load_s = time.perf_counter() - start
    minimum = minimum_gathered(problem.model)
    out = {
        "rank": process_rank_and_size()[0],
        "threads": torch.get_num_threads(),
        "rss_after_imports_mib": imports,
        "load_s": load_s,
        "load_peak_mib": rss_mib("VmHWM") - imports,
        "rss_after_load_mib": rss_mib("VmRSS") - imports,
        "stack_bytes": problem.stack.nbytes(),
        "minimum_gathered_bytes": minimum["minimum"],
        "embedding_bytes": minimum["embedding"],
        "unmerged_sharded_matrices": minimum["unmerged"],
        "variants": {},
    }
    step, process_peak = fit_step(problem), 0.0
    for checkpointed in (True, False)[: 1 if args.checkpointed_only else 2]:
        (checkpointing.enable if checkpointed else checkpointing.disable)(problem.model)
        step()  # warm-up
        process_peak = max(process_peak, rss_mib("VmHWM") - imports)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the steps alone
        times, cpu, traffic = [], [], []
        for _ in range(args.steps):
            if size > 1:
                dist.barrier()
            reset_traffic()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = step()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            traffic.append(dict(TRAFFIC))
        step_peak = rss_mib("VmHWM") - imports
        process_peak = max(process_peak, step_peak)
        out["variants"]["checkpointed" if checkpointed else "no checkpointing"] = {
            "times_s": times,
            "median_s": statistics.median(times),
            "cpu_s": cpu,
            "step_peak_mib": step_peak,
            "traffic": traffic,
            "loss": loss,
        }
    out["process_peak_mib"] = process_peak
    ranks = all_gather_objects(out)
    if out["rank"] == 0:
        Path(args.result).write_text(json.dumps(ranks))
    if size > 1:
        dist.destroy_process_group()


def run(processes: int, threads: int, config: Path, steps: int, checkpointed_only: bool) -> list[dict]:
    """Start one run (torchrun for several processes) and return its ranks' numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ranks.json"
        case = [__file__, "--case", "--threads", str(threads), "--config", str(config)]
        case += ["--steps", str(steps), "--result", str(result)]
        case += ["--checkpointed-only"] if checkpointed_only else []
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = str(threads)
        if processes == 1:
            command = [sys.executable, *case, "--shard", "none"]
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command = [*torchrun, f"--nproc_per_node={processes}", *case, "--shard", "fsdp"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, env=env)
        print(
            f"{processes} process(es) x {threads} thread(s): {time.perf_counter() - start:.0f} s", flush=True
        )
        return json.loads(result.read_text())


def summary(ranks: list[dict], processes: int, whole: int, single: dict | None) -> dict:
    """The max over the ranks of each number; ratios against the whole stack and the 1-process run."""
    row = {
        "processes": processes,
        "threads_per_process": ranks[0]["threads"],
        "stack_bytes_per_rank": max(r["stack_bytes"] for r in ranks),
        "whole_stack_bytes": whole,
        "load_s": max(r["load_s"] for r in ranks),
        "load_peak_mib": max(r["load_peak_mib"] for r in ranks),
        "process_peak_mib": max(r["process_peak_mib"] for r in ranks),
        "minimum_gathered_bytes": ranks[0]["minimum_gathered_bytes"],
        "regathered_in_backward": 2 - ranks[0]["embedding_bytes"] / ranks[0]["minimum_gathered_bytes"],
        "unmerged_sharded_matrices": ranks[0]["unmerged_sharded_matrices"],
        "variants": {},
    }
    row["share_of_whole"] = row["stack_bytes_per_rank"] / whole
    row["share_times_n"] = row["share_of_whole"] * processes
    for name in ranks[0]["variants"]:
        per_rank = [r["variants"][name] for r in ranks]
        gathered = max(max(t["gathered"] for t in v["traffic"]) for v in per_rank)
        v = {
            "median_s": max(v["median_s"] for v in per_rank),
            "step_peak_mib": max(v["step_peak_mib"] for v in per_rank),
            "gathered_bytes_per_step": gathered,
            "reduce_scattered_bytes_per_step": max(
                max(t["reduce_scattered"] for t in v["traffic"]) for v in per_rank
            ),
            "gathered_over_minimum": gathered / row["minimum_gathered_bytes"],
            "loss": per_rank[0]["loss"],
            "cpu_s_all_ranks": sum(statistics.median(v["cpu_s"]) for v in per_rank),
            "step_spread": max(max(v["times_s"]) / min(v["times_s"]) for v in per_rank),  # max / min step
        }
        v["time_ratio"] = v["median_s"] / single["variants"][name]["median_s"] if single else 1.0
        row["variants"][name] = v
    return row


def rows_of(measured: dict[tuple[int, int], list[dict]]) -> list[dict]:
    """The table's rows from each run's ranks, keyed by (processes, threads per process)."""
    single = measured[(1, 1)][0]
    return [
        summary(ranks, p, single["stack_bytes"], single if (p, t) != (1, 1) else None)
        for (p, t), ranks in measured.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument(
        "--out", help="results path without suffix (default benchmarks/results/sharded_stack)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, 1 timed step, 1 and 2 processes")
    parser.add_argument(
        "--checkpointed-only", action="store_true", help="skip the steps without checkpointing"
    )
    parser.add_argument(
        "--rewrite", action="store_true", help="rewrite --out's .md (and rows) from its .json"
    )
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(CONFIG), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        rank_case(args)
        return
    if args.rewrite:
        out = Path(args.out or REPO / "benchmarks" / "results" / "sharded_stack")
        result = json.loads(out.with_suffix(".json").read_text())
        result["rows"] = rows_of({tuple(map(int, key.split(" x "))): r for key, r in result["ranks"].items()})
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(report(result))
        print(report(result))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config, runs, steps = CONFIG, RUNS, args.steps
        if args.quick:
            config, runs, steps = Path(tmp) / "config.json", QUICK_RUNS, 1
            config.write_text(json.dumps({**json.loads(CONFIG.read_text()), **TINY}))
            args.out = args.out or str(Path(tmp) / "sharded_stack")
        measured = {(p, t): run(p, t, config, steps, args.checkpointed_only) for p, t in runs}
        name = CONFIG.relative_to(REPO) if not args.quick else "a tiny Llama (--quick)"
        command = "python benchmarks/sharded_stack.py" + (
            f" --steps {steps}" if not args.quick else " --quick"
        )
        command += " --checkpointed-only" if args.checkpointed_only else ""
        result = {
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}",
            "model": f"random://{name}, K = {K}, float32 stack and compute, batch {BATCH} x {LENGTH} "
            f"overall (split over the ranks), {steps} timed steps after one warm-up",
            "command": command,
            "commit": commit(),
            "wall_s": time.perf_counter() - started,
            "rows": rows_of(measured),
            "ranks": {f"{p} x {t}": ranks for (p, t), ranks in measured.items()},
        }
        out = Path(args.out or REPO / "benchmarks" / "results" / "sharded_stack")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(report(result))
        print(report(result))


def commit() -> str:
    """The commit whose mergeopt the run measured, and whether mergeopt/ differed from it."""
    import mergeopt

    source = Path(mergeopt.__file__).resolve().parents[1]
    git = ["git", "-C", str(source)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "mergeopt"], capture_output=True, text=True).stdout
    return (head or "?") + (" (mergeopt/ modified)" if dirty.strip() else "")


def report(result: dict) -> str:
    mib = 2**20
    lines = [
        "# Sharded expert stack (model.shard fsdp) against one process",
        "",
        f"{result['model']}; {result['machine']}; {result['date_utc']} UTC.",
        "",
        f"Produced by `{result['command']}` in {result['wall_s'] / 60:.1f} minutes, mergeopt at commit "
        f"{result['commit']}.",
        "",
        "Memory: peak RSS net of the RSS after the imports, max over the ranks (load: right after "
        "`load_problem`; step: over the timed steps). Time: max over the ranks of each rank's median step, "
        "ratio against 1 process with 1 thread; CPU s: each rank's median CPU time per step, summed over "
        "the ranks. **The machine has 2 cores for all the processes of a run: "
        "2 ranks get one core each, 4 ranks timeshare them**, so the ratios show what the collectives "
        "and the timesharing cost, not the speed-up of N devices (the machine was shared with other work).",
        "",
    ]
    for name in result["rows"][0]["variants"]:
        lines += [
            f"Activation checkpointing {'on' if name == 'checkpointed' else 'off'}:",
            "",
            "| processes | stack MiB per rank | / whole (x N) | peak RSS MiB per rank (load, step) "
            "| step time s | ratio | CPU s per step, all ranks | gathered MiB per step | / minimum |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result["rows"]:
            v = row["variants"][name]
            sharded = row["processes"] > 1
            who = (
                f"{row['processes']} x {row['threads_per_process']} thread"
                + "s" * (row["threads_per_process"] > 1)
                + (", fsdp" if sharded else ", none")
            )
            gathered = (
                f"{v['gathered_bytes_per_step'] / mib:,.1f} | {v['gathered_over_minimum']:.2f}"
                if sharded
                else "0 | -"
            )
            lines.append(
                f"| {who} | {row['stack_bytes_per_rank'] / mib:,.1f} | {row['share_of_whole']:.3f} "
                f"({row['share_times_n']:.3f}) | {row['load_peak_mib']:,.0f}, {v['step_peak_mib']:,.0f} | "
                f"{v['median_s']:.2f} | {v['time_ratio']:.2f} | {v['cpu_s_all_ranks']:.2f} | {gathered} |"
            )
        noisy = [r for r in result["rows"] if r["variants"][name]["step_spread"] > 1.3]
        if noisy:
            lines += [
                "",
                "Noisy timings (the slowest timed step over 1.3 x the fastest; other work shared the cores): "
                + ", ".join(
                    f"{r['processes']} x {r['threads_per_process']} ({r['variants'][name]['step_spread']:.2f} x)"
                    for r in noisy
                )
                + ".",
            ]
        lines.append("")
    return "\n".join(lines + reading(result))


def reading(result: dict) -> list[str]:
    """What the numbers say, in a few sentences written from them."""
    rows = {r["processes"]: r for r in result["rows"] if r["threads_per_process"] == 1}
    single, sharded = rows[1], [r for n, r in sorted(rows.items()) if n > 1]
    name = "checkpointed" if "checkpointed" in single["variants"] else next(iter(single["variants"]))
    steps = ", ".join(
        f"{r['variants'][name]['step_peak_mib']:,.0f} MiB with {r['processes']}" for r in sharded
    )
    times = ", ".join(
        f"{r['variants'][name]['median_s']:.2f} s ({r['variants'][name]['time_ratio']:.2f}x) with {r['processes']}"
        for r in sharded
    )
    cpus = " / ".join(f"{r['variants'][name]['cpu_s_all_ranks']:.1f}" for r in [single, *sharded])
    gathers = {
        v: "/".join(f"{r['variants'][v]['gathered_over_minimum']:.2f}" for r in sharded)
        for v in single["variants"]
    }
    gathered = " and ".join(f"{g} ({v})" for v, g in gathers.items())
    ratios = {f"{v['gathered_over_minimum']:.2f}" for r in sharded for v in r["variants"].values()}
    if len(ratios) == 1:
        gathered = f"{sharded[0]['variants'][name]['gathered_over_minimum']:.2f}, checkpointed or not,"
    full = sharded[0]["regathered_in_backward"]
    kept = any(
        r["variants"][v]["gathered_over_minimum"] < full - 0.01 for r in sharded for v in r["variants"]
    )
    losses = [r["variants"][name]["loss"] for r in result["rows"]]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    return [
        "## Reading",
        "",
        f"Each rank holds 1/N of the stack up to {max(r['share_times_n'] for r in sharded) - 1:.2%} "
        "(the vectors, norm weights, every rank keeps whole), so the stack's bytes per rank fall as N grows. "
        f"The peak RSS of a checkpointed step goes from {single['variants'][name]['step_peak_mib']:,.0f} MiB "
        f"in one process to {steps} processes (per rank): besides its block of the stack a rank holds its "
        "share of the activations, the merged weight of the layer that runs (gathered whole) and the "
        "process's own buffers, which do not shrink with N. "
        f"A step gathers {gathered} times the minimum "
        f"(one merged copy of each matrix per use, with {'/'.join(str(r['processes']) for r in sharded)} "
        f"processes); {full:.2f} is every matrix gathered for the forward and again for the backward, which "
        "forms it again rather than keep it (the embedding's backward needs no weight)"
        + (", so below it merged weights were kept from the forward to the backward. " if kept else ". ")
        + f"With 1 thread per rank a checkpointed step takes {single['variants'][name]['median_s']:.2f} s in one "
        f"process and {times} processes, and {cpus} CPU seconds in all; on these 2 shared cores that is "
        "the cost of the collectives and of the timesharing, not a measure of what N devices would gain. "
        f"The step losses of all runs agree to {spread:.1e} (relative): the sharded ranks compute the "
        "single process's fit.",
        "",
    ]


if __name__ == "__main__":
    main()
