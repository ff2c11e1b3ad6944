"""Fit a data mixture: ``python -m mergeopt.fit RECIPE [key=value ...] [--quiet] [--debug]``.

Loads the base and the experts, checks they can be merged, stacks the task vectors, fits the
mixture weights on the dev sets by gradient descent through the merged model, and writes the run
directory: mixture.json, trace.csv, recipe.yaml and loss_curve.png. Every input is validated
before anything is written, so a mistake leaves no half-made run behind.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import mergeopt
from mergeopt import checkpointing, determinism, distributed, worlds
from mergeopt.checkpoints import Checkpoint, open_experts
from mergeopt.config import Recipe, load_recipe, recipe_to_yaml
from mergeopt.data import DevSet
from mergeopt.errors import UserError, run_cli
from mergeopt.files import write_csv_atomic, write_json_atomic, write_text_atomic
from mergeopt.head_loss import check_head
from mergeopt.lora import LoraAdapter
from mergeopt.objectives import evaluate_sums, target_loss
from mergeopt.placement import input_device
from mergeopt.report import plot_loss_curve, plot_search_curve, summary
from mergeopt.resume import CHECKPOINT_DIR, Interrupted, RunState, interruptible, recipe_tree
from mergeopt.scoring import loss_set_weights, objective_terms
from mergeopt.search import fit_gradient
from mergeopt.stack import DTYPES, TaskVectorStack, build_expert_stack, compute_dtype_for, eval_dtype_for
from mergeopt.term_scores import load_dev_sets
from mergeopt.weights import as_mapping, initial_logits

GRADIENT_FILES = ("mixture.json", "trace.csv", "recipe.yaml", "loss_curve.png", "simplex.png", "report.md")
SEARCH_FILES = (
    "mixture.json",
    "evaluations.csv",
    "recipe.yaml",
    "search_curve.png",
    "simplex.png",
    "report.md",
)


def output_files(recipe: Recipe) -> tuple[str, ...]:
    """The files a finished run directory holds (rank adds its own when rank.grid is set)."""
    files = GRADIENT_FILES if recipe.search.strategy == "gradient" else SEARCH_FILES
    if recipe.rank.grid is not None:
        from mergeopt.rank import OUTPUT_FILES as RANK_FILES

        files = (*files, *RANK_FILES)
    return files


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here (use device=auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a tokenizer from the base {path}: {first}") from None


def _open_checked(recipe: Recipe) -> tuple[Experts, object]:
    """The base's checkpoint and the experts (dense checkpoints and LoRA adapters) checked against
    it, and the base's tokenizer: the cheap checks, before any weight of the base is loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = recipe.model
    base, dense, adapters = open_experts(
        model.base, model.experts, model.allow_pickle, model.gguf_file, model.trust_remote_code
    )
    return Experts(base, dense, adapters), _load_tokenizer(
        model.base, model.trust_remote_code, model.gguf_file
    )


def _weights_source(recipe: Recipe) -> dict:
    """from_pretrained's arguments for where the base's weights come from: safetensors, pickle, GGUF."""
    if recipe.model.gguf_file:
        return {"gguf_file": recipe.model.gguf_file}
    return {"use_safetensors": None if recipe.model.allow_pickle else True}


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


def _stack_experts(
    recipe: Recipe,
    experts: Experts,
    device: torch.device,
    progress: bool,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.nn.Module, TaskVectorStack]:
    """Load θ0 in the compute dtype and stack the experts as the recipe's model and merge sections
    say; the stacked parameters of the model then read the merge (θ0 is not kept for them).

    ``shard`` (rank, world size; ``model.shard: fsdp``): the model is built empty and each rank
    reads only its rows of θ0 and of every expert (:mod:`mergeopt.sharded_load`).
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
        from mergeopt.placement import devices_in_use

        print(f"model spread over {', '.join(devices_in_use(model))}")
    return model


def _empty_base(recipe: Recipe, experts: Experts, compute_dtype: torch.dtype, device: torch.device):
    """(model, θ0 source) for a sharded stack: the architecture with no weights, and the base's
    safetensors to read rows from. Pickled checkpoints are read whole, so they are refused here."""
    from transformers import AutoConfig

    from mergeopt.sharded_load import CheckpointBase, empty_model

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
    from mergeopt import placement

    if distributed.process_rank_and_size()[1] > 1:
        raise UserError(
            "model.device_map spreads one model over all local GPUs, torchrun gives each process one GPU: "
            "use one or the other"
        )
    if isinstance(recipe.model.device_map, dict):
        return placement.check_explicit_map(recipe.model.device_map)
    from mergeopt.checkpoints import meta_model
    from mergeopt.dry_run import read_inventory
    from mergeopt.plan import DeviceMemory, plan_memory

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
    """(model, stack, tokenizer, device) without reading any dev set: what mergeopt.merge writes out.

    It shares every step with :func:`load_problem`, so a merge written at the fitted w is the
    model fit scored.
    """
    from mergeopt.random_world import is_random

    if is_random(recipe.model.base):
        raise UserError("a random:// world has no tokenizer or checkpoint to write: merge real experts")
    device = distributed.local_device(resolve_device(recipe.device))
    experts, tokenizer = _open_checked(recipe)
    model, stack = _stack_experts(recipe, experts, device, progress)
    return model, stack, tokenizer, input_device(model)


def _random_world(recipe: Recipe, device: torch.device, progress: bool, shard: tuple[int, int] | None):
    """(model, stack, config) for a ``random://`` base: θ0 built from seeds on the device, experts
    drawn tensor by tensor while they are stacked; nothing is read from or written to disk."""
    from mergeopt import random_world

    config = random_world.check_recipe_paths(recipe.model.base, recipe.model.experts)
    compute_dtype = check_compute_dtype(recipe, device)
    eval_dtype = check_eval_dtype(recipe, device)
    if shard is not None:  # θ0 drawn tensor by tensor as the stack is built, each rank its rows
        from mergeopt.sharded_load import RandomBase, empty_model

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
    )
    stack.eval_dtype = eval_dtype
    if recipe.optim.activation_checkpointing:
        checkpointing.enable(model)
    return model, stack, config


def _random_dev_sets(recipe: Recipe, vocab: int) -> list[DevSet]:
    """Seeded token sequences for each dev set of a random world (its paths are random://NAME)."""
    from mergeopt import random_world

    data, sets = recipe.data, []
    for d in data.dev:
        if not random_world.is_random(d.path):
            raise UserError(f"dev set {d.name!r}: a random:// base takes random:// dev sets, not {d.path}")
        count = data.max_examples or random_world.DEV_EXAMPLES
        examples = random_world.random_dev_examples(d.name, vocab, data.max_length, count, recipe.seed)
        held = round(data.heldout_fraction * count)
        sets.append(DevSet(name=d.name, weight=d.weight, fit=examples[held:], heldout=examples[:held]))
    return sets


def check_shard(recipe: Recipe) -> None:
    """``model.shard: fsdp`` refused in one line where it cannot run (before anything is loaded)."""
    from mergeopt.plan import check_shard_division, check_shard_recipe

    if recipe.model.shard == "none":
        return
    check_shard_recipe(recipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        raise UserError(
            "model.shard fsdp shards the stack over the processes of a torchrun job: start it with "
            "torchrun --nproc_per_node=N (N >= 2), or set model.shard=none"
        )
    check_shard_division(recipe, world_size)


def _shard(recipe: Recipe) -> tuple[int, int] | None:
    """(rank, world size) when this rank keeps 1/N of every matrix (``model.shard: fsdp``), else None."""
    return distributed.process_rank_and_size() if recipe.model.shard == "fsdp" else None


def _sharded(recipe: Recipe, stack: TaskVectorStack) -> None:
    """With ``model.shard: fsdp``, each rank keeps its rows of the LoRA factors kept low-rank too
    (the dense matrices were sharded as they were stacked)."""
    if recipe.model.shard == "fsdp" and stack.lowrank is not None:
        from mergeopt.sharded_merge import shard_lowrank

        shard_lowrank(stack.lowrank, *distributed.process_rank_and_size())


def load_problem(recipe: Recipe, progress: bool = True) -> Problem:
    """Check checkpoints and dev sets first (cheap), then load θ0 and stack the experts."""
    check_shard(recipe)
    device = distributed.local_device(resolve_device(recipe.device))
    from mergeopt.random_world import is_random

    if is_random(recipe.model.base):
        if any(t.kind != "loss" for t in objective_terms(recipe)):
            raise UserError("a random:// world has no text: its objective can only be dev losses")
        model, stack, config = _random_world(recipe, device, progress, _shard(recipe))
        sets = _random_dev_sets(recipe, config.get_text_config().vocab_size)
        weights = loss_set_weights(recipe)
        chunk = _loss_chunk(recipe, model, print if progress else (lambda _m: None))
        return Problem(model, stack, sets, weights, 0, input_device(model), None, chunk)
    experts, tokenizer = _open_checked(recipe)
    data = recipe.data
    sets = load_dev_sets(recipe, tokenizer)
    if all(t.kind == "loss" for t in objective_terms(recipe)):
        set_weights = loss_set_weights(recipe)  # the loss the gradient strategy descends
    else:  # metrics: the dev loss is still reported, weighted as data.target says
        set_weights = torch.tensor(
            [d.weight if data.target in ("all", d.name) else 0.0 for d in data.dev], dtype=torch.float32
        )
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    model, stack = _stack_experts(recipe, experts, device, progress, _shard(recipe))
    _sharded(recipe, stack)
    chunk = _loss_chunk(recipe, model, print if progress else (lambda _m: None))
    return Problem(model, stack, sets, set_weights, pad_id, input_device(model), tokenizer, chunk)


def _losses(problem: Problem, weights: torch.Tensor, batch_size: int) -> dict:
    """Target and per-set losses over the whole dev sets and over their held-out parts."""
    args = (problem.model, problem.stack, weights, problem.sets)
    kwargs = {
        "batch_size": batch_size,
        "pad_id": problem.pad_id,
        "device": problem.device,
        "loss_chunk": problem.loss_chunk,
    }
    fit_s, fit_c = evaluate_sums(*args, "fit", **kwargs)
    held_s, held_c = evaluate_sums(*args, "heldout", **kwargs)
    all_means = (fit_s + held_s) / (fit_c + held_c).clamp_min(1)
    ones = torch.ones_like(all_means)
    out = {
        "dev": float(target_loss(all_means, ones, problem.set_weights)),
        "per_set": {s.name: float(v) for s, v in zip(problem.sets, all_means)},
        "heldout": None,
    }
    if all(c > 0 for c, a in zip(held_c.tolist(), problem.set_weights.tolist()) if a > 0):
        out["heldout"] = float(target_loss(held_s / held_c.clamp_min(1), ones, problem.set_weights))
    return out


def _checkpoint(recipe: Recipe, resume: str) -> tuple[RunState, bool]:
    """The run's checkpoint and whether this run resumes it (``resume``: auto, require or restart)."""
    checkpoint = RunState(recipe.output_dir, recipe_tree(recipe))
    if resume not in ("auto", "require", "restart"):
        raise ValueError(f"resume must be auto, require or restart, not {resume!r}")
    found = distributed.all_gather_objects(resume != "restart" and checkpoint.exists())
    if any(found) and not all(found):  # ranks on other nodes see another output_dir
        missing = ", ".join(str(r) for r, seen in enumerate(found) if not seen)
        raise UserError(
            f"{checkpoint.dir}: the checkpoint is seen by some ranks and not by rank(s) {missing}: "
            "under torchrun over several nodes, output_dir must be on a filesystem every node mounts"
        )
    if not found[0]:
        if resume == "require":
            raise UserError(f"--resume: {checkpoint.dir} holds no checkpoint to resume")
        return checkpoint, False
    checkpoint.check_matches()
    return checkpoint, True


def _replace_previous_run(output_dir: Path, log: Callable[[str], None]) -> None:
    """A new run: the previous run's finish marker goes first, so the directory never looks finished."""
    if (output_dir / "mixture.json").is_file():
        log(f"replacing the finished run in {output_dir}")
        (output_dir / "mixture.json").unlink()


def fit(
    recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print, resume: str = "auto"
) -> dict:
    """Run the whole fit and write the run directory; returns the content of mixture.json.

    A checkpoint in ``recipe.output_dir`` from the same recipe is resumed (``resume``: ``auto``;
    ``require`` insists on one, ``restart`` ignores it). SIGINT/SIGTERM save the state and raise
    :class:`mergeopt.resume.Interrupted`.
    """
    with interruptible():
        return _fit(recipe, progress, log, resume)


def _fit(recipe: Recipe, progress: bool, log: Callable[[str], None], resume: str) -> dict:
    determinism.apply(recipe.deterministic)  # before anything runs on the GPU
    torch.manual_seed(recipe.seed)
    distributed.init_from_env(resolve_device(recipe.device))
    if not distributed.is_main():
        log, progress = (lambda _m: None), False
    with distributed.main_first():  # one rank builds a world into the cache, the others reuse it
        resolved, world_roots = worlds.resolve_recipe(recipe, log)
    if resolved.rank.grid is not None:  # a bad grid table is reported before any work
        from mergeopt.proxy import check_truth, read_grid

        check_truth(read_grid(resolved.rank.grid, resolved.expert_names), resolved, resolved.rank.grid)
    checkpoint, resuming = _checkpoint(recipe, resume)  # a mismatched checkpoint is refused before loading
    problem = load_problem(resolved, progress)
    if resuming:
        log(f"resuming from {checkpoint.dir}")
    else:  # the previous run's outputs are replaced when this run first saves its state
        checkpoint.start_lazily(lambda: _replace_previous_run(Path(recipe.output_dir), log))
    try:
        return _search_and_write(recipe, resolved, problem, checkpoint, progress, log, world_roots)
    except UserError:
        if not resuming and distributed.is_main():  # a user error writes nothing: undo this run's state
            checkpoint.clear()
            out = Path(recipe.output_dir)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def _search_and_write(recipe, resolved, problem, checkpoint, progress, log, world_roots) -> dict:
    """The search, the closing evaluations and the run directory, once the problem is loaded."""
    names = problem.stack.expert_names
    stack = problem.stack
    log(
        f"stacked {len(stack.deltas)} tensors ({stack.num_stacked_parameters():,} parameters x {len(names)} experts, "
        f"{stack.nbytes() / 2**20:,.1f} MiB) on {problem.device}; "
        f"{len(stack.excluded)} excluded, {len(stack.unchanged) + len(stack.shared)} equal in every expert"
        + (
            f"; {len(stack.lowrank.modules)} modules with LoRA experts kept low-rank"
            if stack.lowrank is not None
            else ""
        )
    )
    search = resolved.search
    if search.strategy == "gradient":
        z0 = initial_logits(names, resolved.weights.init, resolved.weights.temperature)
        result = fit_gradient(
            problem.model,
            stack,
            problem.sets,
            problem.set_weights,
            resolved.optim,
            resolved.weights.temperature,
            z0,
            resolved.seed,
            problem.pad_id,
            problem.device,
            progress=progress,
            checkpoint=checkpoint,
            loss_chunk=problem.loss_chunk,
        )
        chosen, trace = result.weights, result.trace
        search_info = {
            "steps": result.steps_run,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
        }
    else:
        from mergeopt.zero_order import report_scores, run_search, utility_of

        found, evaluator, utility = run_search(problem, resolved, progress, checkpoint)
        evaluator_processes = distributed.process_rank_and_size()[1]
        chosen, trace = torch.tensor(found.weights, dtype=torch.float64), found.log
        scores = report_scores(problem, resolved, evaluator, found.weights)
        search_info = {
            "evaluations": found.evaluations,
            "budget": search.budget,
            "value": found.value,
            "heldout_value": utility_of(utility, scores["fitted"]["heldout"]),
            # under torchrun the ranks split the candidates, or (a sharded stack) score each together
            "scoring": "together"
            if evaluator.together
            else ("split" if evaluator_processes > 1 else "single"),
            "evaluations_per_process": evaluator.per_process(evaluator_processes),
            **{k: v for k, v in found.info.items() if k != "strategy"},
        }

    batch = resolved.optim.eval_batch_size
    fitted = _losses(problem, chosen, batch)
    uniform = _losses(problem, torch.full((len(names),), 1.0 / len(names)), batch)
    singles = {n: _losses(problem, torch.eye(len(names))[i], batch) for i, n in enumerate(names)}
    weights = as_mapping(names, chosen.double() / chosen.double().sum())
    mixture = {
        "status": "complete",
        "weights": weights,
        "target": resolved.data.target,
        "dev_loss": fitted["dev"],
        "heldout_loss": fitted["heldout"],
        "uniform_dev_loss": uniform["dev"],
        "uniform_heldout_loss": uniform["heldout"],
        "expert_dev_loss": {n: singles[n]["dev"] for n in names},
        "expert_heldout_loss": {n: singles[n]["heldout"] for n in names},
        "per_set_dev_loss": {
            "fitted": fitted["per_set"],
            "uniform": uniform["per_set"],
            **{f"{n} only": singles[n]["per_set"] for n in names},
        },
        "strategy": search.strategy,
        "search": search_info,
        "method": stack.method,
        "objective": {
            "terms": [
                t.model_dump(exclude_none=True) | {"label": t.label} for t in objective_terms(resolved)
            ],
            "normalize": resolved.objective.normalize,
        },
        "seed": resolved.seed,
        "device": str(problem.device),
        "processes": distributed.process_rank_and_size()[1],
        "shard": resolved.model.shard,  # fsdp: each rank held 1/N of the stack's matrices
        "stack": {
            "tensors": len(stack.deltas),
            "parameters": stack.num_stacked_parameters(),
            "bytes": stack.nbytes(),
            "excluded": len(stack.excluded),
            "unchanged": len(stack.unchanged),
            "shared": len(stack.shared),
            "lowrank_modules": len(stack.lowrank.modules) if stack.lowrank is not None else 0,
            "dtypes": {  # storage, fit steps, loss evaluations (mergeopt.eval_dtype)
                "stack": resolved.model.stack_dtype,
                "compute": str(stack.compute_dtype).removeprefix("torch."),
                "evaluation": str(stack.eval_dtype or stack.compute_dtype).removeprefix("torch."),
            },
        },
        "worlds": {name: str(root) for name, root in world_roots.items()},
        "mergeopt_version": mergeopt.__version__,
    }  # no timings: the same recipe and seed give a byte-identical mixture.json
    if search.strategy == "gradient":
        mixture["temperature"] = resolved.weights.temperature
        mixture["logits"] = as_mapping(names, result.logits)
    else:
        mixture["objective"]["scores"] = scores
    if not all(math.isfinite(v) for v in weights.values()):
        raise RuntimeError(f"fit produced non-finite weights {weights}")
    if resolved.rank.grid is not None:
        from mergeopt.rank import rank_grid
        from mergeopt.rank import write_outputs as write_rank_outputs

        report, pairs, _ = rank_grid(resolved, resolved.rank.grid, problem, mixture, progress)
        target = report["metrics"]["target"]
        mixture["rank"] = {
            "grid": resolved.rank.grid,
            "n_mixtures": report["n_mixtures"],
            **{key: target[key] for key in ("spearman", "kendall", "pairwise_accuracy", "regret")},
            "fitted_regret": report["fitted_mixture"]["regret"],
        }
        if distributed.is_main():
            from mergeopt.proxy import read_grid

            grid = read_grid(resolved.rank.grid, names)[[f"w_{n}" for n in names]]
            write_rank_outputs(report, pairs, recipe.output_dir, grid)
    if distributed.is_main():  # under torchrun every rank holds the same result; rank 0 writes it
        write_outputs(recipe, mixture, trace, names)
        checkpoint.clear()  # finished: mixture.json is the record now
    return mixture


def write_outputs(recipe: Recipe, mixture: dict, trace: Sequence[dict], names: Sequence[str]) -> Path:
    """Write the run directory; mixture.json goes last, so its presence means the run finished."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", recipe_to_yaml(recipe))
    if mixture["strategy"] == "gradient":
        columns = ["step", "loss", "heldout_loss", *(f"w_{n}" for n in names)]
        write_csv_atomic(out / "trace.csv", trace, columns)
        plot_loss_curve(trace, names, out / "loss_curve.png", title=f"mergeopt fit: {out.name}")
    else:
        from mergeopt.zero_order import evaluation_columns

        write_csv_atomic(out / "evaluations.csv", trace, evaluation_columns(names, trace))
        title = f"mergeopt fit ({mixture['strategy']}): {out.name}"
        plot_search_curve(trace, names, out / "search_curve.png", "objective value (lower is better)", title)
    from mergeopt.run_report import write_report

    write_report(out, mixture)  # simplex.png and report.md, from the files above and the mixture
    write_json_atomic(out / "mixture.json", mixture)
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergeopt.fit",
        description="Fit data-mixture weights by optimizing a merge of per-domain experts.",
        epilog="Example: python -m mergeopt.fit recipes/tiny.yaml optim.lr=0.1 output_dir=/tmp/run",
    )
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.steps=50"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in output_dir (an error if there is none)",
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore a checkpoint in output_dir and start over"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan from config.json and safetensors headers (no weights read, nothing written)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --dry-run: plan per rank for a torchrun job of N processes (default: WORLD_SIZE, else 1)",
    )
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    if args.world_size is not None and not args.dry_run:
        raise UserError("--world-size plans a --dry-run; a fit takes its world size from torchrun")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from mergeopt.dry_run import dry_run

        print(dry_run(recipe, args.recipe, args.world_size))
        return 0
    if args.resume and args.restart:
        raise UserError("--resume and --restart contradict each other")
    log = (lambda _msg: None) if args.quiet else print
    mode = "require" if args.resume else "restart" if args.restart else "auto"
    try:
        mixture = fit(recipe, progress=not args.quiet, log=log, resume=mode)
    except Interrupted as stop:
        if distributed.is_main():
            print(
                f"mergeopt: interrupted ({stop}); the state is saved in {Path(recipe.output_dir) / CHECKPOINT_DIR}. "
                f"Rerun the same command to continue (or add --resume).",
                file=sys.stderr,
            )
        return stop.exit_code
    if distributed.is_main():
        print(summary(mixture, recipe.output_dir, output_files(recipe)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
