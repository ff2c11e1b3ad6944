"""The merge of LoRA experts written as one PEFT LoRA adapter (``mergeopt merge --as-adapter``).

With a linear merge of LoRA experts the merged model is the base plus a low-rank update, so it
can ship as an adapter of megabytes instead of a checkpoint of gigabytes: per module the experts'
factors side by side, A = [A_1; …; A_K] and B = [c_1 B_1 … c_K B_K] with c_i = λ w_i s_i (rank
Σ r_i, scaling 1: what PEFT's ``add_weighted_adapter(combination_type="cat")`` builds). What an
adapter changes densely (DoRA, modules_to_save, trained biases, trainable tokens, a LoRA of a
mixture-of-experts' fused expert weights) goes in as ``modules_to_save``: the module's merged parameters, whole. :mod:`mergeopt.export.merge` writes
it, as it writes a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.loading.peft_format import PREFIX as PEFT_PREFIX  # PEFT's key prefix in adapter files


def check_adapter_merge(recipe: Recipe) -> None:
    """``--as-adapter`` before anything is loaded: a linear merge of LoRA adapters only."""
    from mergeopt.loading.peft_format import is_adapter

    if recipe.merge.method != "linear":
        raise UserError(
            f"--as-adapter needs merge.method linear: {recipe.merge.method} makes the adapters dense "
            "(write the checkpoint without --as-adapter)"
        )
    dense = [name for name, path in recipe.model.experts.items() if not is_adapter(path)]
    if dense:
        raise UserError(
            f"--as-adapter needs every expert to be a LoRA adapter; {', '.join(map(repr, dense))} "
            f"{'is a dense checkpoint' if len(dense) == 1 else 'are dense checkpoints'} "
            "(write the checkpoint without --as-adapter)"
        )


def adapter_tensors(
    stack, weights: torch.Tensor, dtype: torch.dtype
) -> tuple[dict, dict[str, int], list[str]]:
    """The merge at ``weights`` as one LoRA adapter: its tensors under PEFT's names, each low-rank
    module's rank, and the modules saved whole. A module whose merge changes a parameter densely
    (DoRA, modules_to_save, trained biases, trainable tokens, a saved weight that is not θ0) goes in
    as a ``modules_to_save`` copy of its merged parameters, its LoRA update at w folded in.
    Refused: an adapted embedding its output layer is tied to (a PEFT adapter changes only the
    input's), a module saved whole whose weight another module shares, and a merge with nothing
    left low-rank."""
    lowrank = stack.lowrank
    if lowrank is not None and lowrank.tied:
        output, embedding = next(iter(lowrank.tied.items()))
        raise UserError(
            f"--as-adapter: {embedding} is adapted and {output} is tied to it; PEFT applies an embedding "
            "adapter to the input only, the merge to both: write the checkpoint without --as-adapter"
        )
    model = stack.model
    saved = _saved_whole(stack)
    _refuse_shared_weights(model, saved)
    factors = {} if lowrank is None else {m: f for m, f in lowrank.modules.items() if m not in saved}
    if not factors:
        raise UserError(
            "--as-adapter: nothing of the merge stays low-rank (every adapted module is also changed "
            "densely): write the checkpoint without --as-adapter"
        )
    tensors, ranks = _lora_tensors(model, factors, weights, lowrank.scale, dtype)
    with torch.no_grad():
        for module in saved:
            for name, value in _merged_parameters(model.get_submodule(module)).items():
                if name == "weight" and lowrank is not None and module in lowrank.modules:
                    value = lowrank.modules[module].merged(value, weights, lowrank.scale)
                tensors[f"{PEFT_PREFIX}{module}.{name}"] = value.to(dtype).contiguous().cpu()
    return tensors, ranks, saved


def _saved_whole(stack) -> list[str]:
    """The modules the adapter saves whole (``modules_to_save``): those with a parameter the merge
    changes densely, or whose LoRA is of a whole parameter (fused experts: no module-level LoRA to
    write), or whose DoRA expert scales the layer's rows (:mod:`mergeopt.merging.dora`)."""
    lowrank = stack.lowrank
    whole = lowrank.parameters if lowrank is not None else {}
    saved = {name.rpartition(".")[0] for name in [*stack.deltas, *stack.shared, *whole]}
    return sorted(saved | {m for m, f in (lowrank.modules.items() if lowrank else ()) if f.gain is not None})


def _refuse_shared_weights(model: torch.nn.Module, saved: list[str]) -> None:
    """Refuse a module saved whole whose weight another module shares (tied): a PEFT adapter would
    save one copy of it."""
    from torch.nn.utils import parametrize

    from mergeopt.merging.lowrank import weight_source

    def has_weight(module: torch.nn.Module) -> bool:  # (reading .weight would merge a stacked one)
        return "weight" in module._parameters or parametrize.is_parametrized(module, "weight")

    sources = {}
    for name, module in model.named_modules():
        if has_weight(module):
            sources.setdefault(id(weight_source(module)), []).append(name)
    for module in saved:
        if not has_weight(model.get_submodule(module)):  # a mixture-of-experts' fused experts
            continue
        others = [n for n in sources.get(id(weight_source(model.get_submodule(module))), []) if n != module]
        if others:
            raise UserError(
                f"--as-adapter: the merge changes {module}, whose weight {others[0]} shares (tied), and a PEFT "
                "adapter would save one copy of it: write the checkpoint without --as-adapter"
            )


def _lora_tensors(
    model: torch.nn.Module, factors: dict, weights: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The low-rank modules' factors at ``weights`` under PEFT's names (B carries each expert's
    coefficient), and each module's rank."""
    tensors, ranks = {}, {}
    for module, f in factors.items():
        c = f.coefficients(weights.to(f.scaling.device), scale)
        a, b = f.whole(torch.float32)
        a, b = a.to(dtype).contiguous().cpu(), (b * c.float()).to(dtype).contiguous().cpu()
        if isinstance(model.get_submodule(module), torch.nn.Embedding):
            # PEFT's embedding factors are the transposes: ΔE = (B_peft A_peft)ᵀ = b·a
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = a.T.contiguous()
        else:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = a.shape[0]
    return tensors, ranks


def _merged_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters by name, a stacked one read as its merge at the written mixture."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    names |= set(getattr(module, "parametrizations", {}))  # stacked: their merge, formed when read
    return {name: getattr(module, name).detach() for name in sorted(names)}


def adapter_config(recipe: Recipe, ranks: Mapping[str, int], saved: Sequence[str] = ()) -> dict:
    """adapter_config.json of the merged adapter: each module's rank Σ r_i and α = rank (scaling 1:
    the coefficients are in B), its full name as target and pattern key (PEFT matches both), and
    the modules saved whole (``modules_to_save``)."""
    largest = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": recipe.model.base,
        "r": largest,
        "lora_alpha": largest,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "modules_to_save": list(saved) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
