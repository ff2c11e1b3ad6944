"""An adapter's factors as a memory plan needs them, read from its safetensors header alone.

``mergeopt plan`` and ``--dry-run`` size a LoRA expert before any weight is read: which modules
stay low-rank (their rank, in and out), which base parameters it sets densely, and which saved
copies of a layer's weight must be compared with the base. The tensors are sorted exactly as
:func:`mergeopt.loading.lora.read_adapter` sorts them when it reads the weights, so the plan counts
what the stack will hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mergeopt.errors import UserError
from mergeopt.inputs import safetensors_header
from mergeopt.loading.lora_parameters import needs_conversion, peft_converted, resolved_parameters
from mergeopt.loading.peft_format import (
    CONFIG_FILE,
    EMBEDDING,
    FACTOR,
    LORA_BIAS,
    MAGNITUDE,
    PREFIX,
    SAFETENSORS_FILE,
    TOKENS,
    left_unread,
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
    # (rank, in, out) of its DoRA linear modules (in ``dense`` until :meth:`with_dora` keeps them
    # low-rank, as mergeopt.merging.dora does where the merged layer's weight is θ0)
    dora: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    gains: tuple[str, ...] = ()  # the DoRA modules kept low-rank: one float32 gain per output row
    # LoRA of whole parameters (target_parameters), by parameter name (also in ``dense``): (elements
    # of their factors, rank r); a fit of LoRA experts alone keeps them low-rank where every adapter
    # setting the parameter sets it so (mergeopt.merging.lowrank_parameters)
    parameters: dict[str, tuple[int, int]] = field(default_factory=dict)
    # (rank, in, out) of its Conv1D modules (fan_in_fan_out, GPT-2), stacked densely (in ``dense``):
    # what the plan checks against the base's in × out weights, as read_adapter does
    conv1d: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # the adapter's own copies of base parameters (modules_to_save, trained biases, an adapted layer's
    # base_layer.weight), by the parameter they replace: (their key in the file, their shape), what
    # the plan checks against the base's shapes, as read_adapter does (a resized vocabulary)
    saved: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    def keeping(self, modules: dict[str, tuple[int, int, int]]) -> FactorSizes:
        """These sizes with ``modules`` kept low-rank: the element count and rank sum follow them."""
        numel = sum(r * (i + o) for r, i, o in modules.values())
        return replace(self, modules=modules, numel=numel, rank_sum=sum(r for r, _, _ in modules.values()))

    def with_dora(self, targets: set[str]) -> FactorSizes:
        """These sizes with the DoRA modules whose weights are in ``targets`` kept low-rank."""
        moved = {m: v for m, v in self.dora.items() if f"{m.removeprefix(PREFIX)}.weight" in targets}
        if not moved:
            return self
        left = tuple(n for n in self.dense if f"{PREFIX}{n.removesuffix('.weight')}" not in moved)
        return replace(self, dense=left, gains=tuple(sorted(moved))).keeping({**self.modules, **moved})

    def gain_bytes(self) -> int:
        """Its gains as the stack holds them: float32 per output row, and the expert's index (int64)."""
        return sum(self.modules[m][2] * 4 + 8 for m in self.gains)


def low_rank_dora(adapters: dict[str, FactorSizes], keep: Callable[[str], bool]) -> set[str]:
    """The weights whose DoRA updates stay low-rank in a stack of these adapters alone (the
    planning twin of :func:`mergeopt.merging.dora.low_rank_targets`): every adapter that sets the
    weight densely does so by DoRA, and ``keep`` (not excluded, not the output layer) holds."""

    def weights(a: FactorSizes) -> set[str]:
        return {f"{m.removeprefix(PREFIX)}.weight" for m in a.dora}

    dora = set().union(*(weights(a) for a in adapters.values()))
    other = set().union(*({n for n in a.dense if n not in weights(a)} for a in adapters.values()))
    return {t for t in dora - other if keep(t)}


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


def _header(file: Path, config: dict, model: torch.nn.Module | None) -> tuple[dict, dict]:
    """(config, {key: (shape, dtype)}) of an adapter as the fit reads it: from the header alone, but
    for an adapter of per-expert modules that PEFT converts to fused experts, which is read whole and
    converted (its factors are small) so that the plan sees what the fit stacks."""
    header = safetensors_header(file)
    if model is None or not needs_conversion(header, model, config):
        return config, header
    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    config, tensors = peft_converted(file.parent, config, tensors, model)
    return config, {key: (list(t.shape), str(t.dtype)) for key, t in tensors.items()}


def factor_sizes(
    path: str | Path,
    fan_in_fan_out: bool = False,
    model: torch.nn.Module | None = None,
    config: dict | None = None,
) -> FactorSizes:
    """Sizes of an adapter's factors, read from its safetensors header (no weights), sorted as
    :func:`read_adapter` sorts the tensors (``fan_in_fan_out``: its adapter_config.json's, whose
    modules are all stacked densely). ``model`` (the base's architecture on the meta device) and
    ``config`` (its adapter_config.json) resolve LoRA on parameters (``target_parameters``, also as
    PEFT converts per-expert modules to it): those parameters are stacked densely."""
    file = Path(path) / SAFETENSORS_FILE
    if not file.is_file():
        raise UserError(f"{path}: no {SAFETENSORS_FILE} next to {CONFIG_FILE}")
    stored = sum(
        math.prod(shape) * (2 if dtype in ("BF16", "F16") else 4)
        for shape, dtype in safetensors_header(file).values()
    )
    config, header = _header(file, dict(config or {}), model)
    wrapped = resolved_parameters(Path(path), config, model) if config else {}
    tensors = _HeaderTensors()
    unread = left_unread(config, header)
    for key, (shape, _) in header.items():
        if key not in unread:
            tensors.add(key.removeprefix(PREFIX), tuple(shape), wrapped)
    return tensors.sizes(stored, transposed=fan_in_fan_out)


@dataclass
class _HeaderTensors:
    """An adapter's tensors sorted by what they are, as :func:`read_adapter` sorts them: shapes only."""

    factors: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # a module's A and B
    embeddings: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # an embedding's
    parameters: dict[str, tuple[int, int]] = field(default_factory=dict)  # LoRA on parameters: elements, r
    dense: set[str] = field(default_factory=set)  # base parameters the adapter sets densely
    magnitudes: set[str] = field(default_factory=set)  # DoRA's: the weights whose module has one
    saved: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # FactorSizes.saved

    def add(self, name: str, shape: tuple[int, ...], wrapped: dict) -> None:
        """Sort one tensor (its key less PEFT's prefix); ``wrapped``: LoRA on parameters, by module."""
        if (match := FACTOR.match(name)) and match["module"] in wrapped:
            target = wrapped[match["module"]]
            self.dense.add(target.name)  # LoRA on a parameter: dense rows, or kept low-rank (see above)
            elements, r = self.parameters.get(target.name, (0, 0))
            if match["which"] == "A":  # r·E × in
                r = shape[0] // target.experts
            self.parameters[target.name] = (elements + math.prod(shape), r)
        elif match := FACTOR.match(name):
            if len(shape) == 2:
                self.factors.setdefault(match["module"], {})[match["which"]] = shape
        elif match := EMBEDDING.match(name):  # lora_embedding_A is r × rows, B width × r
            if len(shape) == 2:
                self.embeddings.setdefault(match["module"], {})[match["which"]] = shape
        elif match := MAGNITUDE.match(name):
            self.magnitudes.add(f"{match['module']}.weight")
        elif match := LORA_BIAS.match(name):
            self.dense.add(f"{match['module']}.bias")
        elif match := TOKENS.match(name):
            self.dense.add(f"{match['module']}.weight")
        else:
            self.dense.add(target := name.replace(".base_layer.", "."))
            self.saved[target] = (PREFIX + name, shape)

    def sizes(self, stored: int, transposed: bool) -> FactorSizes:
        """What the plan needs (``stored``: the file's bytes; ``transposed``: fan_in_fan_out, Conv1D
        modules stacked densely, as :func:`read_adapter` does)."""
        dense, magnitudes = self.dense | self.magnitudes, self.magnitudes
        pairs = [module for module, ab in self.factors.items() if {"A", "B"} <= set(ab)]
        if transposed:
            dense |= {f"{module}.weight" for module in pairs}
        low = [] if transposed else [m for m in pairs if f"{m}.weight" not in magnitudes]
        # an embedding's factors are stacked as a linear weight's: A's role (r × width) is played by Bᵀ
        embedded = [m for m, ab in self.embeddings.items() if {"A", "B"} <= set(ab)]
        dense |= {f"{m}.weight" for m in embedded if f"{m}.weight" in magnitudes}
        low_embedded = [m for m in embedded if f"{m}.weight" not in magnitudes]
        copies = {f"{m}.weight" for m in (*low, *low_embedded)} & dense  # a low-rank module's own weight
        modules = {PREFIX + m: self._linear(m) for m in low}
        # a DoRA linear module's factors, kept low-rank where the stack allows (FactorSizes.with_dora)
        dora = (
            {} if transposed else {PREFIX + m: self._linear(m) for m in pairs if f"{m}.weight" in magnitudes}
        )
        modules |= {
            PREFIX + m: (self.embeddings[m]["A"][0], self.embeddings[m]["B"][0], self.embeddings[m]["A"][1])
            for m in low_embedded
        }
        sizes = FactorSizes(
            0,
            0,
            stored,
            dense=tuple(sorted(dense - copies)),
            copies=tuple(sorted(copies)),
            dora=dora,
            parameters=self.parameters,
            conv1d={PREFIX + m: self._linear(m) for m in pairs} if transposed else {},
            saved=self.saved,
        )
        return sizes.keeping(modules)

    def _linear(self, module: str) -> tuple[int, int, int]:
        """(rank, in, out) of a linear module's factors: A is r × in, B out × r."""
        ab = self.factors[module]
        return ab["A"][0], ab["A"][1], ab["B"][0]
