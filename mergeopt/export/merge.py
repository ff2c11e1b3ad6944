"""Write a merge to disk: ``python -m mergeopt.merge RECIPE --weights a=0.3,b=0.7 --out DIR``.

fit scores merges in memory and writes none; to evaluate the chosen mixture's merge with other
tools, or to ship it, it must exist as a Hugging Face checkpoint. This command builds θ(w) with the
same code as fit (:func:`mergeopt.loading.problem.load_merge`: the recipe's base, experts, exclusions,
``stack_dtype``, merge section and seed), so ``--mixture RUN/mixture.json`` writes exactly the model
fit scored; a mixture.json whose recorded merge, or whose stack's layout, differs from the
recipe's is refused.

DIR receives config.json, the weights as safetensors (sharded above 5 GB, with
model.safetensors.index.json), the base's tokenizer, and ``mergeopt_merge.json`` saying where the
checkpoint came from. With ``--as-adapter`` (every expert a LoRA adapter, linear merge) DIR
is instead one PEFT LoRA adapter over the base: per module the experts' factors side by side,
A = [A_1; …; A_K] and B = [c_1 B_1 … c_K B_K] with c_i = λ w_i s_i, so its rank there is Σ r_i and
its scaling 1 (what PEFT's ``add_weighted_adapter(combination_type="cat")`` builds), which PEFT,
vLLM and lm-eval's ``peft=`` load as they load any adapter; a module the merge changes densely
(DoRA, modules_to_save, trained biases, trainable tokens) is saved whole, as ``modules_to_save``. Everything is written into a hidden
sibling directory that is swapped with DIR at the end (:mod:`mergeopt.runtime.rundir`), so a
failure leaves nothing at DIR (and, with ``--overwrite``, the old DIR intact).

    python -m mergeopt.merge recipes/tiny.yaml --mixture runs/tiny/mixture.json --out merged/tiny
    python -m mergeopt.merge recipes/tiny.yaml --weights arith=0.1,reverse=0.5,brackets=0.3,markov=0.1 \\
        --out merged/hand --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import mergeopt
from mergeopt import worlds
from mergeopt.cli import run_command
from mergeopt.config import Recipe, load_recipe
from mergeopt.config.loading import anchor_paths
from mergeopt.errors import UserError, warn
from mergeopt.export.adapter import adapter_config, adapter_tensors, check_adapter_merge
from mergeopt.inputs import writable_dir
from mergeopt.loading.checkpoints import gguf_base, open_checkpoint
from mergeopt.merging.layer_merge import make_permanent
from mergeopt.merging.methods import get_method
from mergeopt.merging.simplex import sum_problem, weight_problem
from mergeopt.merging.stack import DTYPES, describe
from mergeopt.run_files import MixtureFile, read_finished_mixture
from mergeopt.runtime.files import file_mode
from mergeopt.runtime.fingerprint import digest
from mergeopt.runtime.rundir import owned, staged

MANIFEST = "mergeopt_merge.json"
OUT_DTYPES = ("float32", "bfloat16", "float16")
MAX_SHARD_SIZE = "5GB"
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


# ----------------------------------------------------------------------------- the mixture


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


# ----------------------------------------------------------------------------- the output directory


def check_out(out: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an existing non-empty DIR without --overwrite, and an overwrite that would delete an input."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        here = out.resolve()
        for item in inputs:
            path = Path(item).resolve()
            if path == here or here in path.parents:
                raise UserError(f"--out {out} holds the input {item}; --overwrite would delete it")


def output_dtype(choice: str | None, base_config: Mapping[str, Any]) -> str:
    """--dtype, else the base's own dtype (what its users expect to load), else float32."""
    if choice is not None:
        return choice
    recorded = base_config.get("dtype") or base_config.get("torch_dtype")
    return recorded if recorded in OUT_DTYPES else "float32"


# bytes per unit: decimal as huggingface_hub reads them (5GB = 5·10⁹), binary too (5GiB = 5·2³⁰)
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS |= {f"{unit[0]}IB": 2 ** (10 * (i + 1)) for i, unit in enumerate(SIZE_UNITS)}


def _shard_size(text: str) -> int:
    """--max-shard-size in bytes, read before the merge starts.

    Passed on as written, a binary unit (``500MiB``) reached huggingface_hub, which knows only KB to
    TB, and stopped the command with a traceback after the whole merge; so every unit is converted
    here, in either case as huggingface_hub reads its own (``5gb``).
    """
    match = re.fullmatch(r"(\d+)([KMGT]i?B)?", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size {text!r} is not a size like 5GB, 200MB, 512MiB or 100000")
    if int(match.group(1)) == 0:  # transformers would write one file per tensor
        raise UserError(f"--max-shard-size {text!r} is zero; give a size above 0, like 5GB")
    unit = (match.group(2) or "").upper()
    return int(match.group(1)) * SIZE_UNITS.get(unit, 1)


def drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """Forget that the base came from a GGUF file, so the merge saves as an ordinary checkpoint.

    transformers dequantizes a GGUF base into plain tensors on loading but keeps its GGUF
    quantizer, which ``save_pretrained`` refuses (GGUF is not serialisable) and whose
    ``quantization_config`` config.json would carry, telling every loader to read the safetensors
    as GGUF. The merged weights are plain tensors, so both are dropped, as the SmolLM2 world's own
    conversion of its GGUF base does. Any other quantized base is refused before loading.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def write_checkpoint(
    model: torch.nn.Module,
    tokenizer,
    manifest: dict,
    out: Path,
    dtype: str,
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Save the model (cast to ``dtype``) and tokenizer as an HF checkpoint, all or nothing."""
    if out.is_dir() and any(out.iterdir()):
        check_out(out, overwrite)  # it appeared while we were merging
    drop_gguf_quantizer(model)
    # written into a hidden sibling and swapped in whole (mergeopt.runtime.rundir): the old DIR's
    # files are all replaced, none carried over
    with staged(out, ("*", ".*")) as staging:
        model.to(DTYPES[dtype])
        model.save_pretrained(staging.path, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging.path)
        # the directory is renamed into place whole, so its files need no atomic writes of their own
        (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for written in staging.path.rglob(
            "*"
        ):  # transformers writes model.safetensors 0600 whatever the umask
            if written.is_file():
                written.chmod(file_mode())
    return out


# ----------------------------------------------------------------------------- the merge


def check_representable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Refuse a merge whose values are not finite once cast to ``dtype``, naming the first tensor.

    A merge far off the experts (``merge.scale=1e6``) can exceed a narrow dtype's range (float16
    stops at 65504): the cast would write Inf, and every forward pass of the shipped model would
    give NaN. Checked one tensor at a time, before anything is written; a refusal, not a warning,
    because nobody wants a checkpoint that cannot run.
    """
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or torch.isfinite(tensor.to(dtype)).all():
                continue
            short = str(dtype).removeprefix("torch.")
            where = f"overflows {short}" if torch.isfinite(tensor).all() else "is not finite"
            raise UserError(
                f"the merged tensor {name} {where} (largest magnitude {float(tensor.abs().max()):.4g}): "
                "lower merge.scale or write a wider --dtype"
            )


def warn_narrower_than_scored(dtype: str, scored: torch.dtype, adapter: bool = False) -> None:
    """Say when the default dtype (the base's) rounds the merge that fit scored in a wider one.

    fit evaluates in ``model.eval_dtype`` (float32 by default) over the merge computed in float32;
    rounded to the bfloat16 of a bfloat16 base, a merged weight moves by about as much as the task
    vectors move it (docs/guides/memory.md, "Precision of the evaluations"), so the written model's
    losses are not mixture.json's. Not silent: the user who compares them should know why, and how
    to write the model fit scored. An adapter (``adapter``) is added to a base the user loads, so
    the base must be loaded in that dtype too.
    """
    written = DTYPES[dtype]
    if torch.finfo(written).bits >= torch.finfo(scored).bits:
        return
    short = str(scored).removeprefix("torch.")
    remedy = (
        f"--dtype {short}, with the base loaded in {short} too, gives the model fit scored"
        if adapter
        else f"--dtype {short} writes the model fit scored"
    )
    warn(
        f"writing {dtype}, the base's dtype, but fit scored the merge in {short}: the rounding moves "
        f"its losses away from mixture.json's; {remedy}"
    )


def materialize(
    recipe: Recipe,
    weights: Mapping[str, float],
    out: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    as_adapter: bool = False,
    fitted: FittedStack | None = None,
) -> dict:
    """Merge at ``weights`` (on the simplex, every expert named) and write DIR; returns the manifest.

    ``recipe`` has its world paths resolved. The model holds θ(w) in the compute dtype after the
    merge (merged in float32, parameter by parameter) and is cast to ``dtype`` only for writing.
    ``as_adapter``: DIR is one LoRA adapter instead (see the module's docstring). ``fitted``: the
    stack the mixture was fitted on, refused before anything is written when the recipe's differs.
    """
    from mergeopt.loading.problem import check_mergeable, load_merge

    check_mergeable(recipe)
    if as_adapter:
        check_adapter_merge(recipe)

    base = (
        gguf_base(recipe.model.base, recipe.model.gguf_file)
        if recipe.model.gguf_file
        else open_checkpoint(recipe.model.base, recipe.model.allow_pickle, role="model.base")
    )
    chosen, dtype = dtype, output_dtype(dtype, base.config)
    model, stack, tokenizer, _ = load_merge(recipe, progress)
    if chosen is None:
        warn_narrower_than_scored(dtype, stack.eval_dtype, adapter=as_adapter)
    if fitted is not None:
        check_same_stack(fitted, stack.layout())
    w = torch.tensor([weights[n] for n in stack.expert_names], dtype=torch.float64)
    log(f"merging {stack.num_experts} experts ({stack.method['name']}) at " + _format(weights))
    stack.write_mixture(w)
    if as_adapter:
        current = stack.lowrank.current_weights() if stack.lowrank is not None else w.float()
        tensors, ranks, saved = adapter_tensors(stack, current, DTYPES[dtype])
        config = adapter_config(recipe, ranks, saved)
        manifest = _manifest(recipe, weights, stack.method, dtype, provenance)
        write_adapter(tensors, config, manifest, out, overwrite)
        size = (out / "adapter_model.safetensors").stat().st_size
        whole = f" and {len(saved)} saved whole (modules_to_save)" if saved else ""
        log(
            f"wrote {out}: a LoRA adapter over {recipe.model.base}, {len(ranks)} modules of rank "
            f"{min(ranks.values())}-{max(ranks.values())}{whole}, {size / 2**20:,.1f} MiB in {dtype}, {MANIFEST}"
        )
        return manifest
    with torch.no_grad():
        make_permanent(model)  # each merged parameter's value at w, as a plain tensor, one at a time
        if stack.lowrank is not None:  # LoRA experts: their update at w, now added to the weights
            stack.lowrank.materialize(stack.lowrank.current_weights())
    method = stack.method
    del stack  # the model holds θ(w) now; the stack's K − 1 copies would only raise the peak while saving
    manifest = _manifest(recipe, weights, method, dtype, provenance)
    check_representable(model, DTYPES[dtype])
    write_checkpoint(model, tokenizer, manifest, out, dtype, overwrite, max_shard_size)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shards = len(list(out.glob("*.safetensors")))
    log(
        f"wrote {out}: {shards} safetensors file(s), {size / 2**20:,.1f} MiB in {dtype}, tokenizer, {MANIFEST}"
    )
    return manifest


def _manifest(recipe: Recipe, weights, method: dict, dtype: str, provenance) -> dict:
    """mergeopt_merge.json: where the written merge came from (local paths absolute)."""
    models = {"model": {"base": recipe.model.base, "experts": dict(recipe.model.experts)}}
    anchor_paths(models)
    return {
        "weights": dict(weights),
        "method": method,
        "dtype": dtype,
        "base": models["model"]["base"],
        "experts": models["model"]["experts"],
        "exclude": list(recipe.model.exclude),
        "stack_dtype": recipe.model.stack_dtype,
        "seed": recipe.seed,
        **(provenance or {}),
        "mergeopt_version": mergeopt.__version__,
    }


def write_adapter(tensors: dict, config: dict, manifest: dict, out: Path, overwrite: bool = False) -> Path:
    """adapter_config.json, adapter_model.safetensors and the manifest, all or nothing."""
    from safetensors.torch import save_file

    if out.is_dir() and any(out.iterdir()):
        check_out(out, overwrite)
    with staged(out, ("*", ".*")) as staging:
        save_file(tensors, str(staging.path / "adapter_model.safetensors"))
        (staging.path / "adapter_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for written in staging.path.iterdir():
            written.chmod(file_mode())
    return out


def _format(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{n} {w:.4f}" for n, w in weights.items())


def run(args: argparse.Namespace) -> int:
    """``mergeopt merge``: the parsed command line (:mod:`mergeopt.cli`)."""
    recipe = load_recipe(args.recipe, args.overrides)
    log = (lambda _msg: None) if args.quiet else print
    shard_size = _shard_size(args.max_shard_size)
    if args.mixture is not None:
        mixture_path = Path(args.mixture)
        mixture = read_finished_mixture(mixture_path)
        weights = check_mixture(mixture.weights, recipe.expert_names, str(mixture_path), args.normalize)
        # the run directory or its mixture.json: either way the run's recipe.yaml is beside the file
        if mixture_path.is_dir():
            mixture_path = mixture_path / MixtureFile.FILE
        check_same_merge(mixture, mixture_path, recipe)
        fitted = FittedStack(mixture_path, mixture.stack) if mixture.stack else None
    else:
        fitted = None
        weights = check_mixture(parse_weights(args.weights), recipe.expert_names, "--weights", args.normalize)
    writable_dir(Path(args.out), "--out")
    with owned(args.out, "merge", "--out") as out:
        check_out(out, args.overwrite)
        resolved, _ = worlds.resolve_recipe(recipe, log)
        model = resolved.model
        inputs = [model.base, *model.experts.values(), args.recipe, *([args.mixture] if args.mixture else [])]
        check_out(out, args.overwrite, inputs)
        provenance = {  # absolute: the manifest is read from wherever the merge is copied to
            "recipe": os.path.abspath(args.recipe),
            "overrides": list(args.overrides),
            "mixture": args.mixture and os.path.abspath(args.mixture),
        }
        if args.as_adapter:
            check_adapter_merge(resolved)  # before any weight is read
        materialize(
            resolved,
            weights,
            out,
            args.dtype,
            args.overwrite,
            shard_size,
            provenance,
            not args.quiet,
            log,
            args.as_adapter,
            fitted,
        )
    return 0


def main(argv: Sequence[str]) -> int:
    """``mergeopt merge`` from Python, with its command-line arguments."""
    return run_command("merge", argv)
