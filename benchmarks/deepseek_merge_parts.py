"""DeepSeek-V3's LoRA test world merged by PEFT, part by part, on the CPU: which loss each part gives.

Why: the first GPU session's DeepSeek-V3 bfloat16 step lost 4.0022 where the CPU's loses 3.9502
(docs/benchmarks/index.md). If the GPU had dropped a part of the merge, its loss would be one of
these: PEFT's own ``merge_and_unload`` of each adapter, the updates weighted by the test's w, with
both parts (fused experts and the attention's ``o_proj``), each part alone, or neither (the base).
Beside them, transformers' own base model in float32 and bfloat16, eager and SDPA attention, loaded
with and without ``device_map``: whether transformers alone moves on the CPU.

    python benchmarks/deepseek_merge_parts.py [--out benchmarks/results/moe_cpu_reference/deepseek_v3_parts.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = {
    "both parts": lambda name: True,
    "fused experts only": lambda name: "experts" in name,
    "o_proj only": lambda name: "o_proj" in name,
    "neither (the base)": lambda name: False,
}


def main(argv=None) -> int:
    import peft
    import transformers

    from benchmarks.moe_cuda_diagnosis import Z, lora_world, token_loss
    from tests.test_lora_parameters import two_set_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks/results/moe_cpu_reference/deepseek_v3_parts.json")
    )
    args = parser.parse_args(argv)
    batch, w = two_set_batch(), torch.softmax(torch.tensor(Z), 0)
    report: dict = {"arch": "deepseek_v3", "w": w.tolist(), "peft_merge_loss": {}, "base_loss": {}}
    with tempfile.TemporaryDirectory() as tmp:
        world = lora_world("deepseek_v3", Path(tmp))

        def base(**kwargs) -> torch.nn.Module:
            return transformers.AutoModelForCausalLM.from_pretrained(world["base"], **kwargs).eval()

        model = base(dtype=torch.float32)
        theta0 = {k: v.clone() for k, v in model.state_dict().items()}
        updates = []  # each adapter's update, as PEFT's merge_and_unload forms it
        for path in world["experts"].values():
            merged = peft.PeftModel.from_pretrained(base(dtype=torch.float32), path).merge_and_unload()
            updates.append(
                {k: v - theta0[k] for k, v in merged.state_dict().items() if not torch.equal(v, theta0[k])}
            )
        report["adapted"] = sorted(updates[0])
        for label, keep in PARTS.items():
            state = {k: v.clone() for k, v in theta0.items()}
            for weight, update in zip(w, updates):
                for k, v in update.items():
                    if keep(k):
                        state[k] += weight * v
            model.load_state_dict(state)
            report["peft_merge_loss"][label] = {
                dtype: token_loss(model.to(getattr(torch, dtype)), batch, "cpu")
                for dtype in ("float32", "bfloat16")
            }
            model.float()
        for dtype in ("float32", "bfloat16"):
            for attention in ("eager", "sdpa"):
                for mapped in (False, True):
                    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": attention}
                    kwargs |= {"device_map": {"": "cpu"}} if mapped else {}
                    key = f"{dtype}, {attention}" + (", device_map" if mapped else "")
                    report["base_loss"][key] = token_loss(base(**kwargs), batch, "cpu")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for label, losses in report["peft_merge_loss"].items():
        print(f"{label:>20}: " + ", ".join(f"{d} {v:.5f}" for d, v in losses.items()))
    values = report["base_loss"].values()
    print(f"base, {len(report['base_loss'])} ways: {min(values):.5f} to {max(values):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
