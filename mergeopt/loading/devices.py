"""The device a run works on and the dtypes it can run there, each refused in one line where not.

A recipe names its device and dtypes once; a CUDA device this machine lacks, float16 on the CPU or
bfloat16 on a GPU without it would otherwise fail deep inside the first forward pass.
"""

from __future__ import annotations

import torch

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.merging.stack import compute_dtype_for, eval_dtype_for


def resolve_device(name: str) -> torch.device:
    """The recipe's ``device`` (auto: CUDA where there is one), refused in one line where this
    machine has no such device, before anything is loaded onto it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here (use device=auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _check_runnable(key: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype`` (named by recipe ``key``) refused in one line where the device cannot run it."""
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError(f"{key} float16 cannot run on the CPU here: use float32 or bfloat16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{key} bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16 or float32"
        )
    return dtype


def check_compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """``model.compute_dtype`` resolved for the device, refused in one line where it cannot run."""
    return _check_runnable(
        "model.compute_dtype", compute_dtype_for(recipe.model.compute_dtype, device), device
    )


def check_eval_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """``model.eval_dtype`` resolved (auto: float32), refused in one line where it cannot run."""
    return _check_runnable("model.eval_dtype", eval_dtype_for(recipe.model.eval_dtype), device)
