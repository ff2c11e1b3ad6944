"""Which torchrun world sizes a recipe can run on: what ``model.shard: fsdp`` needs of the ranks and
of the recipe, refused in one line by the fit and the dry run alike.
"""

from __future__ import annotations

import math

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.memory.phases import training_batch


def check_shard_division(recipe: Recipe, world_size: int) -> None:
    """With ``model.shard: fsdp`` and the gradient strategy, the micro-batch must split evenly over
    the ranks (each rank takes every N-th example); a :class:`UserError` naming the numbers and a
    batch size that does, if not."""
    if recipe.model.shard != "fsdp" or recipe.search.strategy != "gradient" or world_size < 2:
        return
    micro, size = training_batch(recipe), recipe.optim.batch_size
    if micro % world_size == 0:
        return
    sets = micro // size
    step = world_size // math.gcd(world_size, sets)  # batch sizes that split evenly: multiples of it
    fix = -(-size // step) * step
    raise UserError(
        f"model.shard fsdp over {world_size} ranks: a micro-batch of {micro} examples (optim.batch_size "
        f"{size} × {sets} dev set{'s' * (sets > 1)}) does not split evenly over the ranks; use an "
        f"optim.batch_size that makes it a multiple of {world_size} (optim.batch_size={fix}: "
        f"{fix * sets // world_size} per rank) or a world size that divides {micro}"
    )


def check_shard_recipe(recipe: Recipe) -> None:
    """What ``model.shard: fsdp`` cannot run with, whatever the ranks: refused in one line (the
    fit and the dry run alike)."""
    if recipe.model.device_map is not None:
        raise UserError("model.shard fsdp and model.device_map both place the stack: use one of them")
    if recipe.model.gguf_file:
        raise UserError(
            "model.shard fsdp reads each rank's rows of the base from safetensors, and a GGUF base "
            "(model.gguf_file) is read whole: convert it to safetensors, or set model.shard=none"
        )


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """The ranks a plan is for, refused in one line where ``model.shard: fsdp`` cannot run on them
    (as :func:`mergeopt.loading.problem.check_shard` refuses the fit)."""
    if world_size < 1:
        raise UserError(f"the world size must be at least 1, not {world_size}")
    if recipe.model.shard != "fsdp":
        return
    check_shard_recipe(recipe)
    if world_size < 2:
        raise UserError(
            "model.shard fsdp shards the stack over the processes of a torchrun job: plan it with "
            "--world-size N (N >= 2; or WORLD_SIZE in the environment), or set model.shard=none"
        )
    check_shard_division(recipe, world_size)
