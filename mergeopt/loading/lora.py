"""PEFT LoRA adapters as experts: their factors and scaling, read without forming a dense ΔW.

A LoRA expert is θ0 + s·B·A on each adapted module (A: r × in, B: out × r), with s = α / r, or
α / √r with rsLoRA, r and α possibly per module (``rank_pattern``, ``alpha_pattern``). Keeping the
factors is what makes LoRA experts cheap to hold: K experts of rank r cost K·r·(in + out) numbers
per module instead of K·in·out. This module reads an adapter directory as PEFT writes it
(``adapter_config.json`` + ``adapter_model.safetensors``), maps every factor to the base
parameter it adapts and checks the shapes against the base, so a mismatched adapter fails before
anything is loaded. The dense delta s·B·A is available for checks and for the dense path.

Not supported (each a one-line error): DoRA, trained biases, ``modules_to_save``, embedding LoRA,
``fan_in_fan_out`` (Conv1D models). Pickled ``adapter_model.bin`` files are read only with
``allow_pickle`` (then ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mergeopt.errors import UserError
from mergeopt.inputs import json_file, lora_patterns, safetensors_header

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ΔW = scaling · b @ a."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW (out × in), for checks and for the dense path only."""
        return self.scaling * (self.b.to(dtype) @ self.a.to(dtype))


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    factors: dict[
        str, LoraFactors
    ]  # base parameter name ('model.layers.0.self_attn.q_proj.weight') -> factors

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rule: a pattern key applies to modules named ``key`` or ending in ``.key`` (a regex)."""
    for key, value in pattern.items():
        if module == key or re.match(rf".*\.{key}$", module):
            return value
    return default


def scaling_for(config: Mapping, module: str) -> tuple[int, float]:
    """(r, s) of one module: s = α / r, or α / √r with rsLoRA."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter_config(path: Path) -> dict:
    """An adapter's adapter_config.json, checked: a LoRA adapter of a kind mergeopt reads, its rank,
    alpha and per-module patterns numbers PEFT would accept."""
    config = json_file(path / CONFIG_FILE, "LoRA adapter config")
    unsupported = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models)",
        "modules_to_save": "adapters with modules_to_save",
    }
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, what in unsupported.items():
        if config.get(key):
            raise UserError(f"{path}: {what} are not supported ({key} is set in {CONFIG_FILE})")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: adapters with trained biases (bias: {config['bias']!r}) are not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise UserError(f"{path / CONFIG_FILE}: {key} must be a positive number, got {value!r}")
    if not isinstance(config["r"], int):
        raise UserError(f"{path / CONFIG_FILE}: r must be a whole number, got {config['r']!r}")
    lora_patterns(config, str(path / CONFIG_FILE))
    return config


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).is_file():
        safetensors_header(path / SAFETENSORS_FILE)  # a truncated or damaged file: one line
        with safe_open(str(path / SAFETENSORS_FILE), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if (path / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise UserError(
                f"{path}: {PICKLE_FILE} is a pickle, which can run code when loaded; convert it to "
                "safetensors, or set model.allow_pickle: true to load it with torch.load(weights_only=True)"
            )
        return torch.load(path / PICKLE_FILE, map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no {SAFETENSORS_FILE} next to {CONFIG_FILE}")


def read_adapter(
    path: str | Path, base_shapes: Mapping[str, Sequence[int]], allow_pickle: bool = False
) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory and check every factor against the base's parameter shapes."""
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_tensors(path, allow_pickle)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        match = FACTOR.match(name)
        if match is None:
            if "lora_embedding" in name:
                raise UserError(f"{path}: embedding LoRA ({key}) is not supported")
            raise UserError(f"{path}: unexpected tensor {key} in a LoRA adapter")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise UserError(f"{path}: the adapter holds no LoRA factors")
    factors = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: module {module} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UserError(f"{path}: the LoRA factors of {module} contain NaN or Inf")
        target = f"{module}.weight"
        if target not in base_shapes:
            raise UserError(f"{path}: adapts {module}, but the base has no parameter {target}")
        out_features, in_features = base_shapes[target]
        r, scaling = scaling_for(config, module)
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise UserError(
                f"{path}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but the base's "
                f"{target} is {[out_features, in_features]} and the adapter's rank there is {r}"
            )
        factors[target] = LoraFactors(a, b, scaling)
    return LoraAdapter(path, config, factors)


@dataclass(frozen=True)
class FactorSizes:
    """An adapter's factors as a memory plan needs them, from its safetensors header only."""

    numel: int  # elements of every A and B factor
    rank_sum: int  # Σ over adapted modules of the module's rank: the low-rank activations' width
    file_bytes: int  # as stored on disk
    # (rank, in, out) of each adapted module, by its key less ``.lora_A.weight``: what a sharded
    # plan needs to count blocks of rows of the stacked A (R × in) and B (out × R)
    modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def factor_sizes(path: str | Path) -> FactorSizes:
    """Sizes of an adapter's factors, read from its safetensors header (no weights)."""
    file = Path(path) / SAFETENSORS_FILE
    if not file.is_file():
        raise UserError(f"{path}: no {SAFETENSORS_FILE} next to {CONFIG_FILE}")
    numel = rank_sum = stored = 0
    a_shapes: dict[str, tuple[int, ...]] = {}
    outs: dict[str, int] = {}
    for key, (shape, dtype) in safetensors_header(file).items():
        numel += math.prod(shape)
        stored += math.prod(shape) * (2 if dtype in ("BF16", "F16") else 4)
        if "lora_A" in key and len(shape) == 2:
            rank_sum += shape[0]
            a_shapes[key.partition(".lora_A")[0]] = shape
        elif "lora_B" in key and len(shape) == 2:
            outs[key.partition(".lora_B")[0]] = shape[0]
    modules = {m: (a[0], a[1], outs[m]) for m, a in a_shapes.items() if m in outs}
    return FactorSizes(numel, rank_sum, stored, modules)
