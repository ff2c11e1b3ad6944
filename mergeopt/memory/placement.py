"""Spread a model larger than one GPU over the local GPUs, each layer's stack beside its layer.

A fit holds far more than the model on each device: every stacked parameter brings its float32
anchor and K − 1 differences (:mod:`mergeopt.merging.stack`), which :func:`mergeopt.merging.stacking.build_stack`
allocates on the parameter's own device. So the device map must be planned with those bytes, not
with the model's: accelerate's ``infer_auto_device_map`` places the model's float32 weights within
each GPU's budget divided by the per-parameter cost factor (base + anchor + differences, over the
base alone), after each GPU's share of the largest phase's activations is set aside (the phase
divided by the GPU count: the saved activations are spread with the layers; an estimate). Offloading to
CPU or disk is refused: an offloaded module's weights are swapped in by accelerate's hooks at
forward time, which would overwrite the merged parameters ``functional_call`` passes in.

The recipe picks the strategy (``model.device_map``: auto / balanced / balanced_low_0 /
sequential, or an explicit ``{module: device}`` map) and the budgets (``model.max_memory``, as
accelerate writes them: ``{0: "70GiB", 1: "70GiB"}``; default: what each GPU has free).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergeopt.errors import UserError
from mergeopt.merging.stack import DTYPES

AUTO_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
GIB = 2**30


def cost_factor(num_experts: int, stack_dtype: str) -> float:
    """Bytes a stacked parameter costs on its device per byte of its float32 weight.

    The stack's anchor (bfloat16 for an int8 stack: the compute dtype on a GPU) and K − 1
    differences in the stack dtype; θ0 of a stacked parameter is not kept and merged weights exist
    one layer at a time. Excluded parameters cost only their weight, so the factor is an upper bound.
    """
    anchor = 2 if stack_dtype == "int8" else DTYPES[stack_dtype].itemsize
    return (anchor + (num_experts - 1) * DTYPES[stack_dtype].itemsize) / 4


def reserve_per_gpu(activations: int, gpus: int) -> int:
    """Each GPU's share of the activations: the layers, and what they save, are spread evenly."""
    return -(-activations // max(1, gpus))


def _device_budgets(max_memory: Mapping | None) -> dict[int, int]:
    """Bytes each GPU may hold: the recipe's ``model.max_memory`` or what each GPU has free."""
    from accelerate.utils import get_max_memory

    try:
        budgets = get_max_memory(dict(max_memory) if max_memory else None)
    except ValueError as err:
        raise UserError(f"model.max_memory: {err}") from None
    gpus = {d: int(b) for d, b in budgets.items() if isinstance(d, int)}
    if not gpus:
        raise UserError(
            "model.device_map spreads the model over GPUs but none is visible here "
            "(set model.device_map: null to run on one device)"
        )
    return gpus


def plan_device_map(
    model: torch.nn.Module,
    strategy: str,
    num_experts: int,
    stack_dtype: str,
    max_memory: Mapping | None = None,
    activations: int = 0,
) -> dict[str, int]:
    """A ``{module: GPU index}`` map for ``model`` (built on the meta device) that fits with its stack.

    ``activations`` (the plan's largest phase, for the whole model) is shared out: each GPU keeps
    its 1/N of it free.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    factor = cost_factor(num_experts, stack_dtype)
    budgets = _device_budgets(max_memory)
    reserve = reserve_per_gpu(activations, len(budgets))
    scaled = {d: max(0, int((b - reserve) / factor)) for d, b in budgets.items()}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if strategy.startswith("balanced"):
        scaled = get_balanced_memory(
            model,
            max_memory=scaled,
            no_split_module_classes=no_split,
            dtype=torch.float32,
            low_zero=strategy == "balanced_low_0",
        )
    device_map = infer_auto_device_map(
        model, max_memory=scaled, no_split_module_classes=no_split, dtype=torch.float32
    )
    off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off_gpu:
        need = sum(p.numel() for p in model.parameters()) * 4 * factor
        have = sum(budgets.values())
        raise UserError(
            f"the model with its stack needs about {need / GIB:,.1f} GiB plus {reserve / GIB:,.1f} GiB of "
            f"activations per GPU, more than the {len(budgets)} GPU(s) hold ({have / GIB:,.1f} GiB); "
            "accelerate would offload to " + " and ".join(off_gpu) + ", which a merge cannot use: "
            "use a 16-bit model.stack_dtype, fewer experts, model.exclude, or more GPUs"
        )
    return dict(device_map)


def check_explicit_map(device_map: Mapping[str, int | str]) -> dict[str, int | str]:
    """An explicit map as the recipe gives it, refusing offload targets."""
    bad = {m: d for m, d in device_map.items() if d in ("disk", "meta")}
    if bad:
        module, device = next(iter(bad.items()))
        raise UserError(
            f"model.device_map puts {module!r} on {device!r}: offloaded weights cannot be merged; "
            "place every module on a GPU (or 'cpu' for a CPU-only map)"
        )
    devices = set(device_map.values())
    if "cpu" in devices and len(devices) > 1:
        raise UserError(
            "model.device_map mixes 'cpu' with GPUs: accelerate would offload those modules, which a "
            "merge cannot use; place every module on a GPU"
        )
    for module, device in device_map.items():
        _check_target(module, device)
    return dict(device_map)


def _check_target(module: str, device: int | str) -> None:
    """One entry of an explicit map is a device this machine has: transformers raised a
    RuntimeError (a traceback) at load for 'gpu7', and for a GPU where CUDA is not available."""
    try:  # an index is a GPU's, as accelerate reads it (torch.device(0) is the current accelerator's)
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError):
        target = None
    if target is None or target.type not in ("cuda", "cpu"):
        raise UserError(
            f"model.device_map puts {module!r} on {device!r}, which is not a device: give a GPU index "
            "(0, 1, ...), 'cuda:N', or 'cpu' for a CPU-only map"
        )
    if target.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError(
            f"model.device_map puts {module!r} on GPU {device!r} but CUDA is not available here "
            "(set model.device_map: null to run on one device)"
        )
    index, count = target.index or 0, torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"model.device_map puts {module!r} on GPU {index}, but this machine has {count} GPU(s) "
            f"(0 to {count - 1})"
        )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go in: the input embedding's device (the first GPU of a spread model)."""
    return model.get_input_embeddings().weight.device


def devices_in_use(model: torch.nn.Module) -> list[str]:
    """The devices holding the model's parameters, in first-use order (for the log)."""
    seen: dict[str, None] = {}
    for p in model.parameters():
        seen.setdefault(str(p.device), None)
    return list(seen)
