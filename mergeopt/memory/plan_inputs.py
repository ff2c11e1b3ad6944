"""The inputs ``mergeopt plan`` reads by path, and what the fit would refuse of them.

A plan reads no weight and builds nothing, so a world's checkpoint path is resolved inside the
cache only when the world is built, and the dev sets, the chat template, the grid and the output
directory are checked as the fit checks them: a plan made on a login node tells the user now
what the fit would refuse after an hour in the queue.
"""

from __future__ import annotations

from pathlib import Path

from mergeopt import inputs, worlds
from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.inputs import existing_file, writable_dir


def world_path(path: str, recipe: Recipe) -> str:
    """A tiny:// or smollm2:// checkpoint path inside the cache; a missing world is refused, not built."""
    name = worlds.scheme_of(path)
    if name is None:
        return path
    root = worlds.world_dir(name, recipe.world.cache_dir, recipe.world.seed)
    if not (root / worlds.MARKER).is_file():
        # a cache that is a file, or cannot be written, is said as the run would say it, not as a
        # world the run would build there
        inputs.writable_dir(root.parent, worlds.cache_source(recipe.world.cache_dir))
        raise UserError(
            f"{path}: the {name} world is not built yet and a plan builds nothing (mergeopt fit of "
            f"this recipe, without --dry-run, builds it into {root})"
        )
    return str(root / path.partition("://")[2])


def refused_inputs(recipe: Recipe) -> list[str]:
    """What the fit of this recipe would refuse before any work, that the plan itself does not need:
    the dev sets that cannot be read as the fit reads them (missing, or a malformed record; a
    ``save_to_disk`` directory is one), conversations with no chat template to render them (neither
    ``data.chat_template`` nor the base's tokenizer files hold one), a custom objective term whose
    function does not import, a rank.grid that is not a file, an output_dir that cannot be written.

    A plan is often made before the data is in place (recipes/8b.yaml's placeholders), so these are
    warnings under the plan, not errors: the plan still answers the memory question, and the user
    hears now, not an hour of loading later, what the fit will say."""
    from mergeopt.objectives.chat import is_chat
    from mergeopt.objectives.data import read_records
    from mergeopt.worlds.random_world import is_random

    problems, chat = [], []
    for dev in (d for d in recipe.data.dev if not is_random(d.path)):
        what = f"dev set {dev.name!r}"
        try:
            records = read_records(world_path(dev.path, recipe), what)
        except UserError as err:
            problems.append(str(err))
            continue
        if any(is_chat(r) for r in records):
            chat.append(what)
    problems.extend(_term_problems(recipe))
    checks = [(existing_file, recipe.rank.grid, "rank.grid")] if recipe.rank.grid is not None else []
    checks.append((writable_dir, recipe.output_dir, "output_dir"))
    for check, path, what in checks:
        try:
            check(world_path(path, recipe), what)
        except UserError as err:
            problems.append(str(err))
    if chat:
        problems.extend(_template_problem(recipe, chat))
    return problems


def _term_problems(recipe: Recipe) -> list[str]:
    """A custom objective term's function that does not import, and an lm_eval term whose task is
    not in lm-eval's index (or lm-eval is not installed), as the fit would say them. The task is
    looked up in the index only, not built: building loads its dataset, which the fit does."""
    from mergeopt.objectives.metrics import load_metric_function

    problems = []
    for term in recipe.objective.terms:
        try:
            if term.kind == "custom":
                load_metric_function(term.function)
            elif term.kind == "lm_eval":
                from mergeopt.objectives.lm_eval_term import check_task

                check_task(term)
        except UserError as err:
            problems.append(str(err))
    return problems


def _template_problem(recipe: Recipe, chat: list[str]) -> list[str]:
    """The fit's refusal of conversations without a chat template, read from files only: the
    template data.chat_template names, else the base directory's tokenizer files (a hub id or a
    GGUF base, whose template is in its metadata, is not checked here)."""
    from mergeopt.objectives.chat import read_template

    if recipe.data.chat_template is not None:
        try:
            read_template(recipe.data.chat_template)
        except UserError as err:
            return [str(err)]
        return []
    try:
        base = Path(world_path(recipe.model.base, recipe))
    except UserError:  # a world not built yet: the plan says so already
        return []
    if recipe.model.gguf_file or not base.is_dir():
        return []
    try:
        read_template(str(base))
    except UserError:
        return [
            f"{', '.join(chat)} holds conversations, and the base's tokenizer has no chat template "
            f"(chat_template.jinja or tokenizer_config.json's chat_template in {base}): set "
            "data.chat_template to a Jinja file or to a directory whose tokenizer has one"
        ]
    return []
