"""``deterministic: true``: the same recipe and seed give the same bits on a GPU too.

Why: on a CPU mergeopt's runs are bit-identical already (same machine, same thread count), but
CUDA's ``index_add`` and the embedding backward add with atomics in whatever order the threads
arrive, and cuBLAS may pick a split-K reduction per call, so two fits of one recipe can differ in
the last bits of ∂L/∂z and, after enough steps, in the fitted w. torch's own switch picks
deterministic kernels (and raises for an op that has none); cuBLAS needs its workspace fixed
before its first call (``CUBLAS_WORKSPACE_CONFIG``), so this runs before anything touches the GPU.
It costs speed, so it is off unless the recipe asks.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what torch's reproducibility notes ask for


def apply(deterministic: bool) -> None:
    """Switch torch's deterministic algorithms on (and cuBLAS's fixed workspace), or leave torch as is."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
