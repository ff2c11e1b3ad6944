"""PEFT LoRA adapters as experts: an adapter directory read and checked against the base.

This module reads an adapter directory as PEFT writes it (``adapter_config.json`` +
``adapter_model.safetensors``), sorts its tensors by kind, maps every factor to the base parameter
it adapts, with its scaling (r and α possibly per module: ``rank_pattern``, ``alpha_pattern``), and
checks every shape against the base, so a mismatched adapter fails before anything is loaded. What
it returns, factors kept low-rank and dense updates (DoRA, LoRA biases, Conv1D, trainable tokens,
the adapter's own copies of base parameters), is described in :mod:`mergeopt.loading.lora_updates`;
adapters of parameters rather than modules (``target_parameters``, and the per-expert modules PEFT
converts to it) are resolved by :mod:`mergeopt.loading.lora_parameters`.

The dense updates are stacked densely (``mergeopt.merging.stacking``); the rest stays low-rank,
embedding LoRA included (its factors are kept as Aᵀ and Bᵀ, a linear weight's layout). The
layer's own weight, which PEFT saves beside the factors of an embedding or an output layer
(``save_embedding_layers``: a LoRA on ``embed_tokens`` or ``lm_head``), is a dense update too, with
the factors kept low-rank: it is θ0 in practice, and the stack holds dense rows for it only where
it is not.
Not supported (a one-line error): adapter types other than LoRA, and the options that change the
model beyond its weights (:data:`mergeopt.loading.peft_format.CHANGES_THE_MODEL`). Pickled ``adapter_model.bin`` files are
read only with ``allow_pickle`` (then ``torch.load(weights_only=True)``). What a memory plan
reads of an adapter, its header only, is in :mod:`mergeopt.loading.lora_sizes`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from mergeopt.errors import UserError
from mergeopt.inputs import safetensors_header
from mergeopt.loading.lora_parameters import (
    peft_converted,
    per_expert_factors,
    resolved_parameters,
)
from mergeopt.loading.lora_tied import check_saved_tied_embedding, check_untied
from mergeopt.loading.lora_updates import DenseUpdate, LoraAdapter, LoraFactors
from mergeopt.loading.peft_format import (
    CONFIG_FILE,
    EMBEDDING,
    FACTOR,
    LORA_BIAS,
    MAGNITUDE,
    PICKLE_FILE,
    PREFIX,
    SAFETENSORS_FILE,
    TOKENS,
    copy_of_another_shape,
    left_unread,
    read_adapter_config,
    scaling_for,
)


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


def _check_copy_shape(path: Path, key: str, target: str, tensor: torch.Tensor, base_shapes) -> None:
    """An adapter's copy of a base parameter has that parameter's name and shape."""
    if target not in base_shapes:
        raise UserError(f"{path}: unexpected tensor {key} in a LoRA adapter (the base has no {target})")
    if tuple(tensor.shape) != tuple(base_shapes[target]):
        raise copy_of_another_shape(path, key, tensor.shape, target, base_shapes[target])


def _sorted_tensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    base_shapes,
    tied: Collection[str] = (),
    wrapped: Collection[str] = (),
) -> dict[str, dict]:
    """The adapter's tensors by kind: linear and embedding factor pairs, factor pairs of adapted
    parameters (``wrapped``: their wrappers' keys), DoRA magnitudes and LoRA biases by module, and the
    adapter's own copies of base parameters (modules_to_save, trained biases, an adapted
    embedding's ``base_layer.weight``) by the base parameter they replace; copies of a parameter
    the base ties to another (``tied``) apart, for :func:`mergeopt.loading.lora_tied.check_saved_tied_embedding`."""
    kinds: dict[str, dict] = {
        "parameter": {},
        "linear": {},
        "embedding": {},
        "magnitude": {},
        "bias": {},
        "tokens": {},
        "copy": {},
        "tied copy": {},
    }
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if (match := FACTOR.match(name)) and match["module"] in wrapped:
            kinds["parameter"].setdefault(match["module"], {})[match["which"]] = tensor
        elif match := FACTOR.match(name):
            kinds["linear"].setdefault(match["module"], {})[match["which"]] = tensor
        elif match := EMBEDDING.match(name):
            kinds["embedding"].setdefault(match["module"], {})[match["which"]] = tensor
        elif match := MAGNITUDE.match(name):
            kinds["magnitude"][match["module"]] = tensor
        elif match := LORA_BIAS.match(name):
            kinds["bias"][match["module"]] = tensor
        elif match := TOKENS.match(name):
            kinds["tokens"][match["module"]] = tensor
        else:
            target = name.replace(".base_layer.", ".")
            if target in tied:  # no shape of its own in the base's file: checked against the one it shares
                kinds["tied copy"][target] = tensor
            else:
                _check_copy_shape(path, key, target, tensor, base_shapes)
                kinds["copy"][target] = tensor
        if not torch.isfinite(tensor).all():
            raise UserError(f"{path}: tensor {key} of the adapter contains NaN or Inf")
    return kinds


def _pair(path: Path, module: str, ab: Mapping[str, torch.Tensor], prefix: str) -> tuple:
    if set(ab) != {"A", "B"}:
        raise UserError(f"{path}: module {module} has {prefix}{next(iter(ab))} but not its pair")
    return ab["A"], ab["B"]


def read_adapter(
    path: str | Path,
    base_shapes: Mapping[str, Sequence[int]],
    allow_pickle: bool = False,
    tied: Collection[str] = (),
    model: torch.nn.Module | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory and check every tensor against the base's parameter shapes
    (``tied``: parameters the base ties to another, absent from its file, e.g. ``lm_head.weight``).

    Linear and embedding factors stay :class:`LoraFactors`; DoRA modules, LoRA biases, adapted
    parameters (``target_parameters``) and the adapter's own copies of base parameters become
    :class:`DenseUpdate` s (see :mod:`mergeopt.loading.lora_updates`). ``model``, the base's
    architecture (on the meta device), resolves adapted parameters and converts adapters of
    per-expert modules as PEFT does (:mod:`mergeopt.loading.lora_parameters`); without it such
    adapters are refused.
    """
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_tensors(path, allow_pickle)
    unread = left_unread(config, tensors)
    tensors = {k: t for k, t in tensors.items() if k not in unread}
    if model is not None:
        config, tensors = peft_converted(path, config, tensors, model)
    wrapped = resolved_parameters(path, config, model)
    kinds = _sorted_tensors(path, tensors, base_shapes, tied, wrapped)
    check_saved_tied_embedding(path, config, kinds, tied, model)
    if not any(kinds[k] for k in ("parameter", "linear", "embedding", "copy", "tokens")):
        raise UserError(f"{path}: the adapter holds no LoRA factors")
    updates = _Updates(path, config, base_shapes, tied, kinds)
    updates.of_parameters(wrapped)
    updates.of_linear_layers()
    updates.of_embeddings()
    updates.of_trainable_tokens()
    return LoraAdapter(path, config, updates.factors, updates.remaining_copies())


class _Updates:
    """An adapter's sorted tensors turned, kind by kind, into the factors kept low-rank and the
    dense updates, each checked against the base's shapes. The DoRA magnitudes, LoRA biases and
    saved copies of base parameters are popped as the modules they belong to use them; what is
    left is either an error (a magnitude or a bias without factors) or a plain copy."""

    def __init__(self, path: Path, config: Mapping, base_shapes, tied: Collection[str], kinds: dict):
        self.path, self.config, self.base_shapes, self.tied, self.kinds = (
            path,
            config,
            base_shapes,
            tied,
            kinds,
        )
        self.magnitudes, self.copies, self.biases = kinds["magnitude"], kinds["copy"], kinds["bias"]
        self.factors: dict[str, LoraFactors] = {}
        self.dense: dict[str, DenseUpdate] = {}

    def of_parameters(self, wrapped: Mapping) -> None:
        """LoRA of parameters (``target_parameters``): s·B·A in the parameter's layout, per expert
        of a fused parameter, a dense update."""
        for key, ab in sorted(self.kinds["parameter"].items()):
            target = wrapped[key]
            a, b = _pair(self.path, key, ab, "lora_")
            r, scaling = scaling_for(self.config, target.name)
            in_features, out_features = target.in_out
            _check_pair(
                self.path,
                key,
                ("lora_A", a, (r * target.experts, in_features)),
                ("lora_B", b, (out_features, r * target.experts)),
                target.name,
                target.shape,
                rank=r,
            )
            lora = LoraFactors(*per_expert_factors(a, b, target), scaling)
            self.dense[target.name] = DenseUpdate(None, lora, parameter=True)

    def of_linear_layers(self) -> None:
        """Linear (and Conv1D) factors: kept low-rank, or a dense update with DoRA or a Conv1D's
        transposed layout; a LoRA bias beside them."""
        path, base_shapes = self.path, self.base_shapes
        for module, ab in sorted(self.kinds["linear"].items()):
            a, b = _pair(path, module, ab, "lora_")
            target = f"{module}.weight"
            check_untied(path, target, self.tied)
            if target not in base_shapes:
                raise UserError(f"{path}: adapts {module}, but the base has no parameter {target}")
            if len(base_shapes[target]) != 2:
                raise UserError(f"{path}: adapts {module}, whose {target} is not a matrix (convolution LoRA)")
            transposed = bool(self.config.get("fan_in_fan_out"))  # a Conv1D weight (GPT-2) is in × out
            out_features, in_features = base_shapes[target][:: -1 if transposed else 1]
            r, scaling = scaling_for(self.config, module)
            _check_pair(
                path,
                module,
                ("lora_A", a, (r, in_features)),
                ("lora_B", b, (out_features, r)),
                target,
                base_shapes[target],
            )
            magnitude = self.magnitudes.pop(module, None)
            if magnitude is not None or transposed:  # DoRA, Conv1D: dense
                _check_magnitude(path, module, magnitude, out_features)
                # a Conv1D's ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ, and DoRA's norms run over its columns
                lora = (
                    LoraFactors(b.T.contiguous(), a.T.contiguous(), scaling)
                    if transposed
                    else LoraFactors(a, b, scaling)
                )
                self.dense[target] = DenseUpdate(
                    self.copies.pop(target, None), lora, magnitude, norm_dim=0 if transposed else 1
                )
            else:
                self._low_rank(target, LoraFactors(a, b, scaling))
            self._lora_bias(module, out_features, scaling)

    def _low_rank(self, target: str, lora: LoraFactors) -> None:
        self.factors[target] = lora
        if target in self.copies:  # the layer's own weight, saved beside the factors: θ0 + s·B·A over it
            self.dense[target] = DenseUpdate(self.copies.pop(target))

    def _lora_bias(self, module: str, out_features: int, scaling: float) -> None:
        bias = self.biases.pop(module, None)
        if bias is None:
            return
        if f"{module}.bias" not in self.base_shapes:
            raise UserError(
                f"{self.path}: {module} has a LoRA bias (lora_bias), but the base's {module} has none"
            )
        if tuple(bias.shape) != (out_features,):
            raise UserError(f"{self.path}: {module}'s LoRA bias is {list(bias.shape)}, not [{out_features}]")
        self.dense[f"{module}.bias"] = DenseUpdate(self.copies.pop(f"{module}.bias", None), scaling * bias)

    def of_embeddings(self) -> None:
        """Embedding factors, E' = E + s·(B·A)ᵀ: kept low-rank in a linear weight's layout, or a
        dense update with DoRA."""
        path, base_shapes = self.path, self.base_shapes
        for module, ab in sorted(self.kinds["embedding"].items()):
            a, b = _pair(path, module, ab, "lora_embedding_")
            target = f"{module}.weight"
            if target not in base_shapes or len(base_shapes[target]) != 2:
                raise UserError(f"{path}: adapts the embedding {module}, but the base has no matrix {target}")
            rows, width = base_shapes[target]
            r, scaling = scaling_for(self.config, module)
            _check_pair(
                path,
                module,
                ("lora_embedding_A", a, (r, rows)),
                ("lora_embedding_B", b, (width, r)),
                target,
                base_shapes[target],
            )
            magnitude = self.magnitudes.pop(module, None)
            _check_magnitude(path, module, magnitude, width)
            # E' = E + s·(B·A)ᵀ = E + s·Aᵀ·Bᵀ: factors b = Aᵀ (rows × r) and a = Bᵀ (r × width), the
            # layout of a linear weight's (out × in), so the stacked factors serve an embedding too
            lora = LoraFactors(b.T.contiguous(), a.T.contiguous(), scaling)
            if magnitude is not None:  # DoRA: dense
                self.dense[target] = DenseUpdate(self.copies.pop(target, None), lora, magnitude, norm_dim=0)
            else:
                self._low_rank(target, lora)

    def of_trainable_tokens(self) -> None:
        """Trainable tokens: rows of an embedding replaced, a dense update (never beside factors)."""
        path, base_shapes = self.path, self.base_shapes
        for module, values in sorted(self.kinds["tokens"].items()):
            target = f"{module}.weight"
            if target in self.dense or target in self.factors:
                raise UserError(
                    f"{path}: {module} has trainable tokens and LoRA factors; mergeopt reads one or the other"
                )
            if target not in base_shapes or len(base_shapes[target]) != 2:
                raise UserError(f"{path}: trainable tokens for {module}, but the base has no matrix {target}")
            ids = _token_ids(path, self.config, module, values, base_shapes[target])
            self.dense[target] = DenseUpdate(self.copies.pop(target, None), rows=(ids, values))

    def remaining_copies(self) -> dict[str, DenseUpdate]:
        """Every dense update by name, the copies no module used included; a magnitude or bias left
        over names a module without factors."""
        for what, left in (("lora_magnitude_vector", self.magnitudes), ("LoRA bias", self.biases)):
            if left:
                raise UserError(f"{self.path}: {what} of {min(left)} without LoRA factors for that module")
        self.dense.update({target: DenseUpdate(start=value) for target, value in self.copies.items()})
        return dict(sorted(self.dense.items()))


def _check_pair(
    path: Path, module: str, a: tuple, b: tuple, target: str, whole: Sequence[int], rank: int | None = None
) -> None:
    """Each factor as (its name, the tensor, the shape the base's ``whole`` and the module's rank
    call for)."""
    (a_name, a_value, a_shape), (b_name, b_value, b_shape) = a, b
    if tuple(a_value.shape) != a_shape or tuple(b_value.shape) != b_shape:
        raise UserError(
            f"{path}: {module} has {a_name} {list(a_value.shape)} and {b_name} {list(b_value.shape)}, but the "
            f"base's {target} is {list(whole)} and the adapter's rank there is {rank or a_shape[0]}"
        )


def _token_ids(
    path: Path, config: Mapping, module: str, values: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """The token ids whose rows ``values`` are, from ``trainable_token_indices``: a list (the input
    embedding's) or {module name: list}, matched as PEFT matches it (the name or its last parts)."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, Mapping):
        indices = next((v for k, v in indices.items() if module == k or module.endswith(f".{k}")), None)
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):
        raise UserError(
            f"{path / CONFIG_FILE}: trainable_token_indices gives no list of token ids for {module}"
        )
    if len(indices) != values.shape[0] or values.dim() != 2 or values.shape[1] != shape[1]:
        raise UserError(
            f"{path}: {module}'s trainable tokens are {list(values.shape)}, but trainable_token_indices "
            f"lists {len(indices)} token(s) of the base's width {shape[1]}"
        )
    if indices and not 0 <= min(indices) <= max(indices) < shape[0]:
        raise UserError(
            f"{path / CONFIG_FILE}: trainable_token_indices lists token {max(indices)}, "
            f"beyond the base's {shape[0]} rows of {module} (resize the base's vocabulary)"
        )
    return torch.tensor(indices, dtype=torch.long)


def _check_magnitude(path: Path, module: str, magnitude: torch.Tensor | None, size: int) -> None:
    if magnitude is not None and tuple(magnitude.shape) != (size,):
        raise UserError(f"{path}: {module}'s lora_magnitude_vector is {list(magnitude.shape)}, not [{size}]")
