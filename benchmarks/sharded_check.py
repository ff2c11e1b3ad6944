"""The sharded stack on one accelerator with nccl: one process, the collectives real.

Why: ``model.shard: fsdp`` needs torchrun and several ranks, and a GPU session here has one GPU
for a few minutes. NCCL will not run two ranks on one GPU, but one rank runs every collective of
the sharded path (all-gather of merged rows, reduce-scatter of ∂L/∂W, the all-reduce of the
stacking flags) through nccl with the layout of any world size's rank 0. So this script checks
what a CPU cannot: nccl's collectives on bfloat16 blocks, the empty model's buffers on the GPU,
and rows read by the sharded loader, against the unsharded per-layer path in the same process.

Run (about a minute on an H100; ``--device cpu`` runs the same check with gloo, for testing):

    python benchmarks/sharded_check.py [--device cuda] [--out benchmarks/results/gpu]

It builds the ``random://tests/data/configs/llama-100m.json`` base and K = 4 experts twice: loaded
whole (``build_base``) with an unsharded stack, and empty (``sharded_load.empty_model``) with
the stack sharded over a group of one while it is built; then one gradient step on 4 x 256 seeded
tokens with activation checkpointing for each: loss and ∂L/∂z must agree to 1e-5 relative
(bfloat16 compute forms the same merged weights in both), and the bytes gathered per step are
reported against one merged copy per use. It writes ``<out>/sharded_check-<device name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergeopt.loading.sharded_load import RandomBase, empty_model  # noqa: E402
from mergeopt.memory import checkpointing  # noqa: E402
from mergeopt.merging.sharded_merge import TRAFFIC, reset_traffic  # noqa: E402
from mergeopt.merging.stacking import build_stack  # noqa: E402
from mergeopt.objectives.data import Batch  # noqa: E402
from mergeopt.objectives.loss import dev_loss  # noqa: E402
from mergeopt.worlds import random_world  # noqa: E402

CONFIG = f"random://{(REPO / 'tests/data/configs/llama-100m.json').relative_to(REPO)}"
K, BATCH, LENGTH, SEED = 4, 4, 256, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(config, device: torch.device, dtype: torch.dtype, sharded: bool):
    names = [f"e{i}" for i in range(K)]
    if sharded:
        model = empty_model(config, dtype, device)
        base, shard = RandomBase(config, SEED), (0, 1)
    else:
        model, base, shard = random_world.build_base(config, device, dtype, SEED), None, None
    experts = random_world.random_experts(model, config, names, SEED, device)
    stack = build_stack(
        model, experts, (), torch.bfloat16, False, compute_dtype=dtype, shard=shard, base=base, device=device
    )
    checkpointing.enable(model)
    return model, stack


def _batch(vocab: int, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=generator)
    scored = torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    return Batch(ids, torch.ones_like(ids), scored, torch.zeros(BATCH, dtype=torch.long)).to(device)


def _step(model, stack, batch, device):
    z = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset_traffic()
    start = time.perf_counter()
    loss = dev_loss(model, stack, z, batch, torch.ones(1), 2048)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return float(loss.detach()), z.grad.tolist(), time.perf_counter() - start, peak, dict(TRAFFIC)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu"))
    parser.add_argument("--config", default=CONFIG, help="the random:// model (a small one for tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a CUDA device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        config = random_world.read_config(args.config)
        batch = _batch(config.vocab_size, device)
        results = {}
        for how in ("whole", "sharded"):
            model, stack = _problem(config, device, dtype, how == "sharded")
            _step(model, stack, batch, device)  # warm-up: the second step is the one reported
            loss, grad, seconds, peak, traffic = _step(model, stack, batch, device)
            once = sum(
                a.shape[0] * a[0].numel() * dtype.itemsize for a in stack.anchor.values() if a.dim() >= 2
            )
            results[how] = {
                "loss": loss,
                "grad": grad,
                "step_seconds": seconds,
                "peak_allocated_bytes": peak,
                "stack_bytes": stack.nbytes(),
                "gathered_bytes": traffic["gathered"],
                "gathered_over_one_merged_copy": traffic["gathered"] / once if how == "sharded" else None,
            }
            del model, stack
            if device.type == "cuda":
                torch.cuda.empty_cache()
        whole, sharded = results["whole"], results["sharded"]
        loss_rel = abs(sharded["loss"] - whole["loss"]) / abs(whole["loss"])
        grad_rel = max(abs(a - b) for a, b in zip(sharded["grad"], whole["grad"])) / max(
            abs(g) for g in whole["grad"]
        )
        ok = loss_rel <= 1e-5 and grad_rel <= 1e-5
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report = {
            "device": name,
            "backend": dist.get_backend(),
            "torch": torch.__version__,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "model": f"{args.config}, K = {K}, bfloat16 stack, batch {BATCH} x {LENGTH}, checkpointed",
            "loss_relative_difference": loss_rel,
            "grad_relative_difference": grad_rel,
            "ok": ok,
            **results,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sharded_check-{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{'ok' if ok else 'FAILED'}: loss {loss_rel:.2e}, dL/dz {grad_rel:.2e} relative; wrote {path}")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
