"""The checks a GPU session runs in one command: the CUDA tests, the fit step's memory and time, the
zero-order candidate's cost, and the sharded path under torchrun with nccl.

Why: mergeopt's GPU paths are tested on a GPU only in the rare session lent one H100/H200, for
minutes (the first, 2026-12-04, ran only the CUDA tests: docs/benchmarks/index.md).
This script is the one prepared command for it. Every part is timed and recorded even if a later
part fails (each runs in its own subprocess with a timeout; an error is kept as its last line), and
the report is rewritten after each part, so the script never stops halfway without a report.

Run (from the repository root, after ``pip install -e .``; at most ``--budget-s`` seconds, 6 minutes
by default, on one H100/H200):

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu] [--budget-s 360]

On a GPU machine that reaches no package registry, run ``bash benchmarks/gpu_session.sh``
instead: it installs what the machine lacks from wheels carried in ``.whl/``
(``benchmarks/gpu_wheels.sh``), then runs this script.

It writes ``<out>/<gpu name>.json`` and ``.md`` (spaces in the name → ``_``). The parts:

1. ``cuda_tests``: ``python -m pytest -m cuda`` (the CUDA-marked tests: tests/test_cuda_paths.py,
   tests/test_cuda_layer_merge.py, DARE masks, deterministic fits, LoRA experts of fused
   mixture-of-experts weights in tests/test_lora_parameters.py, the plan's gated DeltaNet layer
   in tests/test_linear_attention.py and its latent attention layer, run by the GPU's
   memory-efficient kernel, in tests/test_latent_attention.py); passed / failed / skipped and
   the failing tests' names, from its junit XML.
2. ``fit_step_8b`` and ``fit_step_smollm2``: one gradient step of the fit on
   ``random://tests/data/configs/llama-3.1-8b.json`` (and SmolLM2-135M) shapes as recipes/8b.yaml
   sets it up (K = 4 ``random://`` experts, embeddings and norms excluded, bfloat16 stack and compute,
   activation checkpointing, 8 × 1,024 tokens, the loss 1,024 tokens at a time).
   ``torch.cuda.max_memory_allocated`` over the steps against the dry-run plan's held bytes plus its
   training-step row for the same recipe (goal: within 10%), and the step's time against a plain
   bfloat16 forward and backward of the same model (every parameter requires grad, the same
   checkpointing and chunked loss; goal ≤ 1.15). A warm-up step, then the median of 3.
3. ``zero_order``: one candidate (the merge at a new w, then a no-grad forward and loss, as
   ``mergeopt.objectives.loss.evaluate_sums`` scores it, here in bfloat16) against one plain no-grad
   forward, on the 8B shapes (SmolLM2's if the 8B ones were skipped). Measured, no goal.
4. ``torchrun_nccl``: ``torch.distributed.run --standalone --nproc_per_node=1
   benchmarks/sharded_check.py --device cuda``: the sharded stack's collectives through nccl.

``--parts torchrun_nccl`` (a comma-separated list) runs those parts again, after a fix, and keeps
the other parts' records from the report already in ``--out``, each marked with when it ran;
``zero_order`` reads what a fit-step part of the same run measured.

Before each part its memory is estimated (the plan; the model's size) against
``torch.cuda.mem_get_info()``: what cannot fit is skipped and the report says so. Without CUDA the
script exits 2 with one line. ``--device cpu --smoke`` runs every part on tiny shapes on the CPU (a
tiny config in a temporary directory, float32, gloo for part 4, no memory numbers) in well under a minute:
tests/test_gpu_check.py runs it to check the report.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "tests" / "data" / "configs"
SHAPES = {"8b": CONFIGS / "llama-3.1-8b.json", "smollm2": CONFIGS / "smollm2-135m.json"}
K, SEED, REPEATS = 4, 0, 3
SETS, PER_SET, LENGTH, CHUNK = 4, 2, 1024, 1024  # recipes/8b.yaml: 4 dev sets x 2 = 8 x 1,024 tokens
SMOKE_LENGTH = 32
LOG_TAIL = 6000  # characters of a subprocess's stdout and of its stderr kept in <gpu>-parts.log
MEMORY_TOLERANCE, TIME_GOAL = 0.10, 1.15
PARTS = ("cuda_tests", "fit_step_8b", "fit_step_smollm2", "zero_order", "torchrun_nccl")
# each part's share of the budget (its subprocess's timeout; never more than what is left)
SHARES = {"cuda_tests": 0.45, "8b": 0.25, "smollm2": 0.10, "torchrun_nccl": 0.20}
TINY = {  # the smoke run's shapes: a small Llama, fast on a CPU
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
GIB = 2**30


# ----------------------------------------------------------------------------- the worker (one shape)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step, device, repeats: int = REPEATS) -> dict:
    """A warm-up call, then ``repeats`` timed calls (synchronize + perf_counter) and the peak
    allocated over them (peak statistics reset after the warm-up; None off CUDA)."""
    import torch

    step()
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else None
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "allocated_before_bytes": before,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


def _batch(vocab: int, length: int, device):
    import torch

    from mergeopt.objectives.data import Example, collate

    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (SETS * PER_SET, length), generator=generator)
    scored = torch.ones(length, dtype=torch.bool)
    scored[0] = False
    return collate([(0, Example(row, scored.clone())) for row in ids], pad_id=0).to(device)


def recipe_for(config: Path, device: str, length: int, dtype: str = "bfloat16"):
    """recipes/8b.yaml with K random experts of ``config``'s shapes, ``dtype`` throughout."""
    from mergeopt.config import load_recipe

    path = f"random://{config}"
    experts = "{" + ", ".join(f"e{i}: '{path}'" for i in range(K)) + "}"
    overrides = [
        f"model.base={path}",
        f"model.experts={experts}",
        f"model.stack_dtype={dtype}",
        f"model.compute_dtype={dtype}",
        f"model.eval_dtype={dtype}",  # the candidate in the plain forward's dtype (default: float32)
        f"data.max_length={length}",
        f"optim.batch_size={PER_SET}",
        "optim.grad_accum=1",
        "optim.activation_checkpointing=true",
        f"optim.loss_chunk_tokens={CHUNK}",
        f"device={device}",
        f"seed={SEED}",
    ]
    return load_recipe(REPO / "recipes" / "8b.yaml", overrides)


def _fit_stage(recipe, device, length: int, zero_order: bool, results: dict, save) -> tuple:
    """The fit's step (and the zero-order candidate); its model and stack are freed on return."""
    import torch

    from mergeopt.loading.problem import build_random_world
    from mergeopt.merging.eval_dtype import evaluating_in
    from mergeopt.objectives.loss import dev_loss, per_set_loss_sums

    start = time.perf_counter()
    model, stack, config = build_random_world(recipe, device, False, None)
    _sync(device)
    results["build_fit_s"] = time.perf_counter() - start
    results["stack_bytes"] = stack.nbytes()
    batch = _batch(config.vocab_size, length, device)
    set_weights = torch.ones(1)
    z = torch.zeros(K, dtype=torch.float64, device=device, requires_grad=True)
    adam = torch.optim.Adam([z], lr=recipe.optim.lr)

    def fit_step() -> None:
        adam.zero_grad(set_to_none=True)
        dev_loss(model, stack, z, batch, set_weights, CHUNK).backward()
        adam.step()

    results["fit"] = _measure(fit_step, device)
    save()
    if zero_order:
        generator = torch.Generator().manual_seed(SEED)

        @torch.no_grad()
        def candidate() -> None:  # evaluate_sums at a new w: the merge as each layer runs, no grad
            w = torch.rand(K, generator=generator, dtype=torch.float64)
            params = stack.mix_params((w / w.sum()).to(device))
            with evaluating_in(model, stack.eval_dtype):
                per_set_loss_sums(model, params, batch, 1, CHUNK)

        results["candidate"] = _measure(candidate, device)
        results["eval_dtype"] = str(stack.eval_dtype).removeprefix("torch.")
        save()
    return config, batch


def worker(config: Path, device_name: str, length: int, zero_order: bool, out: Path, dtype: str) -> None:
    """Measure one shape in this process; the results are written to ``out`` after each stage."""
    import torch

    from mergeopt.memory import checkpointing
    from mergeopt.objectives.loss import per_set_loss_sums
    from mergeopt.worlds import random_world

    device = torch.device(device_name)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a CUDA device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    results: dict = {}

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    recipe = recipe_for(config, device_name, length, dtype)
    model_config, batch = _fit_stage(recipe, device, length, zero_order, results, save)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    plain = random_world.build_base(model_config, device, getattr(torch, dtype), SEED)
    for p in plain.parameters():
        p.requires_grad_(True)
    checkpointing.enable(plain)
    _sync(device)
    results["build_plain_s"] = time.perf_counter() - start

    def plain_step() -> None:
        plain.zero_grad(set_to_none=True)
        sums, counts = per_set_loss_sums(plain, {}, batch, 1, CHUNK)
        (sums.sum() / counts.sum()).backward()

    results["plain"] = _measure(plain_step, device)
    save()
    if zero_order:
        plain.zero_grad(set_to_none=True)

        @torch.no_grad()
        def forward() -> None:
            per_set_loss_sums(plain, {}, batch, 1, CHUNK)

        results["plain_forward"] = _measure(forward, device)
        save()


# ----------------------------------------------------------------------------- the parent


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


ERROR_LINE = re.compile(r"^\s*(?:\[[^\]]*\]:?\s*)?([A-Za-z_.]*(?:Error|Exception)\b.*)$")


def _error_line(text: str) -> str:
    """The last ``SomeError: ...`` line of a traceback (torchrun prefixes a rank's lines and ends
    with its own ChildFailedError, which names no cause), else the last line."""
    lines = [line for line in (text or "").splitlines() if "ChildFailedError" not in line]  # torchrun's own
    found = [m.group(1) for m in map(ERROR_LINE.match, lines) if m]
    return found[-1][:500] if found else _last_line(text)


def _log(check: Check, part: str, code, stdout: str, stderr: str) -> None:
    """Append a subprocess's exit code and the ends of its stdout and stderr to ``<gpu>-parts.log``
    beside the report: a part's one-line error rarely says enough to fix it after the session."""
    with open(check.out / f"{check.stem}-parts.log", "a") as log:
        log.write(f"===== {part}: exit {code}\n")
        for name, text in (("stdout", stdout), ("stderr", stderr)):
            log.write(f"--- {name} (last {LOG_TAIL} characters)\n{(text or '')[-LOG_TAIL:]}\n")


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, str, bool]:
    """(return code or None, stdout, stderr, timed out); the whole process group killed on timeout."""
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=max(1.0, timeout))
        return process.returncode, out, err, False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = process.communicate()
        return None, out, err, True


def _env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), path]))}


class Check:
    """The report: the machine, and one record per part, rewritten to disk after each part."""

    def __init__(self, args, device: str, name: str):
        import torch

        self.args, self.device, self.start = args, device, time.monotonic()
        self.dtype = "float32" if args.smoke else "bfloat16"  # bfloat16 is slow on a CPU
        self.deadline = self.start + args.budget_s
        self.out = Path(args.out)
        self.stem = re.sub(r"[^A-Za-z0-9._+-]", "_", name.replace(" ", "_"))
        self.report = {
            "gpu": name,
            "device": device,
            "smoke": args.smoke,
            "dtype": self.dtype,
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),  # the image's, or the carried one
            "cuda": torch.version.cuda,
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "commit": _commit(),
            "budget_s": args.budget_s,
            "total_s": 0.0,
            "parts": [],
        }
        self.selected = tuple(args.parts)
        self.earlier: dict[str, dict] = {}
        if self.selected != PARTS:  # a rerun of some parts: the others are kept from the last report
            self.earlier = self._earlier_parts(name)
            self.report["parts"] = sorted(self.earlier.values(), key=lambda p: PARTS.index(p["part"]))
            self.report["rerun"] = list(self.selected)
        else:  # a whole run: the subprocesses' log starts afresh
            (self.out / f"{self.stem}-parts.log").unlink(missing_ok=True)

    def _earlier_parts(self, name: str) -> dict[str, dict]:
        """The last report's records of the parts this run does not repeat, each saying when it ran."""
        path = self.out / f"{self.stem}.json"
        if not path.is_file():
            return {}
        earlier = json.loads(path.read_text())
        if earlier.get("gpu") != name or earlier.get("smoke") != self.args.smoke:
            return {}
        ran = f"{earlier.get('date_utc')} UTC at {earlier.get('commit')}"
        return {
            p["part"]: {**p, "ran": p.get("ran", ran)}
            for p in earlier.get("parts", [])
            if p.get("part") in PARTS and p["part"] not in self.selected
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, share: str) -> float:
        return min(SHARES[share] * self.args.budget_s, self.left() - 5)

    def part(self, name: str, goal: str, run) -> dict:
        if name not in self.selected:  # --parts: the earlier report's record stays
            return self.earlier.get(name) or {"part": name, "result": "not run", "numbers": {}}
        record = {"part": name, "result": "error", "numbers": {}, "goal": goal, "met": None}
        start = time.monotonic()
        try:
            run(record)
        except Exception as err:  # recorded, and the next part runs
            record["result"] = "error"
            record["error"] = _last_line(traceback.format_exc()) or repr(err)
        record["seconds"] = round(time.monotonic() - start, 2)
        self.report["parts"] = [p for p in self.report["parts"] if p["part"] != name] + [record]
        self.report["parts"].sort(key=lambda p: PARTS.index(p["part"]))
        self.write()
        # what went wrong, on the console too: a session reads it while the machine is still warm
        why = record.get("error") or record.get("note") or ""
        failing = record["numbers"].get("failing")
        why += f" failing: {', '.join(failing)}" if failing else ""
        print(
            f"{name}: {record['result']} ({record['seconds']:.0f} s){': ' + why if why else ''}", flush=True
        )
        return record

    def write(self) -> None:
        self.report["total_s"] = round(time.monotonic() - self.start, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / f"{self.stem}.md").write_text(markdown(self.report))


def _commit() -> str:
    """The checkout's commit; GPU_CHECK_COMMIT where there is no git history (a copied working tree,
    as on the GPU machine), else "?"."""
    try:
        run = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
        found = run.stdout.strip() if run.returncode == 0 else ""
    except OSError:
        found = ""
    return found or os.environ.get("GPU_CHECK_COMMIT", "").strip() or "?"


def _free_bytes(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of the GPU; (None, None) on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return None, None
    return torch.cuda.mem_get_info(torch.device(device))


# ------------------------------------------------------------------------------ part 1


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the failing tests' names from pytest's junit XML."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def verbose_counts(stdout: str) -> dict:
    """The same counts from ``pytest -v`` lines, for a run killed before it wrote its XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}
    for line in stdout.splitlines():
        match = VERBOSE_LINE.match(line)
        if match:
            counts[key.get(match.group(2), "skipped")] += 1
            if match.group(2) in ("FAILED", "ERROR"):
                counts["failing"].append(match.group(1))
    return counts


def cuda_tests(check: Check, record: dict) -> None:
    xml = check.out / f"{check.stem}-pytest.xml"
    check.out.mkdir(parents=True, exist_ok=True)
    targets = ["tests/test_cuda_paths.py"] if check.args.smoke else []  # smoke: collection only
    # a test module that cannot be imported there (a dev-only library the GPU machine lacks) is
    # reported as an error, and the CUDA tests of every other module still run
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors"]
    cmd += [f"--junitxml={xml}", "-rfE", *targets]
    if xml.exists():
        xml.unlink()
    code, out, err, timed_out = _run(cmd, check.timeout("cuda_tests"), _env())
    _log(check, "cuda_tests", code, out, err)
    counts = junit_counts(xml) if xml.exists() and not timed_out else verbose_counts(out)
    record["numbers"] = {**counts, "return_code": code, "junit_xml": str(xml) if xml.exists() else None}
    ran = counts["passed"] + counts["failed"] + counts["errors"]
    if timed_out:
        record["result"] = "timed out"
        record["error"] = f"pytest killed after {check.timeout('cuda_tests'):.0f} s; counts from its -v lines"
    elif code in (0, 5) or (code == 1 and counts["failing"]):
        record["result"] = "ok" if not counts["failing"] else "failed"
    else:
        record["result"] = "error"
        record["error"] = _last_line(out) or _last_line(err)
    record["met"] = (not counts["failing"] and not timed_out and (ran > 0 or check.args.smoke)) or False


# ------------------------------------------------------------------------------ parts 2 and 3


def planned(check: Check, config: Path, length: int) -> dict:
    """The dry-run plan of the same recipe: the held bytes, the training-step row, the model size."""
    from mergeopt.memory import dry_run, plan
    from mergeopt.memory.sizes import DeviceMemory

    recipe = recipe_for(config, check.device, length, check.dtype)
    inventory, dims = dry_run.read_inventory(recipe)
    free, total = _free_bytes(check.device)
    memory = DeviceMemory(check.device, check.report["gpu"], total, free)
    p = plan.plan_memory(recipe, inventory, dims, memory)
    held = sum(r.bytes for r in p.held)
    step = p.row("training step")
    return {
        "held_bytes": held,
        "training_step_bytes": step,
        "step_peak_bytes": held + step,
        "peak_bytes": p.peak,
        "parameters": p.parameters,
        "free_bytes": free,
    }


def measure_shape(check: Check, shape: str, config: Path, length: int, zero_order: bool) -> dict:
    """Run the worker for one shape in a subprocess; whatever it measured (even if it died)."""
    out = check.out / f"{check.stem}-{shape}-worker.json"
    if out.exists():
        out.unlink()
    if check.args.smoke:  # tiny shapes: in this process (a subprocess's imports cost more than the run)
        try:
            worker(config, check.device, length, zero_order, out, check.dtype)
            error = None
        except Exception:
            error = _last_line(traceback.format_exc())
        measured = json.loads(out.read_text()) if out.exists() else {}
        out.unlink(missing_ok=True)
        return {"measured": measured, "error": error}
    cmd = [sys.executable, __file__, "--worker", str(config), "--device", check.device]
    cmd += ["--length", str(length), "--dtype", check.dtype, "--worker-out", str(out)] + (
        ["--zero-order"] if zero_order else []
    )
    code, stdout, stderr, timed_out = _run(cmd, check.timeout(shape), _env())
    _log(check, f"fit_step_{shape}", code, stdout, stderr)
    measured = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    error = None
    if timed_out:
        error = f"timed out after {check.timeout(shape):.0f} s"
    elif code != 0:
        error = _error_line(stderr) or _last_line(stdout) or f"exit code {code}"
    return {"measured": measured, "error": error}


def fits(check: Check, plan_: dict) -> str | None:
    """Why the shape cannot run on this GPU (None: it fits): the fit's planned peak and the plain
    step's (parameters and their gradients in bfloat16, the same activations) against free memory."""
    free = plan_["free_bytes"]
    if free is None:
        return None
    plain = 2 * 2 * plan_["parameters"] + plan_["training_step_bytes"]
    need = max(plan_["step_peak_bytes"], plain)
    if need > 0.95 * free:
        return f"needs about {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
    return None


def step_part(check: Check, record: dict, shape: str, config: Path, length: int, zero_order: bool) -> dict:
    plan_ = planned(check, config, length)
    record["numbers"] = {
        "planned_step_peak_gib": plan_["step_peak_bytes"] / GIB,
        "planned_training_step_gib": plan_["training_step_bytes"] / GIB,
    }
    why = fits(check, plan_)
    if why:
        record["result"] = "skipped"
        record["note"] = why
        return {}
    if check.left() < 30:
        record["result"] = "skipped"
        record["note"] = f"the budget is spent ({check.left():.0f} s left)"
        return {}
    run = measure_shape(check, shape, config, length, zero_order)
    m = run["measured"]
    numbers = record["numbers"]
    numbers.update({k: m[k] for k in ("build_fit_s", "build_plain_s") if k in m})
    if "fit" in m:
        fit = m["fit"]
        numbers["fit_step_s"] = fit["median_s"]
        peak = fit["peak_bytes"]
        numbers["fit_peak_gib"] = None if peak is None else peak / GIB
        numbers["memory_ratio"] = None if peak is None else peak / plan_["step_peak_bytes"]
        if peak is not None:
            net = peak - fit["allocated_before_bytes"]
            numbers["step_net_over_planned_step"] = net / plan_["training_step_bytes"]
    if "plain" in m:
        numbers["plain_step_s"] = m["plain"]["median_s"]
        peak = m["plain"]["peak_bytes"]
        numbers["plain_peak_gib"] = None if peak is None else peak / GIB
    if "fit" in m and "plain" in m:
        numbers["time_ratio"] = m["fit"]["median_s"] / m["plain"]["median_s"]
    if run["error"]:
        record["result"], record["error"] = "error", run["error"]
    elif "time_ratio" in numbers:
        record["result"] = "ok"
    time_met = numbers.get("time_ratio") is not None and numbers["time_ratio"] <= TIME_GOAL
    ratio = numbers.get("memory_ratio")
    memory_met = None if ratio is None else abs(ratio - 1) <= MEMORY_TOLERANCE
    if "time_ratio" in numbers:
        record["met"] = time_met and memory_met is not False
    return m


def zero_order_part(record: dict, measured: dict | None, shape: str | None) -> None:
    if not measured or "candidate" not in measured:
        record["result"] = "skipped"
        record["note"] = "no fit-step part of this run measured a candidate (see those parts)"
        return
    numbers = {"shape": shape, "eval_dtype": measured.get("eval_dtype")}
    numbers["candidate_s"] = measured["candidate"]["median_s"]
    peak = measured["candidate"]["peak_bytes"]
    numbers["candidate_peak_gib"] = None if peak is None else peak / GIB
    if "plain_forward" in measured:
        numbers["plain_forward_s"] = measured["plain_forward"]["median_s"]
        numbers["time_ratio"] = numbers["candidate_s"] / numbers["plain_forward_s"]
        record["result"] = "ok"
    else:
        record["result"] = "error"
        record["error"] = "the plain forward did not run (see the fit-step part)"
    record["numbers"] = numbers


# ------------------------------------------------------------------------------ part 4


def torchrun_part(check: Check, record: dict, config: Path | None) -> None:
    free, _ = _free_bytes(check.device)
    if free is not None and free < 8 * GIB:  # llama-100m, K = 4: a few GiB
        record["result"], record["note"] = "skipped", f"{free / GIB:.1f} GiB free, needs about 8"
        return
    out = check.out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["benchmarks/sharded_check.py", "--device", check.device, "--out", str(out)]
    cmd += ["--config", f"random://{config}"] if config else []
    code, stdout, stderr, timed_out = _run(cmd, check.timeout("torchrun_nccl"), _env())
    _log(check, "torchrun_nccl", code, stdout, stderr)
    name = "cpu" if check.device == "cpu" else check.report["gpu"]
    path = out / f"sharded_check-{name.replace(' ', '_')}.json"
    numbers = {"return_code": code, "report": str(path) if path.exists() else None}
    if path.exists():
        sharded = json.loads(path.read_text())
        numbers.update(
            {
                "backend": sharded.get("backend"),
                "loss_relative_difference": sharded.get("loss_relative_difference"),
                "grad_relative_difference": sharded.get("grad_relative_difference"),
                "ok": sharded.get("ok"),
            }
        )
    record["numbers"] = numbers
    if timed_out:
        record["result"], record["error"] = (
            "timed out",
            f"killed after {check.timeout('torchrun_nccl'):.0f} s",
        )
    elif code == 0 and numbers.get("ok"):
        record["result"], record["met"] = "ok", True
    else:
        record["result"], record["met"] = "failed", False
        # sharded_check says what differed on stdout; a crash leaves its exception in torchrun's stderr
        record["error"] = _last_line(stdout) or _error_line(stderr) or f"exit code {code}"


# ------------------------------------------------------------------------------ report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['gpu']}",
        "",
        f"torch {report['torch']}, transformers {report.get('transformers', '?')}, CUDA {report['cuda']}; "
        f"{report['date_utc']} UTC; commit {report['commit']}; "
        f"{report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + ("; smoke run (tiny shapes on the CPU)" if report["smoke"] else "")
        + (f"; this run repeated {', '.join(report['rerun'])} only" if report.get("rerun") else "")
        + ". Produced by `benchmarks/gpu_check.py`.",
        "",
        "| part | result | numbers | goal | met? | seconds |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for p in report["parts"]:
        numbers = "; ".join(f"{k} {_fmt(v)}" for k, v in p["numbers"].items() if v is not None)
        result = p["result"] + (f": {p['note']}" if p.get("note") else "")
        result += f" ({p['error']})" if p.get("error") else ""
        result += f" [an earlier run: {p['ran']}]" if p.get("ran") else ""
        met = {True: "yes", False: "no", None: "—"}[p["met"]]
        lines.append(
            f"| {p['part']} | {result.replace('|', '/')} | {numbers.replace('|', '/')} | {p['goal']} | {met} | "
            f"{p['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def run_parts(check: Check, tiny: Path | None) -> None:
    length = SMOKE_LENGTH if check.args.smoke else LENGTH
    shapes = {s: tiny for s in SHAPES} if tiny else dict(SHAPES)
    check.part("cuda_tests", "every CUDA-marked test passes", lambda r: cuda_tests(check, r))
    memory_goal = f"peak within {MEMORY_TOLERANCE:.0%} of the plan; time ≤ {TIME_GOAL} x plain step"
    measured: dict[str, dict] = {}
    for shape in SHAPES:
        # the zero-order candidate runs with the 8B shapes, or SmolLM2's when 8B did not run
        zero_order = shape == "8b" or "candidate" not in measured.get("8b", {})

        def run(record, shape=shape, zero_order=zero_order):
            measured[shape] = step_part(check, record, shape, shapes[shape], length, zero_order)

        check.part(f"fit_step_{shape}", memory_goal, run)
    ran = next(((s, m) for s, m in measured.items() if m and "candidate" in m), (None, None))
    # (zero_order reads the fit_step parts' measurements: --parts zero_order alone finds none)
    check.part(
        "zero_order",
        "measured (no goal): candidate merge + forward / plain forward",
        lambda r: zero_order_part(r, ran[1], ran[0]),
    )
    check.part(
        "torchrun_nccl", "sharded step equals the whole one (1e-5)", lambda r: torchrun_part(check, r, tiny)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"))
    parser.add_argument("--budget-s", type=float, default=360.0, help="seconds for every part together")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every part, under a minute")
    parser.add_argument(
        "--parts",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=list(PARTS),
        help="comma-separated parts to run again (default: all); the report keeps the others' last records",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=LENGTH, help=argparse.SUPPRESS)
    parser.add_argument("--zero-order", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(
            Path(args.worker), args.device, args.length, args.zero_order, Path(args.worker_out), args.dtype
        )
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs the smoke check only: add --smoke")
    if unknown := [part for part in args.parts if part not in PARTS]:
        parser.error(f"--parts: unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    args.parts = [part for part in PARTS if part in args.parts]  # in the order they run
    if args.smoke:  # tiny shapes: more threads only contend (the machine may be shared)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    check = Check(args, args.device, name)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = None
        if args.smoke:
            tiny = Path(tmp) / "tiny.json"
            tiny.write_text(json.dumps(TINY))
        try:
            run_parts(check, tiny)
        finally:
            check.write()
    print(f"wrote {check.out / check.stem}.json and .md")
    bad = [  # this run's parts (a rerun's kept records do not count)
        p["part"] for p in check.report["parts"] if p["result"] not in ("ok", "skipped") and "ran" not in p
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
