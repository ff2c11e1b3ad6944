"""The plan's saved activations against autograd's at real layer shapes, for the profiled types
whose layers change most with the shapes: DeepSeek-V3's multi-head latent attention, Gemma 4's
layers (per-layer inputs, full-attention heads twice as wide as the sliding-window ones), Qwen
3.5's, Qwen3.5-MoE's and Qwen3-Next's gated DeltaNet linear attention.

Run from the repository root (about 10 minutes on 2 CPU cores; the largest model, DeepSeek-V3's two
layers in float32, holds 6 GiB of weights):

    python benchmarks/activations_at_real_shapes.py

Each profile is exact on small random models (tests/test_layer_profiles.py,
tests/test_latent_attention.py, tests/test_linear_attention.py, tests/test_layer_shapes.py), but
its terms weigh differently at real shapes: per chunk of 64 tokens, a linear-attention layer's
64 × 64 matrices and recurrent state per value head, whose share of a layer's activations changes
with the head count and width against the hidden size; a latent attention layer's two latents and
128 heads, wider for q and k than for v, narrow and wide against the hidden size; Gemma 4's float32
norms over heads 256 and 512 wide. So this measures them at the shapes of a released model of each
type: its config's layer widths (its transformers config class's defaults, which transformers'
docs attribute to the named checkpoint; no config is downloaded, so they are not checked against
it) with one layer of each kind in the proportion the model has them (Qwen 3.5: three
linear-attention layers to one full; Gemma 4: its first six layers, five sliding-window and one
full, and no layers sharing keys and values; DeepSeek-V3: one dense layer and one mixture of
experts), a vocabulary of 1,000 and, for the mixtures of experts, 64 routed experts (16 for
DeepSeek-V3) of the released width and top-k, so the weights fit this machine's memory (what a
token keeps depends on the experts' width, its top-k and, through the router's scores alone, their
count).

For each type, in float32 and bfloat16: one sequence of ``--length`` tokens through the model in
training mode, every weight requiring a gradient (as merged weights do), and the bytes of the
distinct storages autograd saves for the backward, parameters left out (tests/test_layer_profiles's
``saved_bytes``) against ``activations.saved_activation_bytes`` for the model's dims as the CPU's
kernels run them (``Dims.on_device("cpu")``: DeepSeek-V3's attention in SDPA's math kernel, where a
GPU runs a fused one; tests/test_latent_attention.py checks the GPU's on a GPU). Results:
``--out``/activations_at_real_shapes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.precision import environment  # noqa: E402
from mergeopt.memory import activations  # noqa: E402
from mergeopt.memory.sizes import Dims  # noqa: E402
from tests.test_layer_profiles import saved_bytes  # noqa: E402

LINEAR = ["linear_attention"] * 3 + ["full_attention"]
# model type: (checkpoint the config class's defaults follow, config class, model class, changes)
TYPES = {
    "deepseek_v3": (
        "deepseek-ai/DeepSeek-V3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16, n_group=8, topk_group=4),
    ),
    "gemma4_text": (
        "google/gemma-4-e2b-it",
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        dict(num_hidden_layers=6, num_kv_shared_layers=0, vocab_size_per_layer_input=1000),
    ),
    "qwen3_5_text": ("Qwen/Qwen3.5-27B", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(layer_types=LINEAR)),
    "qwen3_5_moe_text": (
        "Qwen/Qwen3.5-35B-A3B",
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(layer_types=LINEAR, num_experts=64),
    ),
    "qwen3_next": (
        "Qwen/Qwen3-Next-80B-A3B-Instruct",
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(layer_types=LINEAR, num_experts=64),
    ),
}


def _config(config_name: str, changes: dict):
    """The config class's defaults with ``changes``; layer_types, where given, sets the layer count,
    and a default layer_types is cut to the layer count."""
    changes = {"vocab_size": 1000, **changes}
    if "layer_types" in changes:
        changes["num_hidden_layers"] = len(changes["layer_types"])
    config = getattr(transformers, config_name)(**changes)
    types = getattr(config, "layer_types", None)
    if types and len(types) != config.num_hidden_layers:
        config.layer_types = list(types[: config.num_hidden_layers])
    return config


def _layer_kinds(config) -> list[str]:
    """Each layer's kind: its layer_types entry, or dense and mixture-of-experts layers."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    dense = getattr(config, "first_k_dense_replace", 0)
    return ["dense"] * dense + ["mixture of experts"] * (config.num_hidden_layers - dense)


def measure(model_type: str, dtype: torch.dtype, length: int) -> dict:
    """Planned and saved bytes of one sequence through ``model_type``'s layers."""
    checkpoint, config_name, model_name, changes = TYPES[model_type]
    config = _config(config_name, changes)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(dtype).train()
    assert config.model_type == model_type, config.model_type
    ids = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    saved = saved_bytes(
        lambda: model(input_ids=ids, use_cache=False).logits, [*model.parameters(), *model.buffers()]
    )
    dims = Dims.from_config(config.to_dict(), checkpoint).on_device("cpu")
    planned = activations.saved_activation_bytes(dims, 1, length, dtype.itemsize)
    return {
        "model_type": model_type,
        "shapes_of": checkpoint,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": _layer_kinds(config),
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "length": length,
        "saved_mib": round(saved / 2**20, 2),
        "planned_mib": round(planned / 2**20, 2),
        "ratio": round(planned / saved, 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(report: dict) -> str:
    lines = [
        "# The plan against what autograd saves, at real layer shapes",
        "",
        f"{report['date_utc']} UTC at {str(report['git_commit'])[:7]}, {report['cpu']}, "
        f"torch {report['torch']}, transformers {report['transformers']}; "
        f"one sequence of {report['length']} tokens, on the CPU (its "
        "kernels, as the plan for a CPU plans them: DeepSeek-V3's latent attention in SDPA's math "
        "kernel, Qwen's linear attention in PyTorch's chunks). Every type here is profiled: "
        "DeepSeek-V3's latent attention (mergeopt.memory.latent_attention), Gemma 4's layers "
        "(mergeopt.memory.layer_shapes), the Qwen types' linear attention "
        "(mergeopt.memory.linear_attention); each is exact on a small random model.",
        "",
        "| model type | shapes of | dtype | layers | parameters (M) | saved (MiB) | planned (MiB) "
        "| planned / saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        layers = ", ".join(f"{r['layers'].count(k)} {k}" for k in dict.fromkeys(r["layers"]))
        lines.append(
            f"| {r['model_type']} | {r['shapes_of']} | {r['dtype']} | {layers} | {r['parameters_m']} "
            f"| {r['saved_mib']} | {r['planned_mib']} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--length", type=int, default=256, help="tokens (4 chunks of Qwen 3.5's 64)")
    parser.add_argument("--types", nargs="+", choices=sorted(TYPES), default=sorted(TYPES))
    args = parser.parse_args(argv)
    rows = []
    # each measurement in a process of its own, so that one model's memory is given back before
    # the next is built (a 2-billion-parameter float32 model after another does not fit 24 GiB)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for model_type in args.types:
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(pool.submit(measure, model_type, dtype, args.length).result())
                print(json.dumps(rows[-1]), flush=True)
    report = {
        **environment(sys.argv[1:] if argv is None else argv),
        "transformers": transformers.__version__,
        "length": args.length,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activations_at_real_shapes.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "activations_at_real_shapes.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
