"""Checkpoints under the model's own parameter names, where transformers converts them on load.

Why: transformers 5 holds some architectures' weights differently from how their checkpoints store
them. A Mixtral or Qwen3-MoE checkpoint has one tensor per expert and projection
(``model.layers.0.block_sparse_moe.experts.3.w1.weight``); the model one fused (experts, out, in)
parameter (``model.layers.0.mlp.experts.gate_up_proj``), which ``from_pretrained`` forms as it
loads, following the model's checkpoint conversion mapping. mergeopt reads the experts tensor by
tensor from their safetensors, by the model's parameter names, so it applies that same mapping,
read from transformers (``get_model_conversion_mapping``, the function PEFT uses for the same
purpose), rather than a copy of it: :func:`mergeopt.loading.checkpoints.under_model_names` presents
a checkpoint under the model's names and shapes, and reading a converted name reads its sources
and runs transformers' conversion on them alone (a block of a fused weight's experts, on those
experts' tensors alone).

A transformers release without conversions (4.x) holds every weight as it is stored: then, and for
every architecture without a mapping, the checkpoint is used as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mergeopt.errors import UserError


@dataclass
class Conversion:
    """How one or more model parameters are formed from checkpoint tensors: ``converter`` is a
    transformers ``WeightConverter`` (None: a rename, one source read as it is) and ``sources``
    the (checkpoint name, source pattern) pairs it collects, in transformers' loading order."""

    converter: object | None
    sources: list[tuple[str, str]] = field(default_factory=list)
    first_target: str = ""

    def convert(self, read) -> dict[str, torch.Tensor]:
        """Every parameter this conversion forms, from ``read(name)`` of each source."""
        if self.converter is None:
            ((name, _),) = self.sources
            return {self.first_target: read(name)}
        converter = copy.deepcopy(self.converter)  # collects tensors: one copy per conversion
        for name, pattern in self.sources:
            converter.add_tensor(self.first_target, name, pattern, read(name))
        try:
            return converter.convert(self.first_target)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"cannot form {self.first_target} from {self.sources[0][0]} and the other tensors "
                f"transformers' conversion mapping joins into it ({first})"
            ) from None


# safetensors header dtypes (a pickled checkpoint records torch's names)
_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _transformers_api():
    """transformers' mapping functions, or None where this transformers converts nothing (4.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:
        return None
    return get_model_conversion_mapping, WeightConverter, dot_natural_key, rename_source_key


def plan_conversions(model: torch.nn.Module, names: Iterable[str]) -> dict[str, Conversion]:
    """For checkpoint tensor ``names`` of ``model``'s architecture (the model may live on the meta
    device), the conversion forming each model parameter whose name or layout differs from the
    checkpoint's; empty when the checkpoint is stored as the model holds it."""
    api = _transformers_api()
    if api is None or not hasattr(model, "base_model_prefix"):
        return {}
    get_mapping, weight_converter, natural_key, rename = api
    transforms = get_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, weight_converter)]
    converters = [t for t in transforms if isinstance(t, weight_converter)]
    params = model.state_dict()
    groups: dict[str, Conversion] = {}
    for name in sorted(names, key=natural_key):
        target, pattern = rename(name, renamings, converters, model.base_model_prefix, params)
        if target not in params and name in params:
            continue  # stored as the model holds it
        if target not in params or (target == name and pattern is None):
            continue  # not a parameter of this model (transformers ignores it too), or unchanged
        if pattern is None:
            groups[target] = Conversion(None, [(name, name)], target)
            continue
        group = groups.get(target)
        if group is None:
            prototype = next(c for c in converters if pattern in c.source_patterns)
            group = groups[target] = Conversion(prototype, [], target)
        group.sources.append((name, pattern))
    conversions: dict[str, Conversion] = {}
    for first, group in groups.items():
        targets = [first]
        if group.converter is not None:  # one source to many targets (a fused qkv split)
            patterns = group.converter.target_patterns
            targets = [first.replace(patterns[0], p) for p in patterns]
        for target in targets:
            if target in params:
                conversions[target] = group
    return conversions


def _expert_block(conversion: Conversion, rows: int, start: int, stop: int) -> Conversion | None:
    """The conversion of rows [start, stop) alone, where the first dimension is the experts: the
    converter stacks one source per expert along it (``MergeModulelist(dim=0)``), then at most
    joins the projections along another dimension, so those rows are formed from those experts'
    sources alone (a sharded stack's block reads only them). None for any other conversion."""
    operations = getattr(conversion.converter, "operations", None) or []
    kinds = [type(op).__name__ for op in operations]
    if not kinds or kinds[0] != "MergeModulelist" or getattr(operations[0], "dim", None) != 0:
        return None
    if any(k != "Concatenate" or getattr(op, "dim", 0) == 0 for k, op in zip(kinds[1:], operations[1:])):
        return None
    per_pattern: dict[str, list[tuple[str, str]]] = {}
    for source in conversion.sources:
        per_pattern.setdefault(source[1], []).append(source)
    if any(len(sources) != rows for sources in per_pattern.values()):
        return None
    block = [s for sources in per_pattern.values() for s in sources[start:stop]]
    return Conversion(conversion.converter, block, conversion.first_target)


def read_converted_rows(checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a converted parameter: of a renamed one, those rows of the stored
    tensor; of a mixture of experts' fused weight, from those experts' tensors alone; of any other
    conversion, cut from the whole."""
    conversion = checkpoint._conversions[name]
    if conversion.converter is None:  # renamed only: those rows of the stored tensor
        return checkpoint._stored.read_rows(conversion.sources[0][0], start, stop)
    meta = checkpoint.tensors[name]
    shape = meta.shape
    if stop <= start:  # a rank past the last expert: an empty block, nothing read
        dtype = _STORED_DTYPES.get(meta.dtype) or getattr(torch, meta.dtype.lower(), torch.float32)
        return torch.empty((0, *shape[1:]), dtype=dtype)
    block = _expert_block(conversion, shape[0], start, stop)
    if block is None:
        return read_converted(checkpoint, name)[start:stop].clone()
    tensor = block.convert(checkpoint._stored.read).get(name)
    tensor = tensor[0] if isinstance(tensor, list) else tensor
    expected = (stop - start, *shape[1:])
    if tensor is None or tuple(tensor.shape) != expected:
        raise UserError(
            f"{checkpoint.path}: converting experts {start} to {stop - 1} of {name} gave "
            f"{'nothing' if tensor is None else list(tensor.shape)}, not {list(expected)}"
        )
    return tensor


def read_converted(checkpoint, name: str) -> torch.Tensor:
    """A converted parameter of ``checkpoint`` (:func:`under_model_names`), formed from its sources
    by transformers' conversion and checked against the model's shape."""
    conversion = checkpoint._conversions[name]
    cached = checkpoint._last_converted
    if cached is None or cached[0] is not conversion:
        formed = conversion.convert(checkpoint._stored.read)
        checkpoint._last_converted = cached = (conversion, formed)
    tensor = cached[1].get(name)
    if isinstance(tensor, list):
        tensor = tensor[0]
    expected = checkpoint.tensors[name].shape
    if tensor is None or tuple(tensor.shape) != tuple(expected):
        got = "nothing" if tensor is None else list(tensor.shape)
        sources = ", ".join(n for n, _ in conversion.sources[:2]) + (
            ", ..." if len(conversion.sources) > 2 else ""
        )
        raise UserError(
            f"{checkpoint.path}: converting {sources} to {name} gave {got}, not the model's "
            f"{list(expected)} (are all of its experts' tensors in the checkpoint?)"
        )
    return tensor
