"""Peer measurement: one training step of FusionBench's ``TaskWiseMergedModel`` vs. a plain step.

Run it (from the repository root) with the separate FusionBench venv, never mergeopt's own:

    /work/fb-venv/bin/python benchmarks/peer_fusionbench.py --out benchmarks/results/peer_fusionbench.json

That venv is not part of mergeopt and none of this enters mergeopt's dependencies. It was made
with exactly these commands (CPU-only: torch goes in first, from the machine's local CPU build,
so fusion-bench's ``lightning``/``torchmetrics``/``peft`` deps find it satisfied and pull no CUDA
torch; every other fusion-bench dependency installs as is, no ``--no-deps`` was needed):

    python3 -m venv /work/fb-venv
    /work/fb-venv/bin/pip install torch==2.13.0              # -> torch 2.13.0+cpu
    /work/fb-venv/bin/pip install fusion-bench==0.2.33 transformers==5.24.0

(``pip index versions fusion-bench`` listed 0.2.33 as the newest; it requires ``transformers``
with no upper bound, so the 5.x of mergeopt's dev venv, 5.24.0, is used. The venv is ~1.8 GB.)

What is measured, on a random-init ``LlamaForCausalLM`` (hidden 768, intermediate 2048, 12
layers, 12 heads, 4 kv heads, vocab 32000, untied embeddings; P = 124,668,672 parameters),
float32, on CPU with ``torch.set_num_threads(2)``, one batch of 8 x 128 seeded random tokens,
loss = mean token cross-entropy of the shifted tokens (every token after the first scored):

* plain step: every parameter requires grad; ``zero_grad(set_to_none=True)``, forward
  (``use_cache=False``), loss, ``backward()``.
* fusionbench step: K = 4 experts, each a deep copy of the base with every floating parameter
  perturbed by N(0, 1) * 1e-3 * ||W||_F / sqrt(numel(W)) (generator seeded per expert), wrapped
  the way FusionBench's own task-wise AdaMerging builds it
  (``fusion_bench/method/adamerging/task_wise_adamerging.py``)::

      TaskWiseMergedModel(task_wise_weight=get_task_wise_weights(4, 0.3),
                          pretrained_model=base, finetuned_models=experts,
                          clamp_weights=False, tie_weights=True, strict=False)

  (init value and flags from its shipped config ``fusion_bench_config/method/adamerging/clip.yaml``).
  One step follows its ``test_time_adaptation`` loop: ``merge_weight.grad = None``,
  ``merge_weights()`` (which the loop calls after every optimizer step, building the merged
  state dict theta0 + sum_k w_k tau_k with autograd), forward through ``functional_call``, loss,
  ``backward()`` (the gradient reaches only ``merge_weight``). No optimizer step in either case.

Time: one process holds both (a separate plain copy of the base and the wrapper), runs
``--warmup`` steps of each, then ``--repeats`` timed steps of each interleaved, the order
alternating every repeat; medians, and time_ratio = median(fusionbench) / median(plain).

Peak memory: each case in its own fresh subprocess (this script re-run with ``--case plain`` or
``--case fusionbench``) that records the RSS right after the imports, builds what the case needs
(plain: the base only; fusionbench: base + 4 experts + wrapper), runs ``--mem-steps`` steps and
reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (= VmHWM). peak_mib = peak RSS - RSS after
imports, so it includes everything the approach holds (base, task vectors, grads, activations).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from fusion_bench.models.wrappers.task_wise_fusion import (
    TaskWiseMergedModel,
    get_task_wise_weights,
)
from transformers import LlamaConfig, LlamaForCausalLM

NUM_EXPERTS = 4
BATCH_SIZE = 8
SEQ_LEN = 128
NOISE_SCALE = 1e-3
INIT_WEIGHT = 0.3  # init_values of fusion_bench_config/method/adamerging/clip.yaml
WRAPPER_KWARGS = dict(clamp_weights=False, tie_weights=True, strict=False)  # same config
NUM_THREADS = 2

CONFIG = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

INSTALL_COMMANDS = [
    "python3 -m venv /work/fb-venv",
    "/work/fb-venv/bin/pip install torch==2.13.0",
    "/work/fb-venv/bin/pip install fusion-bench==0.2.33 transformers==5.24.0",
]
RUN_COMMAND = (
    "/work/fb-venv/bin/python benchmarks/peer_fusionbench.py --out benchmarks/results/peer_fusionbench.json"
)

MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------- memory readings
def vm_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found")


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------- model, experts, batch
def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    return model.float().train()


def make_expert(base: torch.nn.Module, k: int) -> torch.nn.Module:
    expert = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1000 + k)
    with torch.no_grad():
        for _, p in expert.named_parameters():
            if not p.is_floating_point():
                continue
            scale = NOISE_SCALE * p.norm().item() / (p.numel() ** 0.5)
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return expert


def build_fusionbench() -> TaskWiseMergedModel:
    base = build_base()  # every parameter requires grad here, as the constructor expects
    experts = [make_expert(base, k) for k in range(NUM_EXPERTS)]
    wrapper = TaskWiseMergedModel(
        task_wise_weight=get_task_wise_weights(NUM_EXPERTS, INIT_WEIGHT),
        pretrained_model=base,
        finetuned_models=experts,
        **WRAPPER_KWARGS,
    )
    wrapper.train()
    return wrapper


def make_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, CONFIG["vocab_size"], (BATCH_SIZE, SEQ_LEN), generator=gen)


def token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), input_ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------- the two steps
def plain_step(model: LlamaForCausalLM, ids: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = token_ce(logits, ids)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {
        "step_s": t2 - t0,
        "merge_s": 0.0,
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "loss": loss.item(),
    }


def fusionbench_step(wrapper: TaskWiseMergedModel, ids: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    wrapper.merge_weight.grad = None
    wrapper.merge_weights()
    t1 = time.perf_counter()
    logits = wrapper(input_ids=ids, use_cache=False).logits
    loss = token_ce(logits, ids)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    return {
        "step_s": t3 - t0,
        "merge_s": t1 - t0,
        "forward_s": t2 - t1,
        "backward_s": t3 - t2,
        "loss": loss.item(),
    }


def check_fusionbench_grad(wrapper: TaskWiseMergedModel) -> list[float]:
    g = wrapper.merge_weight.grad
    assert g is not None and g.shape == (NUM_EXPERTS,), "no gradient on merge_weight"
    assert torch.isfinite(g).all() and (g != 0).all(), f"bad merge_weight grad {g}"
    assert all(not p.requires_grad for p in wrapper.pretrained_model.parameters())
    assert all(not p.requires_grad for p in wrapper.task_vectors.parameters())
    return g.tolist()


# ---------------------------------------------------------------- memory subprocess
def run_memory_case(case: str, steps: int) -> dict:
    rss_after_imports = vm_rss_mib()
    ids = make_batch()
    if case == "plain":
        model = build_base()
        step = plain_step
    else:
        model = build_fusionbench()
        step = fusionbench_step
    rss_after_build = vm_rss_mib()
    for _ in range(steps):
        step(model, ids)
    peak_rss = max_rss_mib()
    return {
        "case": case,
        "steps": steps,
        "rss_after_imports_mib": rss_after_imports,
        "rss_after_build_mib": rss_after_build,
        "peak_rss_mib": peak_rss,
        "peak_mib": peak_rss - rss_after_imports,
    }


def spawn_memory_case(case: str, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--mem-steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT ") :])
    raise RuntimeError(f"no result from {cmd}:\n{out.stdout}\n{out.stderr}")


# ---------------------------------------------------------------- main
def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/peer_fusionbench.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--case", choices=["plain", "fusionbench"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(NUM_THREADS)

    if args.case is not None:  # memory subprocess
        print("MEMRESULT " + json.dumps(run_memory_case(args.case, args.mem_steps)), flush=True)
        return

    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)

    # memory first, each case in a fresh process, one at a time
    mem = {case: spawn_memory_case(case, args.mem_steps) for case in ("plain", "fusionbench")}
    print(
        f"memory: plain {mem['plain']['peak_mib']:.1f} MiB, "
        f"fusionbench {mem['fusionbench']['peak_mib']:.1f} MiB",
        flush=True,
    )

    # time: both in this process, interleaved
    ids = make_batch()
    plain = build_base()
    n_params = sum(p.numel() for p in plain.parameters())
    wrapper = build_fusionbench()
    cases = {"plain": (plain_step, plain), "fusionbench": (fusionbench_step, wrapper)}
    for _ in range(args.warmup):
        for fn, m in cases.values():
            fn(m, ids)
    grad = check_fusionbench_grad(wrapper)
    rows: dict[str, list[dict]] = {"plain": [], "fusionbench": []}
    for r in range(args.repeats):
        order = ["plain", "fusionbench"] if r % 2 == 0 else ["fusionbench", "plain"]
        for name in order:
            fn, m = cases[name]
            rows[name].append(fn(m, ids))
        print(
            f"repeat {r + 1}/{args.repeats}: plain {rows['plain'][-1]['step_s']:.3f} s, "
            f"fusionbench {rows['fusionbench'][-1]['step_s']:.3f} s",
            flush=True,
        )
    check_fusionbench_grad(wrapper)
    load_end = os.getloadavg()

    def summary(name: str) -> dict:
        rs = rows[name]
        return {
            "step_median_s": median_of(rs, "step_s"),
            "step_times_s": [r["step_s"] for r in rs],
            "repeats": [{k: v for k, v in r.items() if k != "loss"} for r in rs],
            "merge_median_s": median_of(rs, "merge_s"),
            "forward_median_s": median_of(rs, "forward_s"),
            "backward_median_s": median_of(rs, "backward_s"),
            "loss": rs[-1]["loss"],
            **{k: v for k, v in mem[name].items() if k != "case"},
        }

    result = {
        "fusion_bench_version": importlib.metadata.version("fusion-bench"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": started.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": list(load_start),
        "loadavg_end": list(load_end),
        "config": {**CONFIG, "num_params": n_params, "dtype": "float32", "device": "cpu"},
        "batch": {
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "tokens": "seeded random ids",
            "loss": "mean token cross-entropy, shifted",
        },
        "experts": {
            "K": NUM_EXPERTS,
            "perturbation": "N(0,1) * 1e-3 * ||W||_F / sqrt(numel), per-expert seed",
        },
        "timing": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "order": "interleaved, alternating each repeat, one process",
        },
        "memory_method": "fresh subprocess per case; peak_mib = ru_maxrss at end - VmRSS after imports",
        "fusionbench_api": {
            "class": "fusion_bench.models.wrappers.task_wise_fusion.TaskWiseMergedModel",
            "constructor": "TaskWiseMergedModel(task_wise_weight=get_task_wise_weights(4, 0.3), "
            "pretrained_model=base, finetuned_models=experts, "
            "clamp_weights=False, tie_weights=True, strict=False)",
            "step": "merge_weight.grad=None; merge_weights(); wrapper(input_ids=..., "
            "use_cache=False).logits; loss.backward()",
            "merge_weight_grad_after_warmup": grad,
        },
        "plain": summary("plain"),
        "fusionbench": summary("fusionbench"),
        "commands": {"install": INSTALL_COMMANDS, "run": RUN_COMMAND},
    }
    result["time_ratio"] = result["fusionbench"]["step_median_s"] / result["plain"]["step_median_s"]
    result["peak_ratio"] = result["fusionbench"]["peak_mib"] / result["plain"]["peak_mib"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    p, f = result["plain"], result["fusionbench"]
    print()
    print(
        f"FusionBench {result['fusion_bench_version']} peer step, P = {n_params:,}, K = "
        f"{NUM_EXPERTS}, batch {BATCH_SIZE}x{SEQ_LEN}, float32, CPU, {NUM_THREADS} threads"
    )
    print()
    print("| case | step median (s) | merge (s) | forward (s) | backward (s) | ratio | peak (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| plain | {p['step_median_s']:.3f} | - | {p['forward_median_s']:.3f} | "
        f"{p['backward_median_s']:.3f} | 1.00 | {p['peak_mib']:,.0f} |"
    )
    print(
        f"| fusionbench TaskWiseMergedModel | {f['step_median_s']:.3f} | "
        f"{f['merge_median_s']:.3f} | {f['forward_median_s']:.3f} | "
        f"{f['backward_median_s']:.3f} | {result['time_ratio']:.2f} | {f['peak_mib']:,.0f} |"
    )
    print()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
