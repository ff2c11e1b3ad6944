"""mergekit: the merge itself as a mergekit YAML (``mergekit-yaml CONFIG OUT``).

Followed: mergekit 0.1.5 (the release installed here): mergekit/config.py ``MergeConfiguration``
(``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``, ``dtype``;
a parameter may be a list of ``{filter, value}`` whose filter is a substring of tensor names) and
mergekit/merge_methods/generalized_task_arithmetic.py with its registrations in
merge_methods/registry.py: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties`` take
per-model ``weight`` and ``density`` and shared ``normalize``, ``rescale``, ``lambda``, and compute
base + lambda · Σ_i weight_i · delta_i (divided by Σ weights when ``normalize``).

Mapping: mergeopt's linear merge θ0 + λ Σ w_i τ_i is ``task_arithmetic`` with the base as
``base_model``, ``weight`` w_i, ``normalize: false`` and ``lambda`` λ: the same model (mergekit's
``linear`` has no base and no λ). ties/dare_linear/dare_ties map to the methods of the same name
with ``density``, ``lambda`` λ and ``normalize: false``, but they are mergekit's variants, not
mergeopt's: mergekit elects the sign from the weighted deltas and does not divide by the number
of agreeing experts (mergeopt, like peft, elects from the unweighted trimmed vectors and takes the
disjoint mean), rescales DARE's survivors by an L1 ratio instead of 1/density, and draws its own
masks — so mergekit's model is not the one fit scored (how far apart they are was not measured),
and a note says so.
Refused, with the reason: ``majority_sign: frequency`` (mergekit's TIES has only the summed-value
election), a GGUF base, exclusion patterns that are not plain names (mergekit filters are
substrings, not regexes). M³ mixup is folded into the weights (c = w·λ / Σ w·λ, the recorded draw).
PEFT LoRA experts are written ``BASE+ADAPTER``, which mergekit merges into the base first, in the
directory its ``--lora-merge-cache`` names (mergekit/common.py ``ModelReference.merged`` raises
"Need to specify cache dir to merge adapters" without one): the header's ``mergekit-yaml`` command
passes it.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import TYPE_CHECKING

import yaml

from mergeopt.errors import UserError
from mergeopt.export.formats.base import Context, Format
from mergeopt.export.mixture_input import resolve_world_path
from mergeopt.loading.peft_format import is_adapter

if TYPE_CHECKING:
    from mergeopt.config import Recipe

METHODS = {
    "linear": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
}
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def coefficients(ctx: Context) -> dict[str, float]:
    """The merge coefficients: the weights, or with M³ mixup w·λ / Σ w·λ (mergeopt.merging.methods.mixup)."""
    weights = ctx.mixture.weights
    lam = ctx.mixture.method.get("mixup_lambda")
    if ctx.mixture.method.get("mixup_alpha") is None or lam is None:
        return dict(weights)
    if len(lam) != len(weights):
        raise UserError(
            f"{ctx.mixture.path}: method.mixup_lambda has {len(lam)} entries for {len(weights)} experts"
        )
    scaled = {n: w * float(x) for (n, w), x in zip(weights.items(), lam)}
    total = math.fsum(scaled.values())
    return {n: v / total for n, v in scaled.items()}


def _model_path(raw: str, ctx: Context, base: str) -> str:
    path = resolve_world_path(raw, ctx.mixture, ctx.recipe)
    if is_adapter(path):
        return f"{base}+{path}"  # a PEFT LoRA adapter: mergekit merges it into the base first
    return path


def run_command(ctx: Context, recipe: Recipe) -> list[str]:
    """The comment lines with the ``mergekit-yaml`` command that merges this file. LoRA experts
    need ``--lora-merge-cache``: mergekit merges each adapter into the base there first, and
    without it stops with "Need to specify cache dir to merge adapters"."""
    words = ["mergekit-yaml", ctx.written_to(FORMAT), "OUTPUT_DIR"]
    lines = []
    adapters = [
        n
        for n in ctx.mixture.names
        if is_adapter(resolve_world_path(recipe.model.experts[n], ctx.mixture, recipe))
    ]
    if adapters:
        words += ["--lora-merge-cache", "LORA_CACHE_DIR"]
        lines.append(
            f"# {', '.join(adapters)}: PEFT LoRA adapters, written BASE+ADAPTER; mergekit merges each into the "
            "base in --lora-merge-cache first (without it: 'Need to specify cache dir to merge adapters')"
        )
    if recipe.model.trust_remote_code:
        words.append("--trust-remote-code")
        lines.append("# the recipe trusts remote code: so does the command, with --trust-remote-code")
    return [*lines, f"# merge with: {shlex.join(words)}"]


def render(ctx: Context) -> str:
    recipe = ctx.recipe
    if ctx.recipe_error is not None:
        raise ctx.recipe_error
    if recipe is None:
        raise UserError(
            f"mergekit needs the run's recipe.yaml beside {ctx.mixture.path} (for the base and expert paths)"
        )
    method = ctx.mixture.method
    name = method.get("name", "linear")
    _check_mergeable(ctx, recipe, name, method)
    base = resolve_world_path(recipe.model.base, ctx.mixture, recipe)
    coeffs = coefficients(ctx)
    config = {
        "merge_method": METHODS[name],
        "base_model": base,
        "models": _models(ctx, recipe, name, method, coeffs, base),
        "parameters": _shared_parameters(name, method),
        "dtype": "float32",
    }
    lines = [ctx.header(FORMAT), *_comments(ctx, recipe, name, method, coeffs)]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


def _check_mergeable(ctx: Context, recipe: Recipe, name: str, method: dict) -> None:
    """Refuse, in one line, what mergekit cannot merge as the fit scored it."""
    if name not in METHODS:
        raise UserError(f"{ctx.mixture.path}: merge method {name!r} has no mergekit equivalent")
    unknown = [n for n in ctx.mixture.names if n not in recipe.model.experts]
    if unknown:  # a mixture.json from another run beside this recipe.yaml: no checkpoint to name
        raise UserError(
            f"{ctx.mixture.path} names {unknown[0]!r}, which is not an expert of the recipe.yaml beside it "
            f"({', '.join(recipe.model.experts)}), so mergekit would have no checkpoint for it"
        )
    if name in ("ties", "dare_ties") and method.get("majority_sign", "total") != "total":
        raise UserError(
            f"merge.majority_sign {method.get('majority_sign')!r} has no mergekit equivalent "
            "(mergekit's TIES elects the sign by summed values only: 'total')"
        )
    if recipe.model.gguf_file:
        raise UserError(f"mergekit cannot read the GGUF base {recipe.model.gguf_file} (model.gguf_file)")
    from mergeopt.worlds.random_world import is_random  # imports torch: not at module level (--help)

    if is_random(recipe.model.base):
        raise UserError(
            f"mergekit merges checkpoints on disk, and {recipe.model.base} is a random:// world "
            "(seeded weights, no files): export a fit of real experts"
        )
    odd = [p for p in recipe.model.exclude if not PLAIN_NAME.fullmatch(p)]
    if odd:
        raise UserError(
            f"model.exclude pattern {odd[0]!r} is a regex; mergekit filters only by substring "
            "(use plain names like 'embed_tokens')"
        )


def _models(
    ctx: Context, recipe: Recipe, name: str, method: dict, coeffs: dict[str, float], base: str
) -> list[dict]:
    """mergekit's ``models``: each expert's path and its weight (0 on the excluded tensors)."""
    models = []
    for expert in ctx.mixture.names:
        weight: float | list = coeffs[expert]
        if recipe.model.exclude:  # kept at θ0: weight 0 on those tensors, for every expert
            weight = [{"filter": p, "value": 0.0} for p in recipe.model.exclude] + [{"value": coeffs[expert]}]
        parameters: dict = {"weight": weight}
        if name != "linear":
            parameters["density"] = float(method.get("density", 0.5))
        models.append(
            {"model": _model_path(recipe.model.experts[expert], ctx, base), "parameters": parameters}
        )
    return models


def _shared_parameters(name: str, method: dict) -> dict:
    """mergekit's top-level ``parameters``: no normalisation, λ = merge.scale, DARE's rescaling."""
    shared: dict = {"normalize": False, "lambda": float(method.get("scale", 1.0))}
    if name.startswith("dare"):
        shared["rescale"] = True
    return shared


def _comments(ctx: Context, recipe: Recipe, name: str, method: dict, coeffs: dict[str, float]) -> list[str]:
    """The config's comments: M3's drawn coefficients, how far mergekit's method is the one the fit
    scored (also a note for the terminal), and the flags mergekit-yaml needs."""
    lines = []
    if coeffs != ctx.mixture.weights:
        drawn = ", ".join(f"{n} {c:.6g}" for n, c in coeffs.items())
        lines.append(f"# M3 mixup: the weights are the coefficients w*lambda/sum(w*lambda): {drawn}")
    if name == "linear":
        lines.append("# task_arithmetic with normalize false and lambda = merge.scale: the merge fit scored")
    else:
        differences = {
            "ties": "elects signs from the weighted deltas and skips the disjoint mean",
            "dare_linear": "rescales DARE's survivors by an L1 ratio, not 1/density, and draws its own masks",
            "dare_ties": "elects signs from the weighted deltas, skips the disjoint mean, rescales DARE's "
            "survivors by an L1 ratio and draws its own masks",
        }
        note = (
            f"mergekit's {METHODS[name]} is not mergeopt's: it {differences[name]}; "
            "its model is not the one fit scored"
        )
        lines.append(f"# {note}")
        ctx.notes.append(note)
        if method.get("seed") is not None and name.startswith("dare"):
            lines.append(
                f"# mergeopt's masks came from seed {method['seed']}; mergekit's --random-seed fixes its own"
            )
    return lines + run_command(ctx, recipe)


FORMAT = Format(
    name="mergekit",
    filename="mergekit.yaml",
    unit=None,
    needs_paths=False,
    meaning="weight: each expert's merge coefficient (the fitted mixture); lambda: the task-vector scale.",
    render=render,
)
