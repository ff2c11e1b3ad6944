"""The problem a run works on: the base and experts opened, checked and stacked, and the dev sets read.

Every command that needs "the model at w" starts here: ``mergeopt fit``, ``mergeopt rank``'s grid
mode, ``mergeopt merge`` (:func:`load_merge`, without dev sets) and ``mergeopt train``'s scoring.
A built-in world's paths (``tiny://``) are resolved before; ``random://`` draws its weights here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeopt.config import Recipe
from mergeopt.errors import UserError, warn
from mergeopt.inputs import tokenizer_error, torchrun_variable
from mergeopt.loading.checkpoints import Checkpoint, open_experts
from mergeopt.loading.devices import check_compute_dtype, check_eval_dtype, resolve_device
from mergeopt.loading.lora_updates import LoraAdapter
from mergeopt.loading.positions import check_max_length
from mergeopt.memory import checkpointing
from mergeopt.memory.placement import input_device
from mergeopt.merging.mixed_experts import build_expert_stack
from mergeopt.merging.stack import DTYPES, TaskVectorStack
from mergeopt.objectives.chat import with_template
from mergeopt.objectives.data import DevSet
from mergeopt.objectives.head_loss import check_head
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.term_scores import load_dev_sets
from mergeopt.runtime import distributed
from mergeopt.runtime.interrupts import interrupts_at_once


@dataclass
class Experts:
    """The recipe's checkpoints, opened and checked against each other, no weight read yet."""

    base: Checkpoint
    dense: dict[str, Checkpoint]
    adapters: dict[str, LoraAdapter]


@dataclass
class Problem:
    """Everything a search strategy needs, loaded and checked."""

    model: torch.nn.Module
    stack: TaskVectorStack
    sets: list[DevSet]
    set_weights: torch.Tensor  # a_s: the target's weight of each dev set (0 when not targeted)
    pad_id: int
    device: torch.device
    tokenizer: object = None
    loss_chunk: int | None = None  # tokens per chunk of the output layer; None: the model's own logits


def _load_tokenizer(path: str, trust_remote_code: bool, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError) as err:
        raise tokenizer_error(path, err, "the base", gguf_file) from None


def _open_checked(recipe: Recipe) -> tuple[Experts, object]:
    """The base's checkpoint and the experts (dense checkpoints and LoRA adapters) checked against
    it, and the base's tokenizer: the cheap checks, before any weight of the base is loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = recipe.model
    base, dense, adapters = open_experts(
        model.base, model.experts, model.allow_pickle, model.gguf_file, model.trust_remote_code
    )
    tokenizer = _load_tokenizer(model.base, model.trust_remote_code, model.gguf_file)
    return Experts(base, dense, adapters), with_template(tokenizer, recipe.data.chat_template)


def _weights_source(recipe: Recipe) -> dict:
    """from_pretrained's arguments for where the base's weights come from: safetensors, pickle, GGUF."""
    if recipe.model.gguf_file:  # with the config the checks parsed: a GGUF's metadata takes seconds
        from mergeopt.loading.base_model import base_config

        config = base_config(recipe.model.base, recipe.model.trust_remote_code, recipe.model.gguf_file)
        return {"gguf_file": recipe.model.gguf_file, "config": config}
    return {"use_safetensors": None if recipe.model.allow_pickle else True}


def _stack_experts(
    recipe: Recipe,
    experts: Experts,
    device: torch.device,
    progress: bool,
    shard: tuple[int, int] | None = None,
    base_expert: str | None = None,
) -> tuple[torch.nn.Module, TaskVectorStack]:
    """Load θ0 in the compute dtype and stack the experts as the recipe's model and merge sections
    say; the stacked parameters of the model then read the merge (θ0 is not kept for them, unless
    ``base_expert`` stacks it as one more expert: see :func:`mergeopt.merging.mixed_experts.build_expert_stack`).

    ``shard`` (rank, world size; ``model.shard: fsdp``): the model is built empty and each rank
    reads only its rows of θ0 and of every expert (:mod:`mergeopt.loading.sharded_load`).
    """
    compute_dtype = check_compute_dtype(recipe, device)
    eval_dtype = check_eval_dtype(recipe, device)
    if shard is not None:
        model, base = _empty_base(recipe, experts, compute_dtype, device)
    else:
        model, base = _loaded_base(recipe, compute_dtype, device, progress), None
    stack = build_expert_stack(
        model,
        recipe.expert_names,
        experts.dense,
        experts.adapters,
        recipe.model.exclude,
        DTYPES[recipe.model.stack_dtype],
        progress,
        merge=recipe.merge,
        seed=recipe.seed,
        log=print if progress else (lambda _m: None),
        compute_dtype=compute_dtype,
        shard=shard,
        base=base,
        device=device,
        base_expert=base_expert,
    )
    stack.eval_dtype = eval_dtype
    for ckpt in (experts.base, *experts.dense.values()):
        ckpt.close()
    if recipe.optim.activation_checkpointing:
        checkpointing.enable(model)
    return model, stack


def _loaded_base(
    recipe: Recipe, compute_dtype: torch.dtype, device: torch.device, progress: bool
) -> torch.nn.Module:
    """θ0 loaded whole by transformers, on the device (or spread over GPUs by model.device_map)."""
    from transformers import AutoModelForCausalLM

    if recipe.model.device_map is not None:
        on_gpu = {"device_map": _device_map(recipe, progress)}
    else:
        on_gpu = {"device_map": {"": device}} if device.type == "cuda" else {}
    try:
        with interrupts_at_once("loading the base model"):  # minutes for a large model, nothing written
            model = AutoModelForCausalLM.from_pretrained(
                recipe.model.base,
                dtype=compute_dtype,
                trust_remote_code=recipe.model.trust_remote_code,
                **_weights_source(recipe),
                **on_gpu,
            )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the base model from {recipe.model.base}: {first}") from None
    if not on_gpu:
        model.to(device)
    model.eval()
    if recipe.model.device_map is not None and progress:
        from mergeopt.memory.placement import devices_in_use

        print(f"model spread over {', '.join(devices_in_use(model))}")
    return model


def _empty_base(recipe: Recipe, experts: Experts, compute_dtype: torch.dtype, device: torch.device):
    """(model, θ0 source) for a sharded stack: the architecture with no weights, and the base's
    safetensors to read rows from. Pickled checkpoints are read whole, so they are refused here."""
    from transformers import AutoConfig

    from mergeopt.loading.sharded_load import CheckpointBase, empty_model

    for name, ckpt in (("the base", experts.base), *((f"expert {n!r}", c) for n, c in experts.dense.items())):
        if ckpt._loaded is not None:
            raise UserError(
                f"model.shard fsdp: {name} ({ckpt.path}) is a pickle checkpoint, which every rank would "
                "load whole; save it as safetensors, or set model.shard=none"
            )
    trust = recipe.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(recipe.model.base, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read the base's config from {recipe.model.base}: {first}") from None
    return empty_model(config, compute_dtype, device, trust), CheckpointBase(experts.base)


def _loss_chunk(recipe: Recipe, model: torch.nn.Module, log: Callable[[str], None]) -> int | None:
    """The chunked loss when it reproduces the model's own logits (checked on a probe), else None."""
    if check_head(model, input_device(model), model.config.get_text_config().vocab_size):
        return recipe.optim.loss_chunk_tokens
    log(
        f"{type(model).__name__}: its logits are not the output layer's as mergeopt knows it; the loss uses whole logits"
    )
    return None


def _device_map(recipe: Recipe, progress: bool) -> dict:
    """The recipe's explicit map, or one planned for its strategy with the stack's bytes per layer."""
    from mergeopt.memory import placement

    if distributed.process_rank_and_size()[1] > 1:
        raise UserError(
            "model.device_map spreads one model over all local GPUs, torchrun gives each process one GPU: "
            "use one or the other"
        )
    if isinstance(recipe.model.device_map, dict):
        return placement.check_explicit_map(recipe.model.device_map)
    from mergeopt.loading.base_model import meta_model
    from mergeopt.memory.dry_run import read_inventory
    from mergeopt.memory.plan import plan_memory
    from mergeopt.memory.sizes import DeviceMemory

    inventory, dims = read_inventory(recipe)
    plan = plan_memory(recipe, inventory, dims, DeviceMemory("gpu", "per GPU", None, None))
    activations = max((r.bytes for r in plan.phases), default=0)
    device_map = placement.plan_device_map(
        meta_model(recipe.model.base, recipe.model.trust_remote_code, recipe.model.gguf_file)[0],
        recipe.model.device_map,
        len(recipe.model.experts),
        recipe.model.stack_dtype,
        recipe.model.max_memory,
        activations,
    )
    if progress:
        used = sorted({d for d in device_map.values()})
        print(f"device_map {recipe.model.device_map}: {len(device_map)} module groups over GPUs {used}")
    return device_map


def load_merge(
    recipe: Recipe, progress: bool = True
) -> tuple[torch.nn.Module, TaskVectorStack, object, torch.device]:
    """(model, stack, tokenizer, device) without reading any dev set: what mergeopt.export.merge writes out.

    It shares every step with :func:`load_problem`, so a merge written at the fitted w is the
    model fit scored.
    """
    check_mergeable(recipe)
    device = distributed.local_device(resolve_device(recipe.device))
    experts, tokenizer = _open_checked(recipe)
    model, stack = _stack_experts(recipe, experts, device, progress)
    return model, stack, tokenizer, input_device(model)


def check_mergeable(recipe: Recipe) -> None:
    """A merged checkpoint needs a real base to write: a random:// world has seeded weights and token
    ids, no tokenizer or config files. Checked before the base is opened as a directory."""
    from mergeopt.worlds.random_world import is_random

    if is_random(recipe.model.base):
        raise UserError("a random:// world has no tokenizer or checkpoint to write: merge real experts")


def build_random_world(
    recipe: Recipe,
    device: torch.device,
    progress: bool,
    shard: tuple[int, int] | None,
    base_expert: str | None = None,
):
    """(model, stack, config) for a ``random://`` base: θ0 built from seeds on the device, experts
    drawn tensor by tensor while they are stacked; nothing is read from or written to disk."""
    from mergeopt.worlds import random_world

    config = random_world.check_recipe_paths(recipe.model.base, recipe.model.experts)
    compute_dtype = check_compute_dtype(recipe, device)
    eval_dtype = check_eval_dtype(recipe, device)
    if shard is not None:  # θ0 drawn tensor by tensor as the stack is built, each rank its rows
        from mergeopt.loading.sharded_load import RandomBase, empty_model

        model, base = empty_model(config, compute_dtype, device), RandomBase(config, recipe.world.seed)
    else:
        model, base = random_world.build_base(config, device, compute_dtype, recipe.world.seed), None
    experts = random_world.random_experts(model, config, recipe.expert_names, recipe.world.seed, device)
    stack = build_expert_stack(
        model,
        recipe.expert_names,
        experts,
        {},
        recipe.model.exclude,
        DTYPES[recipe.model.stack_dtype],
        progress,
        merge=recipe.merge,
        seed=recipe.seed,
        compute_dtype=compute_dtype,
        shard=shard,
        base=base,
        device=device,
        base_expert=base_expert,
    )
    stack.eval_dtype = eval_dtype
    if recipe.optim.activation_checkpointing:
        checkpointing.enable(model)
    return model, stack, config


def _random_dev_sets(recipe: Recipe, vocab: int) -> list[DevSet]:
    """Seeded token sequences for each dev set of a random world (its paths are random://NAME)."""
    from mergeopt.worlds import random_world

    data, sets = recipe.data, []
    for d in data.dev:
        if not random_world.is_random(d.path):
            raise UserError(f"dev set {d.name!r}: a random:// base takes random:// dev sets, not {d.path}")
        count = data.max_examples or random_world.DEV_EXAMPLES
        examples = random_world.random_dev_examples(d.name, vocab, data.max_length, count, recipe.seed)
        held = round(data.heldout_fraction * count)
        sets.append(DevSet(name=d.name, weight=d.weight, fit=examples[held:], heldout=examples[:held]))
    return sets


def check_shard(recipe: Recipe, trains: bool = True) -> None:
    """``model.shard: fsdp`` refused in one line where it cannot run (before anything is loaded).
    ``trains``: the caller runs the recipe's search, whose micro-batch must split over the ranks; a
    command that only evaluates (rank, calibrate) splits no micro-batch."""
    from mergeopt.memory.ranks import check_shard_division, check_shard_recipe

    if recipe.model.shard == "none":
        return
    check_shard_recipe(recipe)
    world_size = torchrun_variable("WORLD_SIZE")
    if world_size < 2:
        raise UserError(
            "model.shard fsdp shards the stack over the processes of a torchrun job: start it with "
            "torchrun --nproc_per_node=N (N >= 2), or set model.shard=none"
        )
    if trains:
        check_shard_division(recipe, world_size)


def _shard(recipe: Recipe) -> tuple[int, int] | None:
    """(rank, world size) when this rank keeps 1/N of every matrix (``model.shard: fsdp``), else None."""
    return distributed.process_rank_and_size() if recipe.model.shard == "fsdp" else None


def _sharded(recipe: Recipe, stack: TaskVectorStack) -> None:
    """With ``model.shard: fsdp``, each rank keeps its rows of the LoRA factors kept low-rank too
    (the dense matrices were sharded as they were stacked)."""
    if recipe.model.shard == "fsdp" and stack.lowrank is not None:
        from mergeopt.merging.sharded_merge import shard_lowrank

        shard_lowrank(stack.lowrank, *distributed.process_rank_and_size())


def _warn_unmatched_exclusions(recipe: Recipe, names) -> None:
    """model.exclude's patterns that match no parameter, warned once (by rank 0), as the plan warns."""
    if distributed.process_rank_and_size()[0] == 0:
        if (note := recipe.model.unmatched_exclusions(names)) is not None:
            warn(note)


def load_problem(
    recipe: Recipe,
    progress: bool = True,
    objective: Objective | None = None,
    base_expert: str | None = None,
    trains: bool = True,
) -> Problem:
    """Check checkpoints and dev sets first (cheap), then load θ0 and stack the experts.

    ``objective`` is the caller's :meth:`Objective.from_recipe` of this recipe (made here if not given).
    ``base_expert`` stacks θ0 as one more expert of that name, last (``mergeopt diagnose``, which
    scores the base and reads the task vectors back from the stack). ``trains=False``: the caller
    only evaluates mixtures (rank, calibrate), so a sharded micro-batch need not split over the ranks.
    """
    if objective is None:
        objective = Objective.from_recipe(recipe)
    check_shard(recipe, trains)
    device = distributed.local_device(resolve_device(recipe.device))
    from mergeopt.worlds.random_world import is_random

    if is_random(recipe.model.base):
        if not objective.losses_only:
            raise UserError("a random:// world has no text: its objective can only be dev losses")
        model, stack, config = build_random_world(recipe, device, progress, _shard(recipe), base_expert)
        _warn_unmatched_exclusions(recipe, (n for n, _ in model.named_parameters()))
        check_max_length(config.to_dict(), recipe, recipe.model.base)
        sets = _random_dev_sets(recipe, config.get_text_config().vocab_size)
        weights = objective.loss_set_weights()
        chunk = _loss_chunk(recipe, model, print if progress else (lambda _m: None))
        return Problem(model, stack, sets, weights, 0, input_device(model), None, chunk)
    experts, tokenizer = _open_checked(recipe)
    _warn_unmatched_exclusions(recipe, experts.base.tensors)  # from the headers: before minutes of stacking
    check_max_length(experts.base.config, recipe, recipe.model.base)
    sets = load_dev_sets(recipe.data, recipe.seed, tokenizer, objective.metric_terms)
    # losses only: the loss the gradient strategy descends; with metrics, the dev loss still
    # reported, weighted as data.target says
    set_weights = objective.reported_set_weights()
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    model, stack = _stack_experts(recipe, experts, device, progress, _shard(recipe), base_expert)
    _sharded(recipe, stack)
    chunk = _loss_chunk(recipe, model, print if progress else (lambda _m: None))
    return Problem(model, stack, sets, set_weights, pad_id, input_device(model), tokenizer, chunk)
