"""The ``random://`` world: a base model and its experts drawn from seeds, with no checkpoint on disk.

Scaling work (the memory planner, the stack, the merge kernel, multi-GPU placement) needs models of
real size, e.g. an 8B-shaped base with four 8B-shaped experts, and such checkpoints are too large to
ship, download or even keep on disk next to each other. This module makes them from a config.json
alone: ``random://path/to/config.json`` (or a directory holding one) names the architecture, and

* :func:`build_base` builds the model directly on the target device and fills every parameter with
  :func:`base_parameter`, a pure function of (seed, name, shape, kind), so θ0 can be regenerated
  later, tensor by tensor, without keeping a copy of it;
* :class:`RandomExpert` is an expert θ_i as a lazy state dict: each tensor is made on request as
  θ0 + a task vector at a realistic scale (low rank plus dense noise, ‖τ‖_F ≈ 1e-3 ‖θ0‖_F), drawn from
  (seed, expert index, name) alone;
* :func:`config_shapes` lists every parameter's shape from a model built on the meta device, for the
  memory planner.

Weights are random, so the models are useless as language models; only shapes, dtypes, magnitudes
and determinism are realistic. The same seed gives bit-identical tensors on the same kind of device
(CPU and CUDA generators draw different streams).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mergeopt.errors import UserError

RANDOM_SCHEME = "random://"
CONFIG_FILE = "config.json"
DEFAULT_INITIALIZER_RANGE = 0.02
LOW_RANK_ENERGY = 0.5  # share of a 2-D task vector's squared Frobenius norm in its low-rank part

# -- paths and configs ---------------------------------------------------------------------------


def is_random(path: str) -> bool:
    """Whether ``path`` names the random world (``random://...``)."""
    return str(path).startswith(RANDOM_SCHEME)


def config_file(path: str) -> Path:
    """The config.json a ``random://`` path names: the file itself, or ``config.json`` in a directory.

    Relative paths are resolved against the current directory.
    """
    location = Path(str(path).removeprefix(RANDOM_SCHEME)).expanduser()
    location = location if location.is_absolute() else Path.cwd() / location
    return location / CONFIG_FILE if location.is_dir() else location


def read_config(path: str) -> PretrainedConfig:
    """The transformers config a ``random://`` path names; a :class:`UserError` naming the path if bad.

    Only architectures that ship with transformers are accepted: remote code is never trusted, and
    an ``auto_map`` entry (which would point at remote code) is dropped.
    """
    file = config_file(path)
    if not file.is_file():
        raise UserError(f"{path}: no config file at {file}")
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: {file} is not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise UserError(f"{path}: {file} has no model_type")
    fields.pop("auto_map", None)
    model_type = fields.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{path}: model_type {model_type!r} is not a transformers architecture ({reason})"
        ) from None
    check_architecture(path, config)
    return config


def check_architecture(path: str, config: PretrainedConfig) -> None:
    """Raise a :class:`UserError` unless transformers has a causal LM for ``config`` (and its classes)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(
            f"{path}: transformers has no causal language model for model_type {config.model_type!r}"
        )
    named = list(getattr(config, "architectures", None) or [])
    if named and not any(hasattr(transformers, name) for name in named):
        raise UserError(f"{path}: architecture {named[0]!r} is not a transformers class")


# -- the base ------------------------------------------------------------------------------------


def initializer_std(config: PretrainedConfig) -> float:
    """The standard deviation of the base's matrices: ``config.initializer_range``, else 0.02."""
    return float(getattr(config, "initializer_range", None) or DEFAULT_INITIALIZER_RANGE)


def parameter_kind(name: str, shape: Sequence[int]) -> str:
    """How a base parameter is drawn: ``"zeros"`` (biases), ``"ones"`` (1-D weights: norms) or ``"normal"``."""
    if name.endswith("bias"):
        return "zeros"
    if len(shape) <= 1:
        return "ones"
    return "normal"


def seeded_generator(key: str, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded by crc32 of ``key``: stable across runs, unlike ``hash()``.

    32 bits, because torch's CPU generator (mt19937) ignores the upper half of a 64-bit seed.
    """
    return torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))


def base_parameter(
    config: PretrainedConfig,
    name: str,
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
) -> torch.Tensor:
    """θ0[name]: a new tensor that depends only on (seed, name, shape, kind), the device type and dtype.

    Matrices (and embeddings) are N(0, std²) with std from :func:`initializer_std`, drawn in float32
    and then cast, so a bfloat16 base is the rounding of the float32 one; norms are 1, biases 0.
    :func:`build_base` fills its model with this, so calling it again regenerates θ0 exactly.
    """
    shape = tuple(shape)
    kind = parameter_kind(name, shape)
    if kind == "zeros":
        return torch.zeros(shape, device=device, dtype=dtype)
    if kind == "ones":
        return torch.ones(shape, device=device, dtype=dtype)
    generator = seeded_generator(f"{seed}/base/{name}", device)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return values.mul_(initializer_std(config)).to(dtype)


def no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' switch that skips its own weight initialisation (we overwrite every weight)."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights as skip
        except ImportError:
            return contextlib.nullcontext()
    return skip()


def instantiate(
    config: PretrainedConfig, device: torch.device | str, dtype: torch.dtype | None
) -> torch.nn.Module:
    """An uninitialised causal LM for ``config`` built directly on ``device``, embeddings tied as configured."""
    config = copy.deepcopy(config)  # from_config writes the dtype into the config it is given
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipping the initialisation skips the tying too
    return model


def build_base(
    config: PretrainedConfig, device: torch.device | str, dtype: torch.dtype, seed: int
) -> torch.nn.Module:
    """The random base θ0 for ``config`` on ``device`` in ``dtype``, in eval mode.

    Every parameter is :func:`base_parameter` of its name (tied weights are one parameter, filled
    once), so the same seed gives bit-identical weights on the same kind of device.
    """
    model = instantiate(config, device, dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(
                base_parameter(config, name, parameter.shape, parameter.device, parameter.dtype, seed)
            )
    return model.eval()


def config_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model built on the meta device; tied weights are listed once."""
    model = instantiate(config, "meta", None)
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


# -- the experts ---------------------------------------------------------------------------------


def reference_norm(base: torch.Tensor) -> float:
    """The norm a task vector is scaled against: ‖θ0‖_F, or √numel (unit RMS) where θ0 is zero (biases)."""
    norm = float(torch.linalg.vector_norm(base, dtype=torch.float32))
    return norm if norm > 0 else math.sqrt(base.numel())


def low_rank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L Rᵀ‖_F from the two thin factors: √Σ (LᵀL) ⊙ (RᵀR), without forming L Rᵀ (a batch of
    factors, (B, rows, r) and (B, columns, r): the norm of the whole batch of products)."""
    gram = left.transpose(-1, -2) @ left
    return math.sqrt(float((gram * (right.transpose(-1, -2) @ right)).sum()))


def draw_task_vector(
    reference: float,
    shape: torch.Size,
    generator: torch.Generator,
    device: torch.device,
    rel_scale: float,
    rank: int,
) -> torch.Tensor:
    """A float32 task vector with ‖τ‖_F ≈ rel_scale · reference.

    1-D (and 0-D) tensors get dense noise only. Matrices (2-D tensors, and tensors of more dims
    seen as (shape[0], rest)) get dense noise with (1 − LOW_RANK_ENERGY) of the squared norm plus a
    rank-r product L Rᵀ with the rest. A mixture of experts' fused (experts, out, in) weight is a
    batch of matrices, one per expert, each fine-tuned as a dense model's: a rank-r product per
    expert. Draw order: noise, L, R.
    """
    target = rel_scale * reference
    tau = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if tau.dim() < 2:
        return tau.mul_(target / max(float(torch.linalg.vector_norm(tau)), 1e-30))
    fused = tau.dim() == 3
    matrix = tau if fused else tau.view(shape[0], -1)
    rows, columns = matrix.shape[-2:]
    rank = min(rank, rows, columns)
    noise_norm = target * math.sqrt(1 - LOW_RANK_ENERGY)
    matrix.mul_(noise_norm / max(float(torch.linalg.vector_norm(matrix)), 1e-30))
    if rank > 0 and LOW_RANK_ENERGY > 0:
        batch = matrix.shape[:-2]
        left = torch.randn(*batch, rows, rank, generator=generator, device=device, dtype=torch.float32)
        right = torch.randn(*batch, columns, rank, generator=generator, device=device, dtype=torch.float32)
        alpha = target * math.sqrt(LOW_RANK_ENERGY) / max(low_rank_norm(left, right), 1e-30)
        if fused:
            matrix.baddbmm_(left, right.transpose(-1, -2), alpha=alpha)
        else:
            matrix.addmm_(left, right.T, alpha=alpha)
    return tau


class RandomExpert(Mapping):
    """Expert ``expert_index`` as a lazy state dict: ``expert[name]`` = θ0[name] + τ_i[name], made on request.

    ``base_value(name)`` must return θ0[name] every time it is called, e.g. a regeneration by
    :func:`base_parameter` (see :func:`random_experts`), not the live parameter of a model whose
    weights may later be overwritten. Each access returns a new float32 tensor on θ0's device; τ is
    deterministic in (seed, expert_index, name) and scaled by :func:`draw_task_vector`. Nothing is
    cached: the expert holds only ``base_value`` and the list of names.
    """

    def __init__(
        self,
        base_value: Callable[[str], torch.Tensor],
        names: Sequence[str],
        expert_index: int,
        seed: int,
        rel_scale: float = 1e-3,
        rank: int = 8,
    ) -> None:
        self.base_value = base_value
        self.names = list(names)
        self._known = frozenset(self.names)
        self.expert_index = int(expert_index)
        self.seed = int(seed)
        self.rel_scale = float(rel_scale)
        self.rank = int(rank)

    def __getitem__(self, name: str) -> torch.Tensor:
        base = self._base(name)
        return self._task_vector(name, base).add_(base)

    def task_vector(self, name: str) -> torch.Tensor:
        """τ_i[name] = expert[name] − θ0[name] in float32 (up to rounding), without adding θ0."""
        return self._task_vector(name, self._base(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __repr__(self) -> str:
        return f"RandomExpert(index={self.expert_index}, seed={self.seed}, tensors={len(self.names)})"

    def _base(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.base_value(name)

    def _task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        generator = seeded_generator(f"{self.seed}/expert{self.expert_index}/{name}", base.device)
        return draw_task_vector(
            reference_norm(base), base.shape, generator, base.device, self.rel_scale, self.rank
        )


def random_experts(
    model: torch.nn.Module,
    config: PretrainedConfig,
    names: Sequence[str],
    seed: int,
    device: torch.device | str,
    rel_scale: float = 1e-3,
    rank: int = 8,
) -> dict[str, RandomExpert]:
    """The experts ``names`` (expert i is the i-th name) of a base made by :func:`build_base` with ``seed``.

    Their θ0 is regenerated on ``device`` by :func:`base_parameter` in the model's dtype, so it stays
    θ0 even after the model's parameters are overwritten; only the names, shapes and dtypes of the
    model's parameters are read, now.
    """
    specs = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}

    def base_value(name: str) -> torch.Tensor:
        shape, dtype = specs[name]
        return base_parameter(config, name, shape, device, dtype, seed)

    return {
        expert: RandomExpert(base_value, list(specs), index, seed, rel_scale=rel_scale, rank=rank)
        for index, expert in enumerate(names)
    }


# -- the recipe's side ---------------------------------------------------------------------------

DEV_EXAMPLES = 64  # sequences per random dev set unless data.max_examples says otherwise


def check_recipe_paths(base: str, experts: Mapping[str, str]) -> PretrainedConfig:
    """A ``random://`` base takes ``random://`` experts of the same architecture: their config."""
    config = read_config(base)
    for name, path in experts.items():
        if not is_random(path):
            raise UserError(f"expert {name!r}: a random:// base takes random:// experts, not {path}")
        if config_file(path).resolve() != config_file(base).resolve():
            other = read_config(path)
            if other.to_dict() != config.to_dict():
                raise UserError(f"expert {name!r}: {path} is not the architecture of the base {base}")
    return config


def random_dev_examples(name: str, vocab: int, length: int, count: int, seed: int) -> list:
    """``count`` seeded token sequences of ``length`` (every token after the first is scored): a
    random model's dev set, drawn on the CPU so it is the same on every device."""
    from mergeopt.objectives.data import Example

    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/dev/{name}".encode()))
    ids = torch.randint(0, vocab, (count, length), generator=generator)
    scored = torch.ones(length, dtype=torch.bool)
    scored[0] = False
    return [Example(input_ids=row, scored=scored.clone()) for row in ids]
