"""``deterministic: true``: torch's deterministic kernels and cuBLAS's fixed workspace.

On the CPU the fit is bit-identical anyway, so a deterministic run must give the very mixture.json
of a plain one (and prove every op it runs has a deterministic kernel). On CUDA two deterministic
fits must be bit-identical (CUDA-marked: runs where a GPU is).
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from mergeopt.runtime import determinism
from tests.conftest import recipe_tree, run_forked, run_module


@pytest.fixture
def restore_torch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.backends.cudnn.benchmark = was[1]


def test_apply_switches_torch_to_deterministic_kernels(restore_torch):
    determinism.apply(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    determinism.apply(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False


def _fit(world, out, device: str, deterministic: bool):
    tree = recipe_tree(world, out, device=device, deterministic=deterministic)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    # its own process, so deterministic mode ends with it (forked on the CPU: torch is imported; a new
    # interpreter on CUDA, where a forked child cannot use the GPU)
    run = (run_forked if device == "cpu" else run_module)("fit", str(path), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    return (out / "mixture.json").read_bytes()


def test_a_deterministic_fit_on_the_cpu_is_the_plain_fit(random_world, tmp_path):
    assert _fit(random_world, tmp_path / "plain", "cpu", False) == _fit(
        random_world, tmp_path / "deterministic", "cpu", True
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_deterministic_fits_on_cuda_are_bit_identical(random_world, tmp_path):
    assert _fit(random_world, tmp_path / "one", "cuda", True) == _fit(
        random_world, tmp_path / "two", "cuda", True
    )
