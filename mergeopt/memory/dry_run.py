"""``python -m mergeopt.fit RECIPE --dry-run``: the memory plan, from config files and headers only.

It reads config.json files and safetensors *headers* (names, shapes, dtypes), never a weight, and
writes nothing, so a 16B recipe can be checked on a login node before it is queued on a GPU. The
parameter inventory comes from the base's headers or, for a directory that holds only
config.json, from the architecture instantiated on the meta device (no weights, no download).
Experts are checked against the base from their headers as the fit does. The plan is for the
device the recipe resolves to (``auto``: CUDA when visible, else the CPU) and its free memory now,
per rank of a torchrun job of ``--world-size`` N processes (else ``WORLD_SIZE``, else 1).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from mergeopt import inputs
from mergeopt.config import Recipe, load_recipe
from mergeopt.errors import UserError, warn
from mergeopt.loading.adapter_base import check_adapter_base
from mergeopt.loading.base_model import meta_model
from mergeopt.loading.checkpoints import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    check_compatible,
    check_compatible_as_stored,
    check_config_matches_weights,
    gguf_base,
    open_checkpoint,
    pickled_weights,
    read_json_object,
    tied_parameters,
    under_model_names,
)
from mergeopt.loading.lora_sizes import FactorSizes, factor_sizes, saved_copy
from mergeopt.loading.lora_tied import check_untied, input_embedding_weight, saved_tied_embedding, saved_whole
from mergeopt.loading.peft_format import PREFIX, copy_of_another_shape, is_adapter, read_adapter_config
from mergeopt.loading.positions import check_max_length
from mergeopt.loading.precision import precision_warning
from mergeopt.memory.layer_profiles import not_profiled_note
from mergeopt.memory.layout import dora_kept_low_rank, parameters_kept_low_rank
from mergeopt.memory.plan import plan_memory
from mergeopt.memory.plan_inputs import refused_inputs, world_path
from mergeopt.memory.plan_table import format_plan, placement_lines
from mergeopt.memory.ranks import check_world_size
from mergeopt.memory.sizes import FLOAT32, DeviceMemory, Dims, Inventory, MemoryPlan
from mergeopt.merging.stack import DTYPES

# safetensors header dtypes -> bytes per element (the buffer a tensor is read into before the cast)
HEADER_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


# ----------------------------------------------------------------------------- inventory


def _has_safetensors(path: Path) -> bool:
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()


def _describe(path: str, role: str, allow_pickle: bool = False) -> Checkpoint:
    """config.json plus safetensors headers when present; tensors stay empty for a config-only dir.

    ``role``: the recipe key naming it, said first when it is refused (as the fit says it)."""
    directory = Path(path)
    refused_pickle = not allow_pickle and bool(pickled_weights(directory))
    if _has_safetensors(directory) or not (directory / "config.json").is_file() or refused_pickle:
        return open_checkpoint(
            directory, role=role
        )  # refuses a missing directory or config.json, or pickles without allow_pickle, as the fit does
    return Checkpoint(
        path=directory, config=read_json_object(directory / "config.json", "config.json"), tensors={}
    )


def _config_dtype_bytes(config: dict) -> int:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return DTYPES.get(name, torch.float32).itemsize


def meta_inventory(path: str, trust_remote_code: bool, built: tuple | None = None) -> Inventory:
    """Names and shapes of the architecture in config.json, built on the meta device (no weights);
    ``built``: (model, config) as :func:`meta_model` returned them already."""
    model, config = built or meta_model(path, trust_remote_code)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    size = _config_dtype_bytes(config.to_dict())
    source = f"config.json of {path}: {type(model).__name__} built on the meta device"
    return Inventory(shapes, dict.fromkeys(shapes, size), source)


def header_inventory(base: Checkpoint) -> Inventory:
    """Names, shapes and on-disk dtypes of the base's tensors, from its safetensors headers."""
    shapes = {name: meta.shape for name, meta in base.tensors.items()}
    sizes = {name: HEADER_BYTES.get(meta.dtype.upper(), FLOAT32) for name, meta in base.tensors.items()}
    files = {Path(meta.file) for meta in base.tensors.values()}
    gguf = sorted(f.name for f in files if f.suffix == ".gguf")
    if gguf:  # mergeopt.loading.checkpoints.gguf_base: the architecture its metadata describes
        return Inventory(shapes, sizes, f"GGUF metadata of {base.path / gguf[0]}: the model it describes")
    n = len(files)
    return Inventory(shapes, sizes, f"safetensors headers of {base.path}, {n} file{'s' * (n > 1)}")


def _check_experts(base: Checkpoint, experts: dict[str, Checkpoint], model=None) -> None:
    """Headers-only compatibility checks; with a config-only side, only architecture and vocabulary.
    An expert stored another way than the base (fused experts against one tensor per expert) is
    compared as ``model`` holds them, as the fit compares it."""
    for name, expert in experts.items():
        if base.tensors and expert.tensors:
            check_compatible_as_stored(base, expert, name, model)
        else:
            check_compatible(replace(base, tensors={}), replace(expert, tensors={}), name)
    if (note := precision_warning(base, experts)) is not None:  # as the fit warns
        warn(note)


def _built_as_base(model: torch.nn.Module, expert: Checkpoint) -> torch.nn.Module:
    """The expert's config.json built on the meta device by the base's own classes, as the fit reads
    the expert's tensors into the base's architecture: an expert of custom code (auto_map) given by
    its config.json alone needs no code of its own (it was refused as 'cannot build the
    architecture', for a missing modeling file the fit never reads)."""
    try:
        config = type(model.config).from_dict(expert.config)
        with torch.device("meta"):
            return type(model)._from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{expert.path / 'config.json'}: cannot build the architecture on the meta device ({first})"
        ) from None


def _check_described_shapes(base: Checkpoint, experts: dict[str, Checkpoint], model) -> None:
    """An expert whose config.json alone is there (or against a config-only base) has the base's
    shapes. Architecture and vocabulary agree between the sizes of one family (Llama-3.1-8B and
    70B), so the plan said such a recipe fits, and the fit refused it on its first tensor; the
    shapes are compared here as the architectures build them on the meta device, over the names
    both have (an expert stored under other names is compared by the fit)."""
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, expert in experts.items():
        if base.tensors and expert.tensors:
            continue  # compared tensor by tensor from the headers (_check_experts)
        if expert.config == base.config:
            continue  # the same architecture, built alike (a plan of base shapes for every expert)
        if expert.tensors:
            theirs, how = {n: tuple(m.shape) for n, m in expert.tensors.items()}, "its headers describe"
        else:
            built = _built_as_base(model, expert)
            theirs, how = (
                {n: tuple(p.shape) for n, p in built.named_parameters()},
                "its config.json describes",
            )
        for tensor, shape in ours.items():
            other = theirs.get(tensor)
            if other is not None and other != shape:
                raise UserError(
                    f"tensor {tensor} has shape {list(shape)} vs {list(other)} (base {base.path} vs "
                    f"expert {name!r} {expert.path}, as {how} it)"
                )


def _profile_notes(dims: Dims) -> tuple[str, ...]:
    note = not_profiled_note(
        dims.model_type,
        dims.profile.moe,
        dims.profile.grouped_router,
        linear=dims.linear_layers > 0,
        latent=dims.latent_attention is not None,
    )
    return (note,) if note else ()


def random_inventory(recipe: Recipe) -> tuple[Inventory, Dims]:
    """A ``random://`` world: shapes from its config.json on the meta device, nothing on disk."""
    from mergeopt.worlds import random_world

    config = random_world.check_recipe_paths(recipe.model.base, recipe.model.experts)
    check_max_length(config.to_dict(), recipe, recipe.model.base)
    shapes = random_world.config_shapes(config)
    source = f"{recipe.model.base}: random weights, shapes from config.json on the meta device"
    dims = Dims.from_config(config.to_dict(), recipe.model.base)
    # no read buffers: drawn in place
    inventory = Inventory(shapes, dict.fromkeys(shapes, 0), source, notes=_profile_notes(dims))
    return inventory, dims


def _copies_resolved(sizes: FactorSizes, path: str, base: Checkpoint) -> FactorSizes:
    """The adapter's saved weights of low-rank modules (PEFT's ``save_embedding_layers`` copy of
    ``lm_head``) planned as dense rows only where they differ from θ0, as the fit stacks them: each
    is compared with the base's tensor, read alone (without the base's weights: planned as dense)."""
    differ = [
        name
        for name in sizes.copies
        if name not in base.tensors
        or not torch.equal(saved_copy(path, name).float(), base.read(name).float())
    ]
    return replace(sizes, dense=tuple(sorted({*sizes.dense, *differ})), copies=())


def read_inventory(recipe: Recipe) -> tuple[Inventory, Dims]:
    """The base's parameters and decoder shapes, from headers and config files only."""
    from mergeopt.worlds.random_world import is_random

    if is_random(recipe.model.base):
        return random_inventory(recipe)
    if recipe.model.gguf_file:
        base = gguf_base(recipe.model.base, recipe.model.gguf_file, recipe.model.trust_remote_code)
    else:
        base = _describe(recipe.model.base, "model.base", recipe.model.allow_pickle)
    check_max_length(base.config, recipe, str(base.path))
    adapters = {n: p for n, p in recipe.model.experts.items() if is_adapter(p)}
    experts = {
        name: _describe(path, f"model.experts.{name}", recipe.model.allow_pickle)
        for name, path in recipe.model.experts.items()
        if name not in adapters
    }
    # the architecture on the meta device: checkpoints under its names, adapters' target_parameters
    built = meta_model(recipe.model.base, recipe.model.trust_remote_code, recipe.model.gguf_file)
    model = built[0]
    if not base.tensors or recipe.model.gguf_file:  # nothing stored to convert or compare
        stored_as = None
    else:
        stored_as = model
    _check_experts(base, experts, stored_as)
    _check_described_shapes(base, experts, model)
    described = [("base", base), *((f"expert {n}", e) for n, e in experts.items())]
    missing = [what for what, ckpt in described if not ckpt.tensors]
    notes = (
        (f"no safetensors for {', '.join(missing)}: the fit itself will need the weights",) if missing else ()
    )
    if stored_as is not None:
        check_config_matches_weights(base, "base", recipe.model.trust_remote_code, stored_as)
        base = under_model_names(base, stored_as)  # the model's names and shapes (fused experts)
    # one line for a malformed adapter_config.json, as in the fit
    configs = {name: read_adapter_config(Path(path)) for name, path in adapters.items()}
    for name, path in adapters.items():  # the fit's check, before it reads a weight
        check_adapter_base(configs[name].get("base_model_name_or_path"), Path(path), base.path, name)
    sizes = {
        name: _copies_resolved(
            factor_sizes(path, bool(configs[name].get("fan_in_fan_out")), model, configs[name]), path, base
        )
        for name, path in adapters.items()
    }
    if base.tensors:  # the fit's checks of what each adapter sets, against the base's names
        for name, path in adapters.items():
            _check_adapter_targets(Path(path), configs[name], sizes[name], base, model)
    notes += _adapter_notes(recipe, list(adapters), sizes)
    if base.tensors:
        inventory = header_inventory(base)
    else:
        inventory = meta_inventory(recipe.model.base, recipe.model.trust_remote_code, built)
    dims = Dims.from_config(base.config, str(base.path))
    notes += _profile_notes(dims)
    return replace(inventory, notes=notes, adapters=sizes), dims


def _check_adapter_targets(path: Path, config: dict, sizes: FactorSizes, base, model) -> None:
    """What read_adapter refuses, from the header: an adapter of a parameter the base does not have
    (another architecture, a deeper model's layers), of an output layer the base ties to its input
    embedding, or a tied embedding saved whole without ensure_weight_tying."""
    tied = tied_parameters(base)
    factored = {m.removeprefix(PREFIX) for m in (*sizes.modules, *sizes.dora)}
    targets = {f"{m}.weight" for m in factored} | {*sizes.dense, *sizes.copies}
    weight_tying = bool(config.get("ensure_weight_tying"))
    embedding = input_embedding_weight(model)
    for target in sorted(targets - set(sizes.parameters)):
        module = target.rsplit(".", 1)[0]
        if target in tied:
            if module not in factored and weight_tying and embedding in targets:
                continue  # saved whole with its embedding, kept tied: the embedding's copy stands
            if module not in factored and saved_whole(config, module):
                raise saved_tied_embedding(path, module, "its input embedding")
            check_untied(path, target, tied)
        elif target not in base.tensors:
            raise UserError(f"{path}: adapts {module}, but the base has no parameter {target}")
    if tied and embedding in sizes.dense and not weight_tying:
        if saved_whole(config, module := embedding.removesuffix(".weight")):
            raise saved_tied_embedding(path, module, "its output layer")
    _check_saved_shapes(path, sizes, base, tied)
    _check_factor_shapes(path, {**sizes.modules, **sizes.dora}, base, embedding)
    _check_factor_shapes(path, sizes.conv1d, base, embedding, conv1d=True)


def _check_saved_shapes(path: Path, sizes: FactorSizes, base, tied) -> None:
    """What read_adapter refuses, from the header, in its words: a copy of a base parameter of
    another shape (modules_to_save of an embedding or output layer resized to a new vocabulary).
    The plan said "fits" to such an adapter, which the fit refuses."""
    for target, (key, shape) in sorted(sizes.saved.items()):
        meta = base.tensors.get(target)
        if target in tied or meta is None or tuple(meta.shape) == tuple(shape):
            continue
        raise copy_of_another_shape(path, key, shape, target, meta.shape)


def _check_factor_shapes(
    path: Path, modules: dict[str, tuple[int, int, int]], base, embedding: str, conv1d: bool = False
) -> None:
    """What read_adapter refuses, from the header, in its words: factors whose update is not the
    base weight's shape (an adapter of another model of the architecture, wider or narrower; a
    Conv1D weight, ``conv1d``, is in × out). The plan used to read only their sizes and say "fits"
    to an adapter the fit refuses."""
    for key, (rank, width_in, width_out) in sorted(modules.items()):
        module = key.removeprefix(PREFIX)
        meta = base.tensors.get(target := f"{module}.weight")
        expected = (width_in, width_out) if conv1d else (width_out, width_in)
        if meta is None or tuple(meta.shape) == expected:
            continue
        if target == embedding:  # lora_embedding_A is r × rows, B width × r (FactorSizes.modules)
            factors = f"lora_embedding_A {[rank, width_out]} and lora_embedding_B {[width_in, rank]}"
        else:
            factors = f"lora_A {[rank, width_in]} and lora_B {[width_out, rank]}"
        raise UserError(
            f"{path}: {module} has {factors}, but the base's {target} is {list(meta.shape)} "
            f"and the adapter's rank there is {rank}"
        )


def _adapter_notes(recipe: Recipe, adapters: list[str], sizes: dict[str, FactorSizes]) -> tuple[str, ...]:
    """What the fit does with the LoRA experts, in one note: kept low-rank by a linear merge (and
    which of their updates are stacked as dense rows or stay low-rank), or densified."""
    if adapters and recipe.merge.method == "linear":
        dora = dora_kept_low_rank(recipe, sizes)
        patterns = [re.compile(p) for p in recipe.model.exclude]
        whole = parameters_kept_low_rank(recipe, sizes, patterns)
        updated = sorted({n for s in sizes.values() for n in s.dense} - dora - whole)
        if len(adapters) < len(recipe.model.experts):
            dense_rows = ""
        elif updated:
            dense_rows = (
                f"; {len(updated)} parameter(s) they set densely (DoRA, modules_to_save, "
                "biases, target_parameters) are stacked as dense rows"
            )
        else:
            dense_rows = "; no parameter is stacked densely"
        if dora:
            dense_rows += f"; their DoRA updates of {len(dora)} linear weight(s) stay low-rank (row gains)"
        if whole:
            dense_rows += (
                f"; their LoRA of {len(whole)} whole parameter(s) (fused expert weights, routers) stays "
                "low-rank, merged as each layer reads it"
            )
        return (
            f"{len(adapters)} LoRA expert(s) ({', '.join(adapters)}) stay low-rank: their factors, not dense "
            "rows" + dense_rows,
        )
    if adapters:
        return (f"merge.method {recipe.merge.method} densifies the LoRA expert(s) ({', '.join(adapters)})",)
    return ()


# ----------------------------------------------------------------------------- device and report


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.endswith("kB")}


def device_memory(name: str) -> DeviceMemory:
    """The device ``recipe.device`` resolves to and its free memory (CUDA: mem_get_info; CPU: RAM)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return DeviceMemory(name, "not visible here (no CUDA)", None, None)
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            return DeviceMemory(name, f"not visible here ({torch.cuda.device_count()} GPUs)", None, None)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceMemory(f"cuda:{index}", torch.cuda.get_device_name(index), total, free)
    if device.type == "cpu":
        info = _meminfo()
        total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return DeviceMemory("cpu", "system RAM", total, info.get("MemAvailable", total))
    return DeviceMemory(str(device), "memory not known to mergeopt", None, None)


def _resolve_checkpoints(recipe: Recipe) -> Recipe:
    """The recipe with its checkpoint paths resolved (dev sets are not read by a dry run)."""
    base = world_path(recipe.model.base, recipe)
    experts = {name: world_path(path, recipe) for name, path in recipe.model.experts.items()}
    model = recipe.model.model_copy(update={"base": base, "experts": experts})
    return recipe.model_copy(update={"model": model})


def world_size(given: int | None) -> int:
    """The ranks to plan for: ``--world-size`` if given, else ``WORLD_SIZE`` (torchrun's), else 1."""
    if given is not None:
        if given < 1:
            raise UserError(f"--world-size must be at least 1, not {given}")
        return given
    return inputs.torchrun_variable("WORLD_SIZE")


def make_plan(
    recipe: Recipe, ranks: int | None = None, memory_gib: float | None = None
) -> tuple[MemoryPlan, Inventory, list[str]]:
    """The plan, the inventory it was made from and, with ``model.device_map``, the placement's
    lines; reads config.json files and safetensors headers only. The plan is per rank of ``ranks``
    processes (:func:`world_size`), against the device the recipe resolves to, or one of
    ``memory_gib`` GiB (``--device-memory``)."""
    size = world_size(ranks)
    check_world_size(recipe, size)  # before anything is read
    resolved = _resolve_checkpoints(recipe)
    inventory, dims = read_inventory(resolved)
    if (note := recipe.model.unmatched_exclusions(inventory.shapes)) is not None:  # as the fit warns
        warn(note)
    if memory_gib is None:
        memory = device_memory(resolved.device)
    else:  # auto names the GPU the user plans for
        memory = DeviceMemory.given("cuda" if resolved.device == "auto" else resolved.device, memory_gib)
    plan = plan_memory(resolved, inventory, dims, memory, size)
    placement = placement_lines(resolved, plan) if isinstance(resolved.model.device_map, str) else []
    return plan, inventory, placement


def dry_run(
    recipe: Recipe, recipe_path: str, ranks: int | None = None, memory_gib: float | None = None
) -> str:
    """Everything ``--dry-run`` prints (:func:`make_plan`, :func:`format_plan`)."""
    plan, inventory, placement = make_plan(recipe, ranks, memory_gib)
    text = format_plan(plan, recipe_path, inventory)
    return text + ("\n\n" + "\n".join(placement) if placement else "")


def run(args: argparse.Namespace) -> int:
    """``mergeopt plan`` (and ``mergeopt fit --dry-run``): print the plan, or with ``--json`` its
    document (:mod:`mergeopt.memory.plan_document`); nothing is written. Under torchrun only rank 0
    prints it (every rank would print the same plan; a fit's summary is rank 0's too)."""
    recipe = load_recipe(args.recipe, args.overrides)
    memory_gib = getattr(args, "device_memory", None)
    if inputs.torchrun_variable("RANK") > 0:
        make_plan(recipe, args.world_size, memory_gib)  # a mistake is still said by every rank
        return 0  # the plan is rank 0's, and so are its warnings (errors.warn)
    if getattr(args, "json", False):
        from mergeopt.memory.plan_document import plan_document

        plan, inventory, placement = make_plan(recipe, args.world_size, memory_gib)
        print(
            plan_document(plan, args.recipe, list(args.overrides), inventory, placement).model_dump_json(
                indent=2
            )
        )
    else:
        print(dry_run(recipe, args.recipe, args.world_size, memory_gib))
    for problem in refused_inputs(recipe):
        warn(f"the fit would refuse this recipe: {problem}")
    return 0
