"""Step overhead of mergeopt: one Adam step on the mixture logits vs. a plain forward+backward.

What it measures, for K = 4 experts at each model size (random-init ``LlamaForCausalLM``, float32,
vocab 8192; the exact parameter count P of each size is printed) on one batch of 8 x 128 random
tokens:

* "plain step": ``model.zero_grad(set_to_none=True)``, ``model(input_ids=..., use_cache=False).logits``,
  mean token cross-entropy on the shifted tokens, ``backward()``; every parameter requires grad.
* "mergeopt step": the model frozen, experts = θ0 + small seeded noise, the stack from
  ``mergeopt.stack.build_stack``, float64 logits z with ``torch.optim.Adam([z])``; one step is
  ``zero_grad``, ``mergeopt.objectives.dev_loss`` on a batch from ``mergeopt.data.collate`` (every
  token after the first scored, one dev set, set weights ``torch.ones(1)``) merging into
  ``stack.allocate_buffers()`` as the fitting loop does, ``backward()``, ``optimizer.step()``.

Time: 2 warm-up steps of each, then ``--repeats`` timed steps of each, interleaved in one process
(the order alternates every repeat); the report gives the median of each and
ratio = median(mergeopt) / median(plain). Target: ratio <= 1.05.

Peak memory: each variant runs in its own subprocess (this script re-invoked with the hidden
``--measure-memory`` flag) that builds the model (and, for mergeopt, the stack) and runs 3 steps.
On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the process peak RSS (VmHWM),
reported raw and net of the VmRSS baseline read right after the imports (torch, transformers,
mergeopt). Target: peak(mergeopt) <= 1.1 x (peak(plain) + K·P·4 bytes), checked on the net numbers.

The experts are state dicts whose tensors are made on demand (θ0 + seeded noise, bit-identical at
every read), the way ``build_stack`` reads a safetensors checkpoint tensor by tensor: K fully
materialised expert dicts would add K·P·4 bytes that a real run never holds.

Run (from the repository root; the 100M size takes several minutes on a small CPU):

    python benchmarks/step_overhead.py [--sizes 10M,100M] [--repeats 5] [--out benchmarks/results/step_overhead.md]
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from mergeopt.data import Batch, Example, collate
from mergeopt.objectives import dev_loss
from mergeopt.stack import TaskVectorStack, build_stack

NUM_EXPERTS = 4
BATCH_SIZE = 8
SEQ_LEN = 128
VOCAB_SIZE = 8192
NOISE_SCALE = 1e-3
SEED = 0
WARMUP = 2
MEMORY_STEPS = 3
TIME_TARGET = 1.05
MEMORY_FACTOR = 1.1

SIZES: dict[str, dict[str, int]] = {
    "10M": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "100M": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
    },
}


# ----------------------------------------------------------------------------------------- setup


def read_status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(size: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2 * SEQ_LEN,
        tie_word_embeddings=False,
        **SIZES[size],
    )


def make_model(size: str, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(make_config(size)).to(device=device, dtype=torch.float32)
    model.eval()  # no dropout in Llama anyway; both variants run the same mode
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class NoisyExpert(Mapping[str, torch.Tensor]):
    """A state dict θ0 + σ·ε whose tensors are made on demand; ε is seeded per (expert, tensor)."""

    def __init__(self, base: Mapping[str, torch.Tensor], expert_index: int, scale: float = NOISE_SCALE):
        self._base = base
        self._index = {name: i for i, name in enumerate(base)}
        self._expert = expert_index
        self._scale = scale

    def __getitem__(self, name: str) -> torch.Tensor:
        base = self._base[name]
        generator = torch.Generator(device=base.device)
        generator.manual_seed(SEED + 1_000_003 * (self._expert + 1) + self._index[name])
        noise = torch.randn(base.shape, generator=generator, device=base.device, dtype=base.dtype)
        return noise.mul_(self._scale).add_(base.detach())

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def make_stack(model: torch.nn.Module) -> TaskVectorStack:
    base = model.state_dict()
    experts = {f"expert{i}": NoisyExpert(base, i) for i in range(NUM_EXPERTS)}
    return build_stack(model, experts, progress=False)


def make_tokens(device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=generator).to(device)


def make_batch(tokens: torch.Tensor, device: torch.device) -> Batch:
    scored = torch.ones(SEQ_LEN, dtype=torch.bool)
    scored[0] = False
    items = [(0, Example(input_ids=row.cpu(), scored=scored.clone())) for row in tokens]
    return collate(items, pad_id=0).to(device)


# ----------------------------------------------------------------------------------------- steps


def set_trainable(model: torch.nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)
        if not flag:
            p.grad = None


def plain_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))
    loss.backward()


class MergeoptStepper:
    def __init__(self, model: torch.nn.Module, stack: TaskVectorStack, batch: Batch, device: torch.device):
        self.model, self.stack, self.batch = model, stack, batch
        self.z = torch.zeros(stack.num_experts, dtype=torch.float64, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=0.05)
        self.set_weights = torch.ones(1, device=device)
        self.buffers = stack.allocate_buffers()  # as mergeopt.search.gradient does: one merged copy, reused

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = dev_loss(
            self.model, self.stack, self.z, 1.0, self.batch, self.set_weights, buffers=self.buffers
        )
        loss.backward()
        self.optimizer.step()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- timing


def measure_time(size: str, repeats: int, device: torch.device) -> dict:
    model = make_model(size, device)
    params = num_parameters(model)
    tokens = make_tokens(device)
    batch = make_batch(tokens, device)
    stack = make_stack(model)  # freezes the model
    step_mergeopt = MergeoptStepper(model, stack, batch, device)

    def run_plain() -> None:
        plain_step(model, tokens)

    times: dict[str, list[float]] = {"plain": [], "mergeopt": []}
    for r in range(WARMUP + repeats):
        order = ["plain", "mergeopt"] if r % 2 == 0 else ["mergeopt", "plain"]
        for variant in order:
            if variant == "plain":
                set_trainable(model, True)
                elapsed = timed(run_plain, device)
                set_trainable(model, False)  # frozen again, grads dropped (outside the timed region)
            else:
                elapsed = timed(step_mergeopt, device)
            if r >= WARMUP:
                times[variant].append(elapsed)
            print(
                f"  [{size}] {'warm-up' if r < WARMUP else 'repeat'} {r}: {variant} {elapsed:.4f} s",
                flush=True,
            )
    result = {
        "params": params,
        "stacked_params": stack.num_stacked_parameters(),
        "stack_bytes": stack.nbytes(),
        "times": times,
        "median_plain": statistics.median(times["plain"]),
        "median_mergeopt": statistics.median(times["mergeopt"]),
    }
    result["ratio"] = result["median_mergeopt"] / result["median_plain"]
    return result


# ---------------------------------------------------------------------------------------- memory


def measure_memory_here(variant: str, size: str, baseline_rss: int) -> dict:
    """Build the model (and the stack), run MEMORY_STEPS steps, report the peak (this process only)."""
    device = pick_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device)
    model = make_model(size, device)
    tokens = make_tokens(device)
    if variant == "plain":
        for _ in range(MEMORY_STEPS):
            plain_step(model, tokens)
    else:
        stepper = MergeoptStepper(model, make_stack(model), make_batch(tokens, device), device)
        for _ in range(MEMORY_STEPS):
            stepper()
    sync(device)
    out = {
        "variant": variant,
        "size": size,
        "device": str(device),
        "rss_baseline": baseline_rss,
        "rss_peak_raw": read_status_kib("VmHWM"),
    }
    out["rss_peak_net"] = out["rss_peak_raw"] - baseline_rss
    if cuda:
        out["cuda_baseline"] = cuda_baseline
        out["cuda_peak_raw"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_net"] = out["cuda_peak_raw"] - cuda_baseline
    # what the target check uses: CUDA allocator peak on GPU, net peak RSS on CPU
    out["peak_raw"] = out["cuda_peak_raw"] if cuda else out["rss_peak_raw"]
    out["peak_net"] = out["cuda_peak_net"] if cuda else out["rss_peak_net"]
    return out


def measure_memory(variant: str, size: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", variant, "--size", size]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess {variant}/{size} failed:\n{proc.stderr}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


# ---------------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def build_report(
    results: dict[str, dict], repeats: int, device: torch.device, started: str, load: tuple[str, str]
) -> tuple[str, str]:
    cuda = device.type == "cuda"
    mem_kind = (
        "CUDA max_memory_allocated" if cuda else "peak RSS (VmHWM) net of the post-import VmRSS baseline"
    )
    lines = [
        f"| size | P | plain median (s) | mergeopt median (s) | ratio | ratio ≤ {TIME_TARGET} "
        f"| plain peak (MiB) | mergeopt peak (MiB) | K·P·4 (MiB) | bound {MEMORY_FACTOR}×(plain+K·P·4) (MiB) "
        "| mergeopt ≤ bound |",
        "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|",
    ]
    for size, r in results.items():
        lines.append(
            f"| {size} | {r['params']:,} | {r['median_plain']:.4f} | {r['median_mergeopt']:.4f} "
            f"| {r['ratio']:.3f} | {verdict(r['time_ok'])} | {mib(r['mem_plain']['peak_net'])} "
            f"| {mib(r['mem_mergeopt']['peak_net'])} | {mib(r['kp4'])} | {mib(r['bound'])} "
            f"| {verdict(r['mem_ok'])} |"
        )
    table = "\n".join(lines)

    doc = [
        "# mergeopt step overhead",
        "",
        "Generated by `benchmarks/step_overhead.py` (see its docstring for the method).",
        "",
        f"- date (UTC): {started}",
        f"- device: {device_description(device)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, torch threads {torch.get_num_threads()}",
        f"- 1/5/15-min load average at start: {load[0]}; at end: {load[1]} (other work on the machine skews CPU timings)",
        f"- K = {NUM_EXPERTS} experts (θ0 + N(0, {NOISE_SCALE}²) noise), batch {BATCH_SIZE}×{SEQ_LEN} random "
        f"tokens, float32",
        f"- timing: {WARMUP} warm-up steps each, then {repeats} repeats each, interleaved (order alternating); "
        "medians",
        f"- memory: each variant in its own process, model (+ stack) built and {MEMORY_STEPS} steps run; "
        f"the target check uses **{mem_kind}**",
        "",
        "## Results",
        "",
        table,
        "",
        f"Targets: time ratio median(mergeopt)/median(plain) ≤ {TIME_TARGET}; "
        f"mergeopt peak ≤ {MEMORY_FACTOR} × (plain peak + K·P·4 bytes), on the net numbers.",
        "",
        "## Model configs",
        "",
        "| size | P (exact) | stacked params | stack bytes (MiB) | vocab | hidden | intermediate | layers | heads "
        "| kv heads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, r in results.items():
        c = SIZES[size]
        doc.append(
            f"| {size} | {r['params']:,} | {r['stacked_params']:,} | {mib(r['stack_bytes'])} | {VOCAB_SIZE} "
            f"| {c['hidden_size']} | {c['intermediate_size']} | {c['num_hidden_layers']} "
            f"| {c['num_attention_heads']} | {c['num_key_value_heads']} |"
        )
    doc += [
        "",
        "## Memory, raw",
        "",
        "| size | variant | baseline (MiB) | raw peak (MiB) | net peak (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for size, r in results.items():
        for variant in ("plain", "mergeopt"):
            m = r[f"mem_{variant}"]
            base = m["cuda_baseline"] if cuda else m["rss_baseline"]
            doc.append(f"| {size} | {variant} | {mib(base)} | {mib(m['peak_raw'])} | {mib(m['peak_net'])} |")
    if cuda:
        doc += ["", "Process peak RSS of the same runs (host memory):", ""]
        for size, r in results.items():
            for variant in ("plain", "mergeopt"):
                m = r[f"mem_{variant}"]
                doc.append(
                    f"- {size} {variant}: baseline {mib(m['rss_baseline'])} MiB, raw peak "
                    f"{mib(m['rss_peak_raw'])} MiB, net {mib(m['rss_peak_net'])} MiB"
                )
    doc += [
        "",
        "## Step times, raw (s)",
        "",
        "| size | variant | median | repeats |",
        "|---|---|---:|---|",
    ]
    for size, r in results.items():
        for variant in ("plain", "mergeopt"):
            ts = ", ".join(f"{t:.4f}" for t in r["times"][variant])
            doc.append(f"| {size} | {variant} | {r[f'median_{variant}']:.4f} | {ts} |")
    doc.append("")
    return table, "\n".join(doc)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} logical cores)"


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each variant (at least 5)")
    parser.add_argument("--out", default="benchmarks/results/step_overhead.md")
    parser.add_argument("--measure-memory", choices=["plain", "mergeopt"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def main(argv: list[str] | None = None) -> None:
    baseline_rss = read_status_kib("VmRSS")  # right after the imports, before anything is built
    args = parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory_here(args.measure_memory, args.size, baseline_rss)))
        return

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    device = pick_device()
    load_start = load_average()
    print(
        f"device: {device_description(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}"
    )
    results: dict[str, dict] = {}
    for size in args.sizes:
        print(f"[{size}] config: {SIZES[size]}, vocab {VOCAB_SIZE}", flush=True)
        r = measure_time(size, args.repeats, device)
        print(f"[{size}] P = {r['params']:,} parameters", flush=True)
        print(
            f"[{size}] median plain {r['median_plain']:.4f} s, mergeopt {r['median_mergeopt']:.4f} s, "
            f"ratio {r['ratio']:.3f}",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for variant in ("plain", "mergeopt"):
            r[f"mem_{variant}"] = measure_memory(variant, size)
            print(f"[{size}] memory {variant}: {r[f'mem_{variant}']}", flush=True)
        r["kp4"] = NUM_EXPERTS * r["params"] * 4
        r["bound"] = MEMORY_FACTOR * (r["mem_plain"]["peak_net"] + r["kp4"])
        r["time_ok"] = r["ratio"] <= TIME_TARGET
        r["mem_ok"] = r["mem_mergeopt"]["peak_net"] <= r["bound"]
        results[size] = r

    table, doc = build_report(results, args.repeats, device, started, (load_start, load_average()))
    print()
    print(table)
    print()
    for size, r in results.items():
        print(
            f"{size}: time ratio {r['ratio']:.3f} ≤ {TIME_TARGET}: {verdict(r['time_ok'])}; "
            f"memory {mib(r['mem_mergeopt']['peak_net'])} ≤ {mib(r['bound'])} MiB: {verdict(r['mem_ok'])} "
            "(net peaks)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
