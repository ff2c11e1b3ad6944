"""The cost of one candidate merge: mergeopt in memory against mergekit's two paths, same weights.

Setting (issue 5, benchmark b): SmolLM2-135M-Instruct (the smollm2 world's base, offline), K = 4
dense experts (the base plus seeded noise of scale 1e-3 on every tensor, saved as safetensors
checkpoints), one linear merge at w = (0.4, 0.3, 0.2, 0.1), float32. Per candidate:

* mergekit-yaml: the ``mergekit-yaml CONFIG OUT`` command (a new process, as mergekit-evolve uses
  it) writing the merged checkpoint to disk, then loading it back with transformers to evaluate it;
* mergekit API: ``mergekit.merge.run_merge`` in this process (no start-up), writing to disk, then
  loading it back;
* mergeopt: ``stack.merged(w)``, every stacked parameter at w formed in memory (the fit itself
  forms them one layer at a time as the model runs), after a one-time setup (base loaded, experts
  stacked) that is reported separately.

Each path is timed ``--repeats`` times (median); the merged tensors of mergekit and mergeopt are
compared (max abs difference, target ≤ 1e-6), and the merge is set against one forward pass of
8 x 128 tokens (no grad). Targets: ≥ 25x cheaper than mergekit-yaml, ≥ 7x cheaper than the API,
merge ≤ 0.2x one forward. Needs ``pip install mergekit==0.1.5`` (not a mergeopt dependency).

    python benchmarks/mergekit_compare.py [--repeats 3] [--out benchmarks/results/mergekit_compare.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

WEIGHTS = (0.4, 0.3, 0.2, 0.1)
NOISE, SEED = 1e-3, 0
BATCH, SEQ_LEN = 8, 128


def make_experts(base_dir: Path, root: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    paths = []
    for k in range(len(WEIGHTS)):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(SEED + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(NOISE * torch.randn(p.shape, generator=gen))
        path = root / f"expert{k}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def mergekit_config(experts: list[str]) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(experts, WEIGHTS)],
    }


def load_written(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/mergekit_compare.md")
    args = parser.parse_args(argv)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers.utils import logging as hf_logging

    from mergeopt import worlds
    from mergeopt.loading.checkpoints import open_experts
    from mergeopt.merging.mixed_experts import build_expert_stack

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    base_dir = worlds.ensure("smollm2", None, 0) / "base"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        experts = make_experts(base_dir, root)
        config_file = root / "merge.yaml"
        config_file.write_text(yaml.safe_dump(mergekit_config(experts)))
        cli_bin = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")

        cli, cli_load = [], []
        for r in range(args.repeats):
            out = root / f"cli{r}"
            start = time.perf_counter()
            subprocess.run([cli_bin, str(config_file), str(out), "--quiet"], check=True, capture_output=True)
            cli.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_written(out)
            cli_load.append(time.perf_counter() - start)

        api, api_load = [], []
        config = MergeConfiguration.model_validate(mergekit_config(experts))
        for r in range(args.repeats):
            out = root / f"api{r}"
            start = time.perf_counter()
            run_merge(
                config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
            )
            api.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_written(out)
            api_load.append(time.perf_counter() - start)

        start = time.perf_counter()
        model = load_written(base_dir).eval()
        names = [f"e{k}" for k in range(len(experts))]
        _, dense, adapters = open_experts(str(base_dir), dict(zip(names, experts)))
        stack = build_expert_stack(model, names, dense, adapters, progress=False, log=lambda _m: None)
        setup = time.perf_counter() - start
        w = torch.tensor(WEIGHTS)
        ours = []
        for _ in range(args.repeats + 2):
            start = time.perf_counter()
            with torch.no_grad():
                merged = stack.merged(w)  # every stacked parameter at w, as new tensors
            ours.append(time.perf_counter() - start)
        ours = ours[2:]  # the first merges page the memory in

        written = load_file(root / "api0" / "model.safetensors")
        ours_params = {**dict(model.named_parameters()), **merged}
        max_diff = max(
            float((written[n] - ours_params[n].detach()).abs().max()) for n in written if n in ours_params
        )

        tokens = torch.randint(100, 40000, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(SEED))
        forward = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                model(input_ids=tokens, use_cache=False)
                forward.append(time.perf_counter() - start)
        forward = forward[1:]
    results = {
        "mergekit_yaml_seconds": cli,
        "mergekit_yaml_load_seconds": cli_load,
        "mergekit_api_seconds": api,
        "mergekit_api_load_seconds": api_load,
        "mergeopt_merge_seconds": ours,
        "mergeopt_setup_seconds": setup,
        "forward_seconds": forward,
        "max_abs_difference": max_diff,
        "compared_tensors": len(written),
    }
    write_report(args.out, results, started, args.repeats)


def write_report(out: str, r: dict, started: str, repeats: int) -> None:
    med = statistics.median
    cli = med(r["mergekit_yaml_seconds"]) + med(r["mergekit_yaml_load_seconds"])
    api = med(r["mergekit_api_seconds"]) + med(r["mergekit_api_load_seconds"])
    ours, fwd = med(r["mergeopt_merge_seconds"]), med(r["forward_seconds"])
    verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines = [
        "# One candidate merge: mergeopt in memory vs mergekit (SmolLM2-135M, K = 4, linear, float32)",
        "",
        f"Generated by `python benchmarks/mergekit_compare.py --repeats {repeats}` on {started} UTC "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, mergekit 0.1.5). Medians of {repeats}.",
        "",
        "| path | merge (s) | load back (s) | per candidate (s) | mergeopt is cheaper by |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| mergekit-yaml (new process, to disk) | {med(r['mergekit_yaml_seconds']):.2f} | "
        f"{med(r['mergekit_yaml_load_seconds']):.2f} | {cli:.2f} | {cli / ours:,.0f}x |",
        f"| mergekit API (run_merge, to disk) | {med(r['mergekit_api_seconds']):.2f} | "
        f"{med(r['mergekit_api_load_seconds']):.2f} | {api:.2f} | {api / ours:,.0f}x |",
        f"| mergeopt (into the model's parameters) | {ours:.3f} | 0 | {ours:.3f} | 1x |",
        "",
        f"mergeopt's one-time setup (load the base, stack the 4 experts): {r['mergeopt_setup_seconds']:.1f} s. "
        f"One forward pass of {BATCH} x {SEQ_LEN} tokens: {fwd:.3f} s; the merge is {ours / fwd:.3f}x of it. "
        f"Merged tensors, mergekit vs mergeopt: max abs difference {r['max_abs_difference']:.2e} over "
        f"{r['compared_tensors']} tensors.",
        "",
        f"**Targets**: ≥ 25x cheaper than mergekit-yaml: {verdict(cli / ours >= 25)} ({cli / ours:,.0f}x); "
        f"≥ 7x cheaper than the API: {verdict(api / ours >= 7)} ({api / ours:,.0f}x); "
        f"merge ≤ 0.2x one forward: {verdict(ours / fwd <= 0.2)} ({ours / fwd:.3f}x); "
        f"tensors equal within 1e-6: {verdict(r['max_abs_difference'] <= 1e-6)}.",
    ]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(out).with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
