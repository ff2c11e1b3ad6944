"""Write a merge to disk: ``python -m mergeopt.merge RECIPE --weights a=0.3,b=0.7 --out DIR``.

fit scores merges in memory and writes none; to evaluate the chosen mixture's merge with other
tools, or to ship it, it must exist as a Hugging Face checkpoint. This command builds θ(w) with the
same code as fit (:func:`mergeopt.loading.problem.load_merge`: the recipe's base, experts, exclusions,
``stack_dtype``, merge section and seed), so ``--mixture RUN/mixture.json`` writes exactly the model
fit scored; a mixture.json whose recorded merge, stack layout or checkpoints differ from the
recipe's is refused (:mod:`mergeopt.export.fitted_mixture`).

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
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import mergeopt
from mergeopt import worlds
from mergeopt.cli import run_command
from mergeopt.config import Recipe, load_recipe
from mergeopt.config.loading import anchor_paths
from mergeopt.errors import UserError, warn
from mergeopt.export.adapter import adapter_config, adapter_tensors, check_adapter_merge
from mergeopt.export.fitted_mixture import (
    FittedStack,
    check_mixture,
    check_same_merge,
    check_same_stack,
    parse_weights,
)
from mergeopt.inputs import writable_dir
from mergeopt.loading.checkpoints import gguf_base, open_checkpoint
from mergeopt.merging.layer_merge import make_permanent
from mergeopt.merging.stack import DTYPES
from mergeopt.run_files import MixtureFile, read_finished_mixture
from mergeopt.runtime.files import file_mode
from mergeopt.runtime.rundir import owned, staged

MANIFEST = "mergeopt_merge.json"
OUT_DTYPES = ("float32", "bfloat16", "float16")
MAX_SHARD_SIZE = "5GB"


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
