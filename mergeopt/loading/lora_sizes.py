"""An adapter's factors as a memory plan needs them, read from its safetensors header alone.

``mergeopt plan`` and ``--dry-run`` size a LoRA expert before any weight is read: which modules
stay low-rank (their rank, in and out), which base parameters it sets densely, and which saved
copies of a layer's weight must be compared with the base. The tensors are sorted exactly as
:func:`mergeopt.loading.lora.read_adapter` sorts them when it reads the weights, so the plan counts
what the stack will hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mergeopt.errors import UserError
from mergeopt.inputs import safetensors_header
from mergeopt.loading.lora import (
    CONFIG_FILE,
    EMBEDDING,
    FACTOR,
    LORA_BIAS,
    MAGNITUDE,
    PREFIX,
    SAFETENSORS_FILE,
    TOKENS,
)


@dataclass(frozen=True)
class FactorSizes:
    """An adapter's factors as a memory plan needs them, from its safetensors header only."""

    numel: int  # elements of the A and B factors kept low-rank
    rank_sum: int  # Σ over modules kept low-rank of the module's rank: the low-rank activations' width
    file_bytes: int  # as stored on disk
    # (rank, in, out) of each module kept low-rank, by its key less ``.lora_A.weight``: what a sharded
    # plan needs to count blocks of rows of the stacked A (R × in) and B (out × R)
    modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # base parameters the adapter sets densely (DoRA, LoRA biases, its own copies, trainable tokens):
    # they are stacked like a dense expert's (:class:`DenseUpdate`)
    dense: tuple[str, ...] = ()
    # weights of low-rank modules the adapter saves a copy of (PEFT's save_embedding_layers, for a
    # LoRA on embed_tokens or lm_head): dense rows only where the copy is not θ0 (the plan compares)
    copies: tuple[str, ...] = ()

    def keeping(self, modules: dict[str, tuple[int, int, int]]) -> FactorSizes:
        """These sizes with ``modules`` kept low-rank: the element count and rank sum follow them."""
        numel = sum(r * (i + o) for r, i, o in modules.values())
        return replace(self, modules=modules, numel=numel, rank_sum=sum(r for r, _, _ in modules.values()))


def saved_copy(path: str | Path, name: str) -> torch.Tensor:
    """The adapter's own copy of base parameter ``name`` (saved as ``….base_layer.weight`` or under
    the parameter's own name), read alone from its safetensors file."""
    module, _, leaf = name.rpartition(".")
    keys = (f"{PREFIX}{module}.base_layer.{leaf}", f"{PREFIX}{name}")
    with safe_open(str(Path(path) / SAFETENSORS_FILE), framework="pt") as handle:
        key = next((k for k in keys if k in handle.keys()), None)  # noqa: SIM118
        if key is None:
            raise UserError(f"{path}: no saved copy of {name} in {SAFETENSORS_FILE}")
        return handle.get_tensor(key)


def factor_sizes(path: str | Path, fan_in_fan_out: bool = False) -> FactorSizes:
    """Sizes of an adapter's factors, read from its safetensors header (no weights), sorted as
    :func:`read_adapter` sorts the tensors (``fan_in_fan_out``: its adapter_config.json's, whose
    modules are all stacked densely)."""
    file = Path(path) / SAFETENSORS_FILE
    if not file.is_file():
        raise UserError(f"{path}: no {SAFETENSORS_FILE} next to {CONFIG_FILE}")
    stored = 0
    transposed = fan_in_fan_out
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    dense: set[str] = set()
    magnitudes: set[str] = set()
    embeddings: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (shape, dtype) in safetensors_header(file).items():
        stored += math.prod(shape) * (2 if dtype in ("BF16", "F16") else 4)
        name = key.removeprefix(PREFIX)
        if match := FACTOR.match(name):
            if len(shape) == 2:
                factors.setdefault(match["module"], {})[match["which"]] = tuple(shape)
        elif match := EMBEDDING.match(name):  # lora_embedding_A is r × rows, B width × r
            if len(shape) == 2:
                embeddings.setdefault(match["module"], {})[match["which"]] = tuple(shape)
        elif match := MAGNITUDE.match(name):
            magnitudes.add(f"{match['module']}.weight")
        elif match := LORA_BIAS.match(name):
            dense.add(f"{match['module']}.bias")
        elif match := TOKENS.match(name):
            dense.add(f"{match['module']}.weight")
        else:
            dense.add(name.replace(".base_layer.", "."))
    dense |= magnitudes
    pairs = [module for module, ab in factors.items() if {"A", "B"} <= set(ab)]
    if transposed:  # Conv1D modules are stacked densely (:func:`read_adapter`)
        dense |= {f"{module}.weight" for module in pairs}
    low = [] if transposed else [m for m in pairs if f"{m}.weight" not in magnitudes]
    # an embedding's factors are stacked as a linear weight's: A's role (r × width) is played by Bᵀ
    embedded = [m for m, ab in embeddings.items() if {"A", "B"} <= set(ab)]
    dense |= {f"{m}.weight" for m in embedded if f"{m}.weight" in magnitudes}
    low_embedded = [m for m in embedded if f"{m}.weight" not in magnitudes]
    copies = {f"{m}.weight" for m in (*low, *low_embedded)} & dense  # a low-rank module's own weight
    modules = {PREFIX + m: (factors[m]["A"][0], factors[m]["A"][1], factors[m]["B"][0]) for m in low}
    modules |= {
        PREFIX + m: (embeddings[m]["A"][0], embeddings[m]["B"][0], embeddings[m]["A"][1])
        for m in low_embedded
    }
    sizes = FactorSizes(0, 0, stored, dense=tuple(sorted(dense - copies)), copies=tuple(sorted(copies)))
    return sizes.keeping(modules)
