"""Which mixture ``mergeopt merge`` writes, and that it belongs to the recipe's checkpoints.

A mixture's weights mean something only for the merge fit scored: the same method, options and
seed (mixture.json's ``method``), the same exclusions and stack dtype (the run's recipe.yaml), the
same stack layout (mixture.json's ``stack``) and the same checkpoints under each name (the run's
recipe.yaml again). Each check here refuses, in one line, a recipe that would write some other
model under the fitted weights; :mod:`mergeopt.export.merge` runs them before any weight is read.
``--weights`` on the command line is parsed and put on the simplex here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergeopt import worlds
from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.merging.methods import get_method
from mergeopt.merging.simplex import snap_roundoff, sum_problem, weight_problem
from mergeopt.merging.stack import describe
from mergeopt.run_files import MixtureFile
from mergeopt.runtime.fingerprint import digest

# the merge fields of mixture.json's "method" record, and the recipe key that sets each
METHOD_KEYS = {
    "name": "merge.method",
    "scale": "merge.scale",
    "density": "merge.density",
    "majority_sign": "merge.majority_sign",
    "mixup_alpha": "merge.mixup_alpha",
    "mixup_lambda": "seed",
    "seed": "seed",
}


def parse_weights(text: str) -> dict[str, float]:
    """``"a=0.3,b=0.7"`` -> ``{"a": 0.3, "b": 0.7}``; a name given twice is an error, not a last-wins."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise UserError(f"--weights: {item.strip()!r} is not of the form name=weight")
        if name in weights:
            raise UserError(f"--weights names expert {name!r} twice")
        try:
            weights[name] = float(raw)
        except ValueError:
            raise UserError(f"--weights: {name}={raw!r} is not a number") from None
    return weights


def check_mixture(
    weights: Mapping[str, Any], experts: Sequence[str], source: str, normalize: bool = False
) -> dict[str, float]:
    """The weights in expert order, once each, non-negative, summing to 1 (rescaled with ``normalize``).

    The stack's anchor form θ_1 + Σ_{i≥2} w_i (θ_i − θ_1) equals the merge only on the simplex, so
    an off-simplex w would silently write some other model.
    """
    unknown = [n for n in weights if n not in experts]
    if unknown:
        raise UserError(f"{source} names {unknown[0]!r}, which is not an expert ({', '.join(experts)})")
    missing = [n for n in experts if n not in weights]
    if missing:
        raise UserError(
            f"{source} gives no weight for expert {missing[0]!r} (every expert needs one, 0 allowed)"
        )
    ordered = {n: weights[n] for n in experts}
    if (problem := weight_problem(ordered)) is not None:
        raise UserError(f"{source}: {problem}")
    ordered = snap_roundoff(ordered)
    total = math.fsum(float(v) for v in ordered.values())
    if normalize and total > 0:
        return {n: float(v) / total for n, v in ordered.items()}
    if (problem := sum_problem(ordered)) is not None:
        hint = "" if normalize else "; pass --normalize to rescale them"
        raise UserError(f"{source}: {problem}{hint}")
    return {n: float(v) for n, v in ordered.items()}


def check_same_merge(mixture: MixtureFile, path: Path, recipe: Recipe) -> None:
    """Refuse to write a merge other than the one fit scored at this mixture.

    mixture.json records the merge (method, options, seed, mixup draw); the run's recipe.yaml beside
    it records the exclusions and the stack dtype; the expert order fixes DARE's masks and the mixup
    draw. Runs from before merge methods existed record no method: they were linear at scale 1.
    """
    fitted = json.loads(json.dumps(mixture.method or {"name": "linear", "scale": 1.0}))
    ours = json.loads(json.dumps(describe(recipe.merge, len(recipe.expert_names), recipe.seed)))
    for key in [*ours, *(k for k in fitted if k not in ours)]:
        if fitted.get(key) != ours.get(key):
            field = METHOD_KEYS.get(key, f"merge.{key}")
            values = (
                ""
                if key == "mixup_lambda"
                else f": {fitted.get(key)!r} in the mixture, {ours.get(key)!r} in the recipe"
            )
            raise UserError(
                f"{path} was fitted with a different merge than the recipe describes ({field}{values}); "
                "make the recipe match so the written model is the one fit scored"
            )
    order_matters = get_method(recipe.merge.method).random or recipe.merge.mixup_alpha is not None
    if order_matters and mixture.names != recipe.expert_names:
        raise UserError(
            f"{path} lists the experts as {', '.join(mixture.names)} but the recipe as "
            f"{', '.join(recipe.expert_names)}; the order sets DARE's masks and the mixup draw, so list "
            "model.experts in the fitted order"
        )
    _check_run_recipe(path.parent / "recipe.yaml", recipe)


@dataclass(frozen=True)
class FittedStack:
    """mixture.json's ``stack`` record and where it was read, for :func:`check_same_stack`."""

    source: Path
    record: Mapping[str, Any]


def _describe_layout(layout: Mapping[str, Any]) -> str:
    return (
        f"{layout.get('tensors', 0)} stacked tensors, {layout.get('lowrank_modules', 0)} low-rank "
        f"modules, {layout.get('unchanged', 0)} unchanged"
    )


def check_same_stack(fitted: FittedStack, layout: Mapping[str, int]) -> None:
    """The recipe's experts stack as the fitted ones did (the tensor counts of mixture.json's
    ``stack``). Names alone do not say so: a run fitted on dense experts and a recipe naming LoRA
    adapters under the same names would write a merge the fit never scored."""
    differ = [k for k, v in layout.items() if k in fitted.record and fitted.record[k] != v]
    if differ:
        raise UserError(
            f"{fitted.source} was fitted on other experts than the recipe names ({_describe_layout(fitted.record)} "
            f"there, {_describe_layout(layout)} here); merge with the recipe the run was fitted with, its recipe.yaml"
        )


def _check_run_recipe(path: Path, recipe: Recipe) -> None:
    """model.exclude and model.stack_dtype change the merge but are not in mixture.json: compare them."""
    if not path.is_file():
        return
    try:
        run = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # not a recipe we can read: nothing to compare with
    run_model = run.get("model") if isinstance(run, dict) else None
    if not isinstance(run_model, dict):
        return
    ours = {"exclude": list(recipe.model.exclude), "stack_dtype": recipe.model.stack_dtype}
    theirs = {"exclude": list(run_model.get("exclude") or []), "stack_dtype": run_model.get("stack_dtype")}
    for key, value in ours.items():
        if theirs[key] is not None and theirs[key] != value:
            raise UserError(
                f"{path} fitted with model.{key} {theirs[key]!r} but the recipe has {value!r}; "
                "make the recipe match so the written model is the one fit scored"
            )
    _check_run_checkpoints(path, run, recipe)


def _same_checkpoint(fitted: Any, ours: str, fitted_world: Mapping[str, Any], recipe: Recipe) -> bool:
    """Whether two recipe paths name the same checkpoint, as far as this machine can tell: equal
    paths, one directory, or copies with equal contents (:mod:`mergeopt.runtime.fingerprint`).
    A world path (``tiny://``) is compared as its place in the world cache (the run's world section
    for the run's path, the recipe's for ours), so a run over a trained copy of the world's experts
    and a recipe naming the world's own are told apart. A path that is not here (a hub name, a
    checkpoint moved since the fit, a world not built) cannot be compared and passes."""
    if not isinstance(fitted, str) or fitted == ours:
        return True
    if worlds.scheme_of(fitted) and worlds.scheme_of(ours):
        return False  # the same seed (checked before): two names in one world, two checkpoints
    a = _world_place(fitted, fitted_world) if worlds.scheme_of(fitted) else Path(fitted)
    b = _world_place(ours, recipe.world.model_dump()) if worlds.scheme_of(ours) else Path(ours)
    if not (a.exists() and b.exists()):
        return True
    return a.resolve() == b.resolve() or digest(a) == digest(b)


def _run_world(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's recipe.yaml ``world`` section (empty when it has none: the defaults, seed 0)."""
    world = run.get("world")
    return world if isinstance(world, dict) else {}


def _world_place(path: str, world: Mapping[str, Any]) -> Path:
    """Where a world path's checkpoint lies in the cache, built or not (nothing is built here)."""
    seed = world.get("seed", 0)
    root = worlds.world_dir(
        worlds.scheme_of(path), world.get("cache_dir"), seed if isinstance(seed, int) else 0
    )
    return root / path.partition("://")[2]


def _check_run_sources(path: Path, run: Mapping[str, Any], recipe: Recipe) -> None:
    """What else than a path says which weights a name reads: the GGUF file inside model.base (one
    GGUF repository holds several quantizations of a base) and, for world paths (``tiny://``),
    world.seed (each seed builds its own experts under the same names)."""
    run_model = run["model"]
    if "gguf_file" in run_model and run_model["gguf_file"] != recipe.model.gguf_file:
        raise UserError(
            f"the run's {path} read model.base from the GGUF file {run_model['gguf_file']!r}, but the "
            f"recipe's model.gguf_file is {recipe.model.gguf_file!r}, another checkpoint: the mixture's "
            "weights belong to the checkpoints it was fitted on; name those (the run's recipe.yaml does)"
        )
    seed = _run_world(run).get("seed", 0)
    paths = [recipe.model.base, *recipe.model.experts.values()]
    if seed != recipe.world.seed and any(worlds.scheme_of(p) for p in paths):
        raise UserError(
            f"the run's {path} built its world checkpoints with world.seed {seed}, but the recipe has "
            f"world.seed {recipe.world.seed}, whose world has other experts under the same names; set "
            f"world.seed={seed} (the run's recipe.yaml does)"
        )


def _check_run_checkpoints(path: Path, run: Mapping[str, Any], recipe: Recipe) -> None:
    """The recipe's base and each expert are the checkpoints the run read under the same names.

    mixture.json's weights belong to the checkpoints, not the names: a recipe that swaps two
    experts' paths, or names another run's experts, would write a merge fit never scored.
    """
    _check_run_sources(path, run, recipe)
    run_model = run["model"]
    pairs = [("model.base", run_model.get("base"), recipe.model.base)]
    fitted = run_model.get("experts") if isinstance(run_model.get("experts"), dict) else {}
    pairs += [(f"expert {n!r}", fitted.get(n), p) for n, p in recipe.model.experts.items()]
    for what, theirs, ours in pairs:
        if not _same_checkpoint(theirs, ours, _run_world(run), recipe):
            raise UserError(
                f"the run's {path} read {what} from {theirs}, but the recipe names {ours}, another "
                "checkpoint: the mixture's weights belong to the checkpoints it was fitted on; name those "
                "(the run's recipe.yaml does)"
            )
