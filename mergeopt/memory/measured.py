"""The fit's own peak of GPU memory, beside what the plan said it would be.

The plan (``mergeopt plan``) is an estimate, checked on CPU against the live tensor bytes of real
steps; on a GPU the number that decides whether a run fits is ``torch.cuda.max_memory_allocated``.
A fit on CUDA measures it and says both in one log line and to the tracker, so every GPU run checks
the plan: the user sees the margin their recipe has, and a plan that is off for a model shows at
once. The bytes stay out of mixture.json, which the same recipe and seed reproduce byte for byte
(a resumed run's peak is only the resumed part's).
"""

from __future__ import annotations

import torch

from mergeopt.config import Recipe
from mergeopt.errors import UserError, warn
from mergeopt.memory.sizes import GIB, DeviceMemory
from mergeopt.runtime import distributed


def reset(device: torch.device) -> None:
    """Start counting this fit's peak on ``device`` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_devices(model: torch.nn.Module) -> list[torch.device]:
    """The GPUs the model's parameters sit on (several with ``model.device_map``)."""
    return sorted(
        {p.device for p in model.parameters() if p.device.type == "cuda"}, key=lambda d: d.index or 0
    )


def planned_peak(recipe: Recipe, device: torch.device, world_size: int) -> int | None:
    """The plan's per-rank peak for the recipe as resolved (worlds built, paths real), on ``device``;
    None where the plan cannot be made from its inputs. It comes after the fit's work, so a failure
    here is a warning, not the fit's end."""
    from mergeopt.memory.dry_run import read_inventory
    from mergeopt.memory.plan import plan_memory

    try:
        inventory, dims = read_inventory(recipe)
        unknown = DeviceMemory(str(device), "this run's", None, None)
        return plan_memory(recipe, inventory, dims, unknown, world_size).peak
    except UserError:
        return None
    except Exception as err:  # a report's failure is not the fit's
        warn(f"the memory plan for the closing memory line failed ({type(err).__name__}: {err})")
        return None


def peak_report(
    recipe: Recipe, model: torch.nn.Module, device: torch.device
) -> tuple[str, dict[str, float]] | None:
    """One log line and the tracker's values: the largest ``max_memory_allocated`` over this
    process's GPUs and, under torchrun, over the ranks, against the planned peak per rank. None off
    CUDA. Every rank calls it (the ranks' peaks are gathered); rank 0, which logs, plans."""
    if device.type != "cuda":
        return None
    devices = cuda_devices(model) or [device]
    peaks = distributed.all_gather_objects(max(torch.cuda.max_memory_allocated(d) for d in devices))
    measured = max(peaks)
    ranks = len(peaks)
    planned = planned_peak(recipe, device, ranks) if distributed.is_main() else None  # rank 0 says it
    where = f"over {ranks} ranks" if ranks > 1 else ", ".join(str(d) for d in devices)
    line = f"memory: peak {measured / GIB:,.2f} GiB allocated ({where}, torch.cuda.max_memory_allocated)"
    metrics = {"memory/peak_allocated_gib": measured / GIB}
    if planned is not None:
        line += f"; the plan said {planned / GIB:,.2f} GiB per rank ({measured / planned:.2f}x)"
        metrics |= {"memory/planned_peak_gib": planned / GIB, "memory/peak_over_plan": measured / planned}
    return line, metrics
