"""Where a mixture of experts' LoRA merge on a GPU parts from the CPU's: a diagnosis, not a check.

Why: the first GPU session (2026-12-04, H200) found tests/test_lora_parameters.py's
``test_the_low_rank_merge_on_cuda_equals_the_cpu`` failing for six of seven mixture-of-experts
types (loss off by up to 1.3%, ∂L/∂z by up to 8%), while the dense stack's CUDA test of a Mixtral
passed. The GPU is lent for minutes, so this script measures, in one run, what localises it. For
each type it builds the test's world (a tiny random base, two PEFT LoRA adapters of its fused
experts and of one attention projection, saved and read back) and, on each device:

- ``base``: transformers' own base model, float32, no mergeopt: loss on the test's padded batch;
  with ``--compute-dtype bfloat16``, ``base_compute`` too: that model in bfloat16 (its kernels
  alone, beside the merge's bfloat16 step);
- ``base_device_map``: that base loaded as mergeopt loads one on a GPU (``device_map`` {"": device}:
  built on the meta device, then filled), with every buffer transformers forms (rotary frequencies,
  DeepSeek-V3's router score correction bias), compared between the devices;
- ``merged``: mergeopt's merged model at the test's z, no checkpointing, no gradient: loss, and its buffers;
- ``materialized``: that merge made plain weights (as ``mergeopt merge`` writes it), run by
  transformers alone: loss; and the CPU's plain merged weights run on the GPU (``first_weights_on_
  second_device_loss``): transformers' kernels on the GPU with the CPU's numbers;
- ``step`` and ``unchecked_step``: the test's step, checkpointed and not: loss and ∂L/∂z;
- per decoder layer, its output (first tensor), and each router's logits, for ``base`` and
  ``merged``: the largest difference between the devices and how many tokens' top-k experts differ;
- each fused weight the factors form (mergeopt.merging.lowrank_parameters.merged_value) at the
  test's w: the largest difference between the devices.

    python benchmarks/moe_cuda_diagnosis.py [--out FILE.json] [--archs mixtral,deepseek_v3]

It writes one JSON report; ``--devices cpu,cpu`` rehearses it on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

Z = [0.4, -0.3]  # the test's mixture logits (two LoRA experts)
SET_WEIGHTS = [1.0, 2.0]
LOSS_CHUNK = 5


def lora_world(arch: str, root: Path) -> dict:
    """tests/test_lora_parameters.py's ``world`` fixture, without its dense expert."""
    from tests.conftest import save_checkpoint
    from tests.test_conversions import dev_sets
    from tests.test_lora_parameters import ATTENTION, TARGETS, moe_adapter, moe_model

    save_checkpoint(moe_model(arch, 0), root / "base")
    attention = ATTENTION.get(arch, "q_proj")
    experts = {
        name: moe_adapter(str(root / "base"), root / name, seed, TARGETS[arch], attention)
        for name, seed in (("alpha", 10), ("beta", 11))
    }
    return {"arch": arch, "base": str(root / "base"), "experts": experts, "dev": dev_sets(root)}


class _Taps:
    """Forward hooks on every decoder layer and router: their outputs' first tensor, on the CPU."""

    def __init__(self, model: torch.nn.Module):
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            short = name.split("model.", 1)[-1] if "model." in name else name
            parts = short.split(".")
            layer = len(parts) == 2 and parts[0] == "layers" and parts[1].isdigit()
            router = parts[-1] in ("gate", "router") and "mlp" in parts and not name.endswith("gate_proj")
            if layer or (router and (not list(module.children()) or hasattr(module, "weight"))):
                self.handles.append(module.register_forward_hook(self._keep(short)))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(first, torch.Tensor) and name not in self.seen:  # the first call: not a recompute
                self.seen[name] = first.detach().float().cpu()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def token_loss(model: torch.nn.Module, batch, device) -> float:
    """The test's loss of a plain model (no mixture): per dev set, weighted as dev_loss weighs them."""
    from mergeopt.objectives.loss import per_set_loss_sums, target_loss

    with torch.no_grad():
        sums, counts = per_set_loss_sums(model, {}, batch.to(device), len(SET_WEIGHTS), LOSS_CHUNK)
    return float(target_loss(sums, counts, torch.tensor(SET_WEIGHTS)))


def _on(world: dict, device: str, tmp: Path, compute_dtype: str) -> dict:
    import transformers

    from mergeopt.config import recipe_from_dict
    from mergeopt.loading.problem import load_merge
    from mergeopt.memory import checkpointing
    from mergeopt.merging.layer_merge import make_permanent
    from mergeopt.merging.lowrank_parameters import LowRankMergedParameter, merged_value
    from mergeopt.merging.weights import weights_from_logits
    from mergeopt.objectives.loss import dev_loss
    from tests.conftest import recipe_tree
    from tests.test_lora_parameters import two_set_batch

    found: dict = {}
    batch = two_set_batch()
    base = (
        transformers.AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
        .to(device)
        .eval()
    )
    taps = _Taps(base)
    found["base_loss"] = token_loss(base, batch, device)
    taps.close()
    found["base_taps"] = taps.seen
    if compute_dtype != "float32":  # transformers' own model in the compute dtype: its kernels alone
        taps = _Taps(base.to(getattr(torch, compute_dtype)))
        found["base_compute_loss"] = token_loss(base, batch, device)
        taps.close()
        found["base_compute_taps"] = taps.seen
    del base
    # loaded as mergeopt loads a base on a GPU (device_map {"": device}: built on the meta device,
    # then filled), not built on the CPU and moved: a buffer the checkpoint lacks is formed anew there
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        world["base"], dtype=torch.float32, device_map={"": device}
    ).eval()
    found["base_device_map_loss"] = token_loss(placed, batch, device)
    found["base_device_map_buffers"] = _buffers(placed)
    del placed

    def merged():
        tree = recipe_tree(world, tmp / f"run-{device}-{len(found)}")
        tree["device"] = device
        tree["model"]["compute_dtype"] = compute_dtype  # auto would be bfloat16 on a GPU
        return load_merge(recipe_from_dict(tree), progress=False)[:2]

    model, stack = merged()
    z = torch.tensor(Z, dtype=torch.float64, device=device)
    taps = _Taps(model)
    with torch.no_grad():
        found["merged_loss"] = float(
            dev_loss(model, stack, z, batch.to(device), torch.tensor(SET_WEIGHTS), LOSS_CHUNK)
        )
    taps.close()
    found["merged_taps"] = taps.seen
    found["merged_buffers"] = _buffers(model)
    w = weights_from_logits(z).float()
    weights = {}
    for module_name, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, LowRankMergedParameter):
                    c = p.factors.coefficients(w, p.scale)
                    value = merged_value(plist.original, p.factors, c, torch.float32)
                    weights[f"{module_name}.{attr}"] = value.detach().cpu()
    found["merged_weights"] = weights
    # the same merge made plain weights (as mergeopt merge writes it): transformers' forward alone
    stack.write_mixture(w.double())
    with torch.no_grad():
        make_permanent(model)
        stack.lowrank.materialize(stack.lowrank.current_weights())
    found["materialized_loss"] = token_loss(model, batch, device)
    found["materialized_state"] = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    del model, stack

    for checkpointed in (True, False):
        model, stack = merged()
        if checkpointed:
            checkpointing.enable(model)
        z = torch.tensor(Z, dtype=torch.float64, device=device, requires_grad=True)
        loss = dev_loss(model, stack, z, batch.to(device), torch.tensor(SET_WEIGHTS), LOSS_CHUNK)
        loss.backward()
        key = "step" if checkpointed else "unchecked_step"
        found[f"{key}_loss"], found[f"{key}_grad"] = float(loss.detach()), z.grad.cpu().tolist()
        del model, stack
    return found


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer transformers' modules hold, persistent or not (rotary frequencies, a router's
    score correction bias), on the CPU; not mergeopt's own (the stack's, the mixture's)."""
    from mergeopt.merging.layer_merge import MIX_BUFFER

    own = (MIX_BUFFER, "deltas", "scales")
    return {
        name: buffer.detach().float().cpu()
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if buffer.is_floating_point() and name.rsplit(".", 1)[-1] not in own
    }


def _compare_buffers(a: dict, b: dict) -> dict:
    """Per buffer, the largest difference between the devices; a buffer one side lacks is named."""
    out = {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            out[name] = "missing or reshaped"
        else:
            out[name] = float((a[name] - b[name]).abs().max()) if a[name].numel() else 0.0
    return out


def _cross_loss(world: dict, state: dict, device: str) -> float:
    """Transformers' base model on ``device`` given another device's materialized merged weights."""
    import transformers

    from tests.test_lora_parameters import two_set_batch

    batch = two_set_batch()
    model = transformers.AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval()
    model.load_state_dict(state)
    return token_loss(model.to(device), batch, device)


def _compare_taps(a: dict, b: dict, k: int) -> dict:
    out = {}
    for name in a:
        if name not in b or a[name].shape != b[name].shape:
            out[name] = "missing or reshaped"
            continue
        x, y = a[name], b[name]
        entry = {"max_abs": float((x - y).abs().max()), "max_abs_value": float(x.abs().max())}
        if name.split(".")[-1] in ("gate", "router") and x.dim() >= 2 and x.shape[-1] > k:
            xs = x.reshape(-1, x.shape[-1])
            ys = y.reshape(-1, y.shape[-1])
            top_x = xs.topk(k, dim=-1).indices.sort(dim=-1).values
            top_y = ys.topk(k, dim=-1).indices.sort(dim=-1).values
            entry["tokens_with_other_experts"] = int((top_x != top_y).any(dim=-1).sum())
            entry["tokens"] = xs.shape[0]
            ordered = xs.sort(dim=-1, descending=True).values
            entry["smallest_gap_at_k"] = float((ordered[:, k - 1] - ordered[:, k]).min())
        out[name] = entry
    return out


def diagnose(arch: str, devices: list[str], root: Path, compute_dtype: str = "float32") -> dict:
    from tests.test_lora_parameters import ARCHITECTURES

    start = time.perf_counter()
    world = lora_world(arch, root)
    k = ARCHITECTURES[arch][2].get("num_experts_per_tok", 2)
    first, second = (_on(world, d, root / f"{i}-{d}", compute_dtype) for i, d in enumerate(devices))
    report = {"arch": arch, "devices": devices, "compute_dtype": compute_dtype}
    for key in (
        "base_loss",
        "base_device_map_loss",
        "merged_loss",
        "materialized_loss",
        "step_loss",
        "step_grad",
    ):
        report[key] = [first[key], second[key]]
        if key.startswith("step"):
            report[f"unchecked_{key}"] = [first[f"unchecked_{key}"], second[f"unchecked_{key}"]]
    # the first device's merged weights run on the second device, by transformers alone
    report["first_weights_on_second_device_loss"] = _cross_loss(
        world, first["materialized_state"], devices[1]
    )
    ours, theirs = first["materialized_state"], second["materialized_state"]
    differences = {n: float((ours[n].float() - theirs[n].float()).abs().max()) for n in ours}
    report["materialized_weights_max_abs"] = max(differences.values())
    # the tensors that part most (a low-rank Linear's merge, say, beside the fused weights)
    report["materialized_weights_most_apart"] = dict(sorted(differences.items(), key=lambda kv: -kv[1])[:6])
    report["merged_weights_max_abs"] = {
        n: float((first["merged_weights"][n] - second["merged_weights"][n]).abs().max())
        for n in first["merged_weights"]
    }
    report["base_taps"] = _compare_taps(first["base_taps"], second["base_taps"], k)
    if "base_compute_loss" in first:
        report["base_compute_loss"] = [first["base_compute_loss"], second["base_compute_loss"]]
        report["base_compute_taps"] = _compare_taps(
            first["base_compute_taps"], second["base_compute_taps"], k
        )
    # a buffer formed differently on the two devices (under device_map, say) parts them before any merge
    report["base_device_map_buffers_max_abs"] = _compare_buffers(
        first["base_device_map_buffers"], second["base_device_map_buffers"]
    )
    report["merged_buffers_max_abs"] = _compare_buffers(first["merged_buffers"], second["merged_buffers"])
    report["merged_taps"] = _compare_taps(first["merged_taps"], second["merged_taps"], k)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="moe_cuda_diagnosis.json")
    parser.add_argument("--archs", default="mixtral,deepseek_v3,qwen3_moe,gpt_oss,glm4_moe")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            try:
                reports.append(diagnose(arch, devices, Path(tmp) / arch, args.compute_dtype))
            except Exception as err:  # the next type still runs
                reports.append({"arch": arch, "error": f"{type(err).__name__}: {err}"[:800]})
            Path(args.out).write_text(json.dumps(reports, indent=1) + "\n")
            last = reports[-1]
            print(
                arch,
                last.get("error") or (last["merged_loss"], last["step_loss"], last["seconds"]),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
