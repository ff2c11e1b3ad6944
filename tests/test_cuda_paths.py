"""The fit's paths on a CUDA GPU against the same paths on the CPU (CUDA-marked: skipped without one).

Issue 14 asks the CUDA-marked tests to cover, on the random tiny world (tests/conftest.py):

* the tiny fit on CUDA against the CPU fit, for every merge method (float32 compute: the fitted w
  within 1e-3, the losses within 1e-4 relative), and the default bfloat16 compute close to it;
* the LoRA low-rank path (adapters kept as factors, DoRA's too) on CUDA against the CPU;
* a fit resumed after SIGTERM on CUDA ends where the uninterrupted CUDA fit ends;
* ``mergeopt.export.merge`` run on CUDA writes the checkpoint the CPU writes.

DARE masks on CUDA (tests/test_methods.py) and two deterministic CUDA fits being bit-identical
(tests/test_determinism.py) are CUDA-marked where their CPU counterparts are.
Results are compared across devices at float tolerances, never bit for bit.
Run them with ``python -m pytest -m cuda`` (benchmarks/gpu_check.py does).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergeopt.config import recipe_from_dict
from mergeopt.fit import fit
from tests.conftest import recipe_tree, run_module
from tests.test_lora_dense_updates import updates_world  # noqa: F401  (the fixture, shared)
from tests.test_lora_experts import _fit as _lora_fit
from tests.test_lora_experts import lora_world  # noqa: F401  (the fixture, shared)
from tests.test_merge_cli import MERGES, WEIGHTS, as_arg, merge, write_recipe
from tests.test_resume import GRADIENT, _mixture, _recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FLOAT32 = {"compute_dtype": "float32"}  # the CPU's compute dtype (auto is bfloat16 on a GPU)
SHORTER = {"optim": {**GRADIENT["optim"], "steps": 200}}  # the resume test's fits, within the GPU budget
METHODS = {
    "linear": {},
    "ties": {"method": "ties", "density": 0.5, "scale": 1.5},
    "dare_linear": {"method": "dare_linear", "density": 0.6},
    "dare_ties": {"method": "dare_ties", "density": 0.6, "mixup_alpha": 2.0},
}


def _fit(world, out, device: str, model: dict | None = None, **sections) -> dict:
    tree = recipe_tree(world, out, device=device, **sections)
    tree["model"].update(model or {})
    return fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)


def _close(gpu: dict, cpu: dict, w_tol: float = 1e-3, loss_rel: float = 1e-4) -> None:
    assert gpu["weights"] == pytest.approx(cpu["weights"], abs=w_tol)
    assert gpu["dev_loss"] == pytest.approx(cpu["dev_loss"], rel=loss_rel)
    assert gpu["heldout_loss"] == pytest.approx(cpu["heldout_loss"], rel=loss_rel)
    for name, loss in cpu["expert_dev_loss"].items():
        assert gpu["expert_dev_loss"][name] == pytest.approx(loss, rel=loss_rel)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_fit_on_cuda_finds_the_cpu_fit(random_world, tmp_path, method):
    merge_section = METHODS[method]
    cpu = _fit(random_world, tmp_path / "cpu", "cpu", merge=merge_section)
    gpu = _fit(random_world, tmp_path / "gpu", "cuda", FLOAT32, merge=merge_section)
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["method"] == cpu["method"]  # the same DARE seed, mixup draw and density
    _close(gpu, cpu)


def test_default_bfloat16_fit_on_cuda_is_close_to_the_cpu_fit(random_world, tmp_path):
    """compute_dtype auto is bfloat16 on a GPU: the steps round, the reported losses (float32
    evaluations) stay close."""
    cpu = _fit(random_world, tmp_path / "cpu", "cpu")
    gpu = _fit(random_world, tmp_path / "gpu", "cuda")
    _close(gpu, cpu, w_tol=0.1, loss_rel=1e-2)


def test_lowrank_lora_fit_on_cuda_finds_the_cpu_fit(lora_world, tmp_path):  # noqa: F811
    adapters = lora_world["adapters"]
    cpu = _lora_fit(lora_world, adapters, tmp_path / "cpu")
    gpu = _lora_fit(lora_world, adapters, tmp_path / "gpu", model=FLOAT32, device="cuda")
    assert gpu["stack"]["lowrank_modules"] == cpu["stack"]["lowrank_modules"] == 14
    assert gpu["stack"]["tensors"] == 0  # kept low-rank on the GPU too
    _close(gpu, cpu)


def test_dora_adapters_fit_on_cuda_find_the_cpu_fit(updates_world, tmp_path):  # noqa: F811
    """DoRA layers kept low-rank (their row gains computed beside θ0 on the GPU), a saved lm_head
    and an adapted embedding."""
    adapters = updates_world["adapters"]
    cpu = _lora_fit(updates_world, adapters, tmp_path / "cpu")
    gpu = _lora_fit(updates_world, adapters, tmp_path / "gpu", model=FLOAT32, device="cuda")
    assert gpu["stack"] == cpu["stack"]
    _close(gpu, cpu)


def test_fit_on_cuda_resumed_after_sigterm_ends_where_the_whole_run_ends(random_world, tmp_path):
    """deterministic: true, so the two CUDA runs do not differ by atomics' summation order."""
    cuda = {"device": "cuda", "deterministic": True, "model": FLOAT32, **SHORTER}
    out = tmp_path / "stopped"
    recipe = _recipe(random_world, tmp_path, out, **cuda)
    stopped = run_module("fit", recipe, "--quiet", fault="sigterm@step:5")
    stderr = stopped.stderr
    assert stopped.returncode == 143, stderr
    assert "Rerun the same command to continue" in stderr and "Traceback" not in stderr
    assert not (out / "mixture.json").exists()
    again = run_module("fit", recipe, "--resume", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    whole = tmp_path / "whole"
    done = run_module("fit", _recipe(random_world, tmp_path, whole, **cuda), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = _mixture(out), _mixture(whole)
    assert resumed["device"].startswith("cuda")
    assert resumed["search"]["steps"] == uninterrupted["search"]["steps"]
    _close(resumed, uninterrupted, w_tol=1e-6, loss_rel=1e-6)


@pytest.mark.parametrize("method", sorted(MERGES))
def test_merge_on_cuda_writes_the_cpu_checkpoint(random_world, tmp_path, method):
    written = {}
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        recipe = write_recipe(tmp_path / device, random_world, merge=MERGES[method])
        out = tmp_path / device / "merged"
        overrides = [f"device={device}", "model.compute_dtype=float32"]
        assert merge(str(recipe), *overrides, "--weights", as_arg(WEIGHTS), "--out", str(out)) == 0
        written[device] = load_file(out / "model.safetensors")
    assert set(written["cuda"]) == set(written["cpu"])
    for name, tensor in written["cpu"].items():
        assert written["cuda"][name].dtype == tensor.dtype == torch.float32
        torch.testing.assert_close(written["cuda"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_fit_on_cuda_says_its_peak_against_the_plan(random_world, tmp_path):
    """mergeopt.memory.measured: one line with torch.cuda.max_memory_allocated and the plan's peak
    (the tiny world's tensors are a few MiB, so CUDA's own workspaces weigh in: no ratio is asserted;
    benchmarks/gpu_check.py compares them at 8B shapes)."""
    import re

    lines: list[str] = []
    tree = recipe_tree(random_world, tmp_path / "gpu", device="cuda")
    fit(recipe_from_dict(tree), progress=False, log=lines.append)
    (line,) = [line for line in lines if line.startswith("memory:")]
    match = re.fullmatch(
        r"memory: peak ([\d.,]+) GiB allocated \(cuda:\d, torch.cuda.max_memory_allocated\); "
        r"the plan said ([\d.,]+) GiB per rank \(([\d.]+)x\)",
        line,
    )
    assert match, line
    assert float(match.group(3)) > 0
