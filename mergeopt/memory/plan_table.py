"""The plan as ``mergeopt plan`` prints it: the inventory, byte rows in GiB (MiB for a model under 1 GiB), the verdict, placement.

The numbers are :func:`mergeopt.memory.plan.plan_memory`'s; this module only lays them out for a
person (``--json`` gives the same rows as a document: :mod:`mergeopt.memory.plan_document`), and,
under ``model.device_map``, says what each GPU would hold.
"""

from __future__ import annotations

import shlex

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.loading.base_model import meta_model
from mergeopt.memory.sizes import GIB, Inventory, MemoryPlan


def gib(n: int) -> str:
    """Bytes as GiB, two decimals, thousands separated: the unit of the verdict and of the table's
    rows when the peak reaches 1 GiB."""
    return f"{n / GIB:,.2f}"


def table_unit(peak: int) -> tuple[str, int]:
    """The unit of the table's rows: GiB, or MiB below a 1 GiB peak (a small model's rows would
    all read 0.00 in GiB)."""
    return ("GiB", GIB) if peak >= GIB else ("MiB", 2**20)


def typed(override: str) -> str:
    """An override as a shell takes it: an argument with characters a shell would read (a list's
    brackets, which zsh globs; a regex's backslashes; YAML's double quotes) in single quotes, so
    the recipe gets it as printed in the plan's JSON."""
    return " ".join(shlex.quote(arg) for arg in override.split(" "))


def verdict(plan: MemoryPlan) -> str:
    """'fits', or how much is missing and which overrides help, each with its saving (one per line)."""
    mem = plan.memory
    if plan.fits is None:
        each = f" on each of {plan.world_size} ranks" if plan.world_size > 1 else ""
        return (
            f"not checked: {mem.device} is {mem.description}; the run needs {gib(plan.peak)} GiB there{each}"
        )
    if plan.fits:
        return f"fits ({gib(mem.free - plan.peak)} GiB to spare on {mem.device})"
    text = f"does not fit: short by {gib(plan.peak - mem.free)} GiB"
    more = "more GPUs" if plan.sharded_fit is not None else "a larger device"
    if not plan.suggestions:
        lines = [text + f"; none of the knobs helps: fewer experts or {more}"]
    else:
        tries = [f"  {typed(override):<50} saves {gib(saved):>8} GiB" for override, saved in plan.suggestions]
        short = plan.combined_peak - mem.free
        together = "fits" if short <= 0 else f"still short by {gib(short)} GiB: fewer experts or {more}"
        if plan.enough is not None:
            together += (
                " (so does the first alone)" if plan.enough == 1 else f" (so do the first {plan.enough})"
            )
        lines = [f"{text}; try", *tries, f"  all of them: peak {gib(plan.combined_peak)} GiB, {together}"]
    if plan.sharded_fit is not None:
        ranks, peak = plan.sharded_fit
        lines.append(
            f"  or, as written, model.shard=fsdp over {ranks} GPUs under torchrun: peak {gib(peak)} GiB per GPU "
            f"(plan it with --world-size {ranks} model.shard=fsdp; several GPUs and nodes: docs/guides/multi-gpu.md)"
        )
    return "\n".join(lines)


def _line(label: str, size: int, indent: str = "  ", width: int = 62, scale: int = GIB) -> str:
    return f"{indent}{label:<{width - len(indent)}}{size / scale:>10,.2f}"


def _ranks(plan: MemoryPlan) -> list[str]:
    """What each rank holds, for a plan over several ranks."""
    n = plan.world_size
    if n == 1:
        return []
    if plan.shard == "fsdp":
        return [
            f"ranks: {n}, model.shard fsdp: each rank holds a block of 1/{n} of the rows of every matrix "
            "(stacked or not) and every vector whole, and gathers a merged weight whole while its layer runs"
        ]
    return [
        f"ranks: {n}, model.shard none: every rank holds the whole model and stack; only the batches are split"
    ]


def format_plan(plan: MemoryPlan, recipe_path: str, inventory: Inventory) -> str:
    """The printed plan: inventory, byte rows (GiB, or MiB below a 1 GiB peak), peak against the device, verdict."""
    mem = plan.memory
    device = f"{mem.device}: {mem.description}"
    if mem.free is not None:
        device += f", {gib(mem.total)} GiB total, {gib(mem.free)} GiB free"
    per_rank = f", per rank, {plan.world_size} ranks" if plan.world_size > 1 else ""
    width = max(62, 2 + max(len(r.label) for r in (*plan.held, *plan.phases)) + 2)
    unit, scale = table_unit(plan.peak)

    def line(label: str, size: int, indent: str = "  ") -> str:
        return _line(label, size, indent, width, scale)

    lines = [
        f"Memory plan for {recipe_path}{per_rank} (dry run: no weights read, nothing written)",
        f"device{' of each rank' if plan.world_size > 1 else ''}: {device}",
        *_ranks(plan),
        f"parameters: {plan.parameters:,} in {plan.tensors} tensors ({inventory.source})",
        f"stacked: {plan.stacked_parameters:,} in {plan.stacked_tensors} tensors x {plan.num_experts} experts "
        + (
            "(LoRA experts alone: what their adapters set densely"
            if plan.adapters_only
            else "(upper bound: every parameter not excluded"
        )
        + f"; {plan.excluded_tensors} tensors excluded)",
        f"batches: {plan.batch}",
        *(f"note: {n}" for n in inventory.notes),
        "",
        f"{unit + (' per rank' if per_rank else ''):>{width + 10}}",
        "held for the whole run",
        *(line(r.label, r.bytes) for r in plan.held),
        "plus the largest of these phases (estimates)",
        *(line(r.label, r.bytes) for r in plan.phases),
        line("peak" + (" per rank" if per_rank else ""), plan.peak, ""),
    ]
    if mem.free is not None:
        lines.append(line(f"free on {mem.device}", mem.free, ""))
    return "\n".join([*lines, "", f"verdict: {verdict(plan)}"])


def placement_lines(recipe: Recipe, plan: MemoryPlan) -> list[str]:
    """How ``model.device_map`` would spread the model and its stack over the GPUs, per GPU."""
    from mergeopt.memory import placement

    strategy = recipe.model.device_map
    activations = max((r.bytes for r in plan.phases), default=0)
    head = (
        f"placement over GPUs, GiB per GPU (model.device_map: {strategy}; the rows above are for one device; "
        f"each GPU keeps its share of the {gib(activations)} GiB phase free; every parameter counted "
        "at the stacked cost, an upper bound for those model.exclude keeps at θ0)"
    )
    model, _ = meta_model(recipe.model.base, recipe.model.trust_remote_code, recipe.model.gguf_file)
    k, dtype = len(recipe.model.experts), recipe.model.stack_dtype
    try:
        device_map = placement.plan_device_map(
            model, strategy, k, dtype, recipe.model.max_memory, activations
        )
    except UserError as err:
        return [head, f"  {err}"]
    factor = placement.cost_factor(k, dtype)
    per_device: dict[int, list] = {}
    for module in device_map:
        per_device.setdefault(device_map[module], []).append(module)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    lines = [head]
    for device, modules in per_device.items():
        held = sum(n for name, n in sizes.items() if any(name.startswith(m + ".") for m in modules))
        shown = modules if len(modules) <= 3 else [modules[0], "...", modules[-1]]
        lines.append(
            _line(f"cuda:{device}: {len(modules)} modules ({', '.join(shown)})", int(held * 4 * factor))
        )
    return lines
