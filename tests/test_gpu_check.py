"""benchmarks/gpu_check.py, the one command of a GPU session, in its CPU smoke mode: every part
runs on tiny shapes and the report (JSON and Markdown) has every part; without --smoke and without
CUDA it refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, repo_pythonpath

PARTS = ["cuda_tests", "fit_step_8b", "fit_step_smollm2", "zero_order", "torchrun_nccl"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": repo_pythonpath()},  # this checkout's mergeopt, in its workers too
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_smoke_run_writes_every_part_and_a_rerun_of_some_keeps_the_others(tmp_path):
    """Every part runs and is reported; then --parts runs some again (a GPU session's second try,
    after a fix) and keeps the report's records of the others, each saying when it ran; an unknown
    part is refused. One test: a smoke run takes half a minute on 2 cores."""
    run = _run("--device", "cpu", "--smoke", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert [p["part"] for p in report["parts"]] == PARTS
    for part in report["parts"]:
        assert part["result"] == "ok", part
        assert {"numbers", "goal", "met", "seconds"} <= set(part)
    parts = {p["part"]: p for p in report["parts"]}
    tests = parts["cuda_tests"]["numbers"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # no GPU: all skip
    for shape in ("fit_step_8b", "fit_step_smollm2"):
        numbers = parts[shape]["numbers"]
        assert numbers["fit_step_s"] > 0 and numbers["plain_step_s"] > 0 and numbers["time_ratio"] > 0
        assert numbers["planned_step_peak_gib"] > 0
        assert numbers.get("fit_peak_gib") is None and numbers.get("memory_ratio") is None  # no CUDA
    assert parts["zero_order"]["numbers"]["shape"] == "8b"
    assert parts["zero_order"]["numbers"]["time_ratio"] > 0
    sharded = parts["torchrun_nccl"]["numbers"]
    assert sharded["backend"] == "gloo" and sharded["ok"] and (tmp_path / "sharded_check-cpu.json").is_file()
    assert report["smoke"] and report["gpu"] == "cpu" and report["total_s"] > 0
    markdown = (tmp_path / "cpu.md").read_text()
    assert "| part | result | numbers | goal | met? |" in markdown
    assert all(f"| {p} |" in markdown for p in PARTS)
    assert "rerun" not in report and "[an earlier run: " not in markdown
    log = (tmp_path / "cpu-parts.log").read_text()  # the subprocesses' output, for a failure's cause
    assert "===== cuda_tests: exit 0" in log and "===== torchrun_nccl: exit 0" in log

    again = _run("--device", "cpu", "--smoke", "--out", str(tmp_path), "--parts", "cuda_tests")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    after = json.loads((tmp_path / "cpu.json").read_text())
    assert after["rerun"] == ["cuda_tests"]
    rerun = {p["part"]: p for p in after["parts"]}
    assert list(rerun) == PARTS  # in the order the parts run
    assert rerun["cuda_tests"]["result"] == "ok" and "ran" not in rerun["cuda_tests"]
    for name in PARTS[1:]:
        kept = rerun[name]
        assert kept.pop("ran") == f"{report['date_utc']} UTC at {report['commit']}"
        assert kept == parts[name]
    assert "[an earlier run: " in (tmp_path / "cpu.md").read_text()
    assert (tmp_path / "cpu-parts.log").read_text().count("===== cuda_tests:") == 2  # a rerun appends
    wrong = _run("--device", "cpu", "--smoke", "--out", str(tmp_path), "--parts", "cuda_test")
    assert wrong.returncode == 2 and "--parts: unknown part 'cuda_test'" in wrong.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA GPU")
def _gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is no package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_check


def test_a_crashed_rank_reports_its_exception_not_torchruns():
    """torchrun prefixes a rank's traceback and ends with its own ChildFailedError: the part's
    one-line error is the rank's exception (the first GPU session recorded an empty one)."""
    _error_line = _gpu_check()._error_line
    stderr = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "benchmarks/sharded_check.py", line 102, in main\n'
        "[rank0]: ValueError: Expected a torch.device with a specified index\n"
        "E1204 18:19:05 torch/distributed/elastic/multiprocessing/api.py: failed (exitcode: 1)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\n"
    )
    assert _error_line(stderr) == "ValueError: Expected a torch.device with a specified index"
    assert _error_line("no exception here\nlast words") == "last words"


def test_a_failing_part_says_why_on_the_console(tmp_path, capsys):
    """A part that fails prints its error and failing tests beside its result, so a GPU session
    reads the cause in the command's output while the machine is still warm."""
    import argparse

    gpu_check = _gpu_check()
    args = argparse.Namespace(smoke=True, out=str(tmp_path), budget_s=60.0, parts=list(gpu_check.PARTS))
    check = gpu_check.Check(args, "cpu", "cpu")

    def fails(record):
        record["result"], record["error"] = "failed", "ValueError: boom"
        record["numbers"] = {"failing": ["tests.test_a::test_b"]}

    check.part("cuda_tests", "every CUDA-marked test passes", fails)
    check.part("zero_order", "measured", lambda record: record.update(result="ok"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cuda_tests: failed (0 s): ValueError: boom failing: tests.test_a::test_b"
    assert out[1] == "zero_order: ok (0 s)"
    assert json.loads((tmp_path / "cpu.json").read_text())["parts"][0]["error"] == "ValueError: boom"


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    run = _run("--out", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip() == "gpu_check needs a CUDA GPU"
    assert not list(tmp_path.iterdir())


def test_every_dependency_reaches_the_gpu_machine():
    """benchmarks/gpu_session.sh installs nothing from a registry (the GPU machine reaches none): each
    of mergeopt's dependencies is in the machine's image (named in benchmarks/gpu_wheels.txt) or
    pinned there to travel as a wheel. A new dependency fails here until someone decides which."""
    import re
    import tomllib

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    needed = {
        name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    lines = (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
    carried = (REPO / "benchmarks" / "gpu_wheels_transformers.txt").read_text().splitlines()
    pins = [line for line in lines + carried if line.strip() and not line.startswith("#")]
    pinned = {name(line) for line in pins}
    image = {name(n) for line in lines if line.startswith("# image:") for n in line.split(":", 1)[1].split()}
    assert needed - pinned - image == set()
    assert all("==" in line for line in pins)  # exact pins
    # the carried transformers is pyproject's floor, the version the memory plan is measured against
    floor = next(
        r
        for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if name(r) == "transformers"
    )
    assert f"transformers=={floor.split('>=')[1]}.0" in carried


def test_moe_diagnosis_rehearsed_on_the_cpu_reproduces_the_committed_reference(tmp_path):
    """benchmarks/moe_cuda_diagnosis.py, which a GPU session runs for DeepSeek-V3 in bfloat16, run
    CPU against CPU: the two sides agree exactly (every tap, every merged weight), transformers'
    own bfloat16 model is reported beside the merge, and the losses and ∂L/∂z are those of the
    committed CPU reference (benchmarks/results/moe_cpu_reference/bfloat16.json) that the GPU's are
    read against, so that reference is what the script computes now."""
    from benchmarks.moe_cuda_diagnosis import diagnose

    report = diagnose("deepseek_v3", ["cpu", "cpu"], tmp_path, "bfloat16")
    reference = json.loads((REPO / "benchmarks/results/moe_cpu_reference/bfloat16.json").read_text())
    committed = next(r for r in reference if r["arch"] == "deepseek_v3")
    for key in ("base_loss", "base_compute_loss", "merged_loss", "materialized_loss", "step_loss"):
        first, second = report[key]
        assert first == second, key
        # bfloat16 kernels differ by CPU (an AMD EPYC with AVX-512 BF16 gives a merged loss 3.1e-5
        # from the reference's); the merge without one of its parts moves it by 8e-4 and more
        assert first == pytest.approx(committed[key][0], rel=2e-4), key
    # ∂L/∂z in bfloat16 too: -0.006282 there against the reference's -0.006205 (1.2%)
    torch.testing.assert_close(
        torch.tensor(report["step_grad"]), torch.tensor(committed["step_grad"]), rtol=3e-2, atol=1e-6
    )
    assert report["materialized_weights_max_abs"] == 0.0
    assert set(report["merged_weights_max_abs"].values()) == {0.0}
    for taps in ("base_taps", "base_compute_taps", "merged_taps"):
        assert report[taps] and all(entry["max_abs"] == 0.0 for entry in report[taps].values()), taps
    # the base as mergeopt loads it on a GPU (device_map) is the base, and every buffer transformers
    # forms (DeepSeek-V3's router bias, the rotary frequencies) is compared, none of mergeopt's own
    assert report["base_device_map_loss"] == [report["base_loss"][0]] * 2
    for buffers in ("base_device_map_buffers_max_abs", "merged_buffers_max_abs"):
        assert set(report[buffers]) == {
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.rotary_emb.inv_freq",
            "model.rotary_emb.original_inv_freq",
        }, buffers
        assert set(report[buffers].values()) == {0.0}, buffers
