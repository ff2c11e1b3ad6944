"""Hugging Face checkpoint directories: reading headers lazily, checking experts against the base.

A merge is only meaningful between checkpoints of one architecture with identical tensor names,
shapes and vocabulary. Everything here reads safetensors *headers* first, so a mismatch is reported
before a single weight is loaded, naming the first offending tensor and both directories. Pickle
(``.bin``) checkpoints are refused, since loading them can execute code, unless the recipe sets
``model.allow_pickle`` (then ``torch.load(weights_only=True)``, which refuses anything but tensors).
Experts may also be PEFT LoRA adapter directories (:mod:`mergeopt.loading.lora`), checked against the
base's tensor shapes and, when the adapter names a local base directory, against that directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mergeopt.errors import UserError, warn
from mergeopt.inputs import existing_dir, safetensors_header
from mergeopt.loading.adapter_base import check_adapter_base
from mergeopt.loading.base_model import meta_model
from mergeopt.loading.conversions import plan_conversions, read_converted, read_converted_rows
from mergeopt.loading.lora import read_adapter
from mergeopt.loading.lora_updates import LoraAdapter
from mergeopt.loading.peft_format import CONFIG_FILE as ADAPTER_CONFIG
from mergeopt.loading.peft_format import is_adapter
from mergeopt.loading.precision import precision_warning
from mergeopt.loading.tokenizer_vocab import vocabulary_difference

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# pickles a transformers Trainer saves beside the weights (its arguments, the optimizer's state):
# no weights, so a directory holding them and no weights is not one of "pickle weights"
TRAINER_PICKLES = frozenset(("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"))


def pickled_weights(path: Path) -> list[str]:
    """The pickle files in ``path`` that may hold weights (``*.bin``, ``*.pt``; not a Trainer's own)."""
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    return [name for name in found if name not in TRAINER_PICKLES]


OUTPUT_WEIGHT = "lm_head.weight"  # the output layer of Hugging Face's *ForCausalLM models


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """One HF checkpoint directory, described by its config.json and safetensors headers."""

    path: Path
    config: dict
    tensors: dict[str, TensorMeta]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _loaded: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # pickled checkpoints
    # names transformers converts on load (mergeopt.loading.conversions): the conversion of each
    # model parameter, the checkpoint as stored, and the last conversion's tensors
    _conversions: dict | None = field(default=None, repr=False)
    _stored: Checkpoint | None = field(default=None, repr=False)
    _last_converted: tuple | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return ",".join(archs)

    @property
    def vocab_size(self) -> int | None:
        vocab = self.config.get("vocab_size")
        if vocab is None and isinstance(self.config.get("text_config"), dict):
            vocab = self.config["text_config"].get("vocab_size")
        return vocab

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Load one tensor (and only that one) from its safetensors file."""
        meta = self.tensors.get(name)
        if meta is None:
            raise UserError(f"tensor {name} is not in checkpoint {self.path}")
        if self._conversions is not None and name in self._conversions:
            return read_converted(self, name).to(device)
        if self._stored is not None:
            return self._stored.read(name, device)
        if self._loaded is not None:
            return self._loaded[name].to(device)
        return self._handle(meta).get_tensor(name).to(device)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor: only those bytes are read (a sharded stack's block)."""
        meta = self.tensors.get(name)
        if meta is None:
            raise UserError(f"tensor {name} is not in checkpoint {self.path}")
        if self._conversions is not None and name in self._conversions:
            return read_converted_rows(self, name, start, stop)
        if self._stored is not None:
            return self._stored.read_rows(name, start, stop)
        if self._loaded is not None:
            return self._loaded[name][start:stop].clone()
        return self._handle(meta).get_slice(name)[start:stop]

    def _handle(self, meta: TensorMeta):
        """The open safetensors file holding a tensor (opened once, kept until :meth:`close`)."""
        handle = self._handles.get(meta.file)
        if handle is None:
            handle = self._handles[meta.file] = safe_open(str(meta.file), framework="pt", device="cpu")
        return handle

    def close(self) -> None:
        self._handles.clear()
        self._last_converted = None
        if self._stored is not None:
            self._stored.close()


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``; malformed JSON or another type is a one-line error naming ``what``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: {what} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return data


def _header(file: Path) -> dict[str, TensorMeta]:
    return {name: TensorMeta(file, shape, dtype) for name, (shape, dtype) in safetensors_header(file).items()}


def _open_pickled(path: Path, config: dict) -> Checkpoint:
    """A pickled checkpoint (single or sharded), read with weights_only=True and memory-mapped."""
    index_file = path / PICKLE_INDEX
    if index_file.is_file():
        weight_map = read_json_object(index_file, PICKLE_INDEX).get("weight_map") or {}
        files = [path / shard for shard in sorted(set(weight_map.values()))]
    else:
        files = [path / PICKLE_FILE]
    loaded: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{path}: pickle shard {file.name} is missing")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # weights_only refuses anything but tensors: say so in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{file}: cannot be read with weights_only=True ({first})") from None
        for name, tensor in state.items():
            loaded[name] = tensor
            tensors[name] = TensorMeta(file, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return Checkpoint(path=path, config=config, tensors=tensors, _loaded=loaded)


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells a repository


def looks_like_hub_name(path: str | Path) -> bool:
    """A path that does not exist and reads as ``owner/name``: a hub repository given for a directory."""
    return HUB_NAME.fullmatch(str(path)) is not None and not Path(path).exists()


def _labelled(role: str | None, message: str) -> str:
    """``message`` after the recipe key it is about, when there is one."""
    return message if role is None else f"{role}: {message}"


def _not_a_checkpoint(path: Path) -> str:
    """Why ``path`` is no checkpoint: a trainer's output directory (TRL's, transformers' Trainer's)
    holding only its ``checkpoint-N`` saves, the final one missing, is said to be one, naming the
    latest save, which is what the user would give instead."""
    saves = [
        d
        for d in path.glob("checkpoint-*")
        if d.name.removeprefix("checkpoint-").isdigit()
        and any((d / name).is_file() for name in ("config.json", ADAPTER_CONFIG))
    ]
    if not saves:
        return "not a Hugging Face checkpoint directory"
    latest = max(saves, key=lambda d: int(d.name.removeprefix("checkpoint-")))
    return (
        f"a trainer's output directory without its final save, holding {len(saves)} checkpoint-N "
        f"save(s): give one of them, the latest is {latest}"
    )


def open_checkpoint(path: str | Path, allow_pickle: bool = False, role: str | None = None) -> Checkpoint:
    """Describe a checkpoint directory from config.json and its (possibly sharded) safetensors headers.

    ``role``: the recipe key that names it (``model.base``, ``model.experts.math``), said first in
    the refusal of a path that is missing or not a checkpoint, so the user knows which line to fix.
    """
    if looks_like_hub_name(path):
        raise UserError(
            _labelled(
                role,
                f"checkpoint directory {path} does not exist; it reads as a Hugging Face hub "
                f"name, but mergeopt downloads nothing: fetch it first (hf download {path} --local-dir DIR) "
                "and give DIR",
            )
        )
    path = existing_dir(path, _labelled(role, "checkpoint directory"))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(_labelled(role, f"{path} has no config.json: {_not_a_checkpoint(path)}"))
    config = read_json_object(config_file, "config.json")

    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json_object(index_file, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_file}: has no weight_map")
        tensors: dict[str, TensorMeta] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = path / shard
            if not shard_file.is_file():
                raise UserError(f"{index_file} names shard {shard}, which is missing from {path}")
            tensors.update(_header(shard_file))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise UserError(f"{index_file} maps {missing[0]} to a shard that does not contain it")
    elif (path / SINGLE_FILE).is_file():
        tensors = _header(path / SINGLE_FILE)
    else:
        pickles = pickled_weights(path)
        if pickles and allow_pickle and ((path / PICKLE_FILE).is_file() or (path / PICKLE_INDEX).is_file()):
            return _open_pickled(path, config)
        if pickles:
            raise UserError(
                f"{path} holds only pickle weights ({pickles[0]}), which can run code when loaded; convert "
                "with model.save_pretrained(dir), or set model.allow_pickle: true to read them with "
                "torch.load(weights_only=True)"
            )
        raise UserError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}")
    method = _quantization(config, tensors)
    if method is not None:
        raise UserError(
            _labelled(
                role,
                f"{path} holds {method}-quantized weights (config.json's quantization_config): mergeopt "
                "merges unquantized weights; give it a bfloat16 or float32 copy (loaded dequantized "
                "by transformers, then save_pretrained)",
            )
        )
    return Checkpoint(path=path, config=config, tensors=tensors)


# safetensors dtypes of unquantized weights
FLOAT_DTYPES = frozenset({"F64", "F32", "BF16", "F16"})


def _quantization(config: dict, tensors: dict[str, TensorMeta]) -> str | None:
    """The quantization method of a checkpoint whose config.json says it is quantized and whose
    tensors are (packed integers, float8, ...); None for a dequantized copy that kept the entry."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    if all(meta.dtype.upper() in FLOAT_DTYPES for meta in tensors.values()):
        return None
    return str(quantization.get("quant_method") or "quantized")


def stored_differently(base: Checkpoint, expert: Checkpoint, model: torch.nn.Module | None) -> bool:
    """Whether one of the two stores, under the model's own name, a parameter the other stores
    another way (fused experts against one tensor per expert, as a training loop's own save may
    write them), rather than one merely lacking a tensor."""
    if model is None or set(base.tensors) == set(expert.tensors):
        return False
    params = {name for name, _ in model.named_parameters()}
    return bool((set(base.tensors) ^ set(expert.tensors)) & params)


def check_compatible_as_stored(
    base: Checkpoint, expert: Checkpoint, expert_name: str, model: torch.nn.Module | None
) -> None:
    """:func:`check_compatible` on the tensors as stored, or, where the two are stored differently
    (:func:`stored_differently`), as ``model`` holds them."""
    if stored_differently(base, expert, model):
        base, expert = under_model_names(base, model), under_model_names(expert, model)
    check_compatible(base, expert, expert_name)


def under_model_names(checkpoint: Checkpoint, model: torch.nn.Module) -> Checkpoint:
    """``checkpoint`` as the model's parameters: converted names with the model's shapes, the
    other tensors as stored. The checkpoint itself when nothing is converted."""
    conversions = plan_conversions(model, checkpoint.tensors)
    if not conversions:
        return checkpoint
    converted_sources = {name for c in conversions.values() for name, _ in c.sources}
    tensors = {n: m for n, m in checkpoint.tensors.items() if n not in converted_sources}
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for target, conversion in conversions.items():
        first = checkpoint.tensors[conversion.sources[0][0]]
        tensors[target] = TensorMeta(first.file, shapes[target], first.dtype)
    return replace(checkpoint, tensors=tensors, _handles={}, _conversions=conversions, _stored=checkpoint)


def check_compatible(base: Checkpoint, expert: Checkpoint, expert_name: str) -> None:
    """Raise a one-line UserError at the first difference that makes merging meaningless."""
    where = f"base {base.path} vs expert {expert_name!r} {expert.path}"
    if base.architecture != expert.architecture:
        raise UserError(f"architecture differs: {base.architecture} vs {expert.architecture} ({where})")
    if base.vocab_size != expert.vocab_size:
        raise UserError(f"vocabulary size differs: {base.vocab_size} vs {expert.vocab_size} ({where})")
    for name, meta in base.tensors.items():
        other = expert.tensors.get(name)
        if other is None:
            raise UserError(f"tensor {name} is missing from the expert ({where})")
        if other.shape != meta.shape:
            raise UserError(f"tensor {name} has shape {list(meta.shape)} vs {list(other.shape)} ({where})")
    extra = sorted(set(expert.tensors) - set(base.tensors))
    if extra:
        raise UserError(f"tensor {extra[0]} is in the expert but not in the base ({where})")
    if (difference := vocabulary_difference(base.path, expert.path)) is not None:
        raise UserError(f"tokenizer vocabulary differs{difference} ({where})")


def check_config_matches_weights(
    checkpoint: Checkpoint, what: str, trust_remote_code: bool = False, model: torch.nn.Module | None = None
) -> None:
    """The architecture ``config.json`` describes has the shapes of the checkpoint's own tensors.

    transformers would build the model from config.json, find every tensor the wrong size and fail
    with a report of many lines; the mismatch is the checkpoint's, named here in one line. Compared
    on the meta device (no weights read), over the tensors both name.
    """
    if not checkpoint.tensors:
        return
    if model is None:
        model, _ = meta_model(checkpoint.path, trust_remote_code)
    for name, parameter in model.named_parameters():
        meta = checkpoint.tensors.get(name)
        if meta is not None and tuple(meta.shape) != tuple(parameter.shape):
            raise UserError(
                f"{checkpoint.path / 'config.json'} disagrees with the {what}'s weights: it describes "
                f"{name} as {list(parameter.shape)}, but {meta.file.name} holds {list(meta.shape)} "
                "(is config.json from another model?)"
            )


def open_all(base_path: str | Path, experts: dict[str, str]) -> tuple[Checkpoint, dict[str, Checkpoint]]:
    """Open the base and every expert and check each expert against the base, before any weight is read."""
    base = open_checkpoint(base_path, role="model.base")
    opened = {}
    for name, path in experts.items():
        opened[name] = open_checkpoint(path, role=f"model.experts.{name}")
        check_compatible(base, opened[name], name)
    return base, opened


def tied_parameters(base: Checkpoint) -> set[str]:
    """The base's parameters that share another's weight and are not in its files: a tied output
    layer (Hugging Face's default is to tie), as the adapters' checks need them."""
    text = base.config.get("text_config") or base.config
    tie = text.get("tie_word_embeddings", base.config.get("tie_word_embeddings", True))
    return {OUTPUT_WEIGHT} if base.tensors and tie and OUTPUT_WEIGHT not in base.tensors else set()


def gguf_base(base_path: str | Path, gguf_file: str, trust_remote_code: bool = False) -> Checkpoint:
    """A GGUF base described without reading its weights: the architecture on the meta device.

    GGUF names its tensors its own way; transformers maps them to the model's names when it loads
    the file, so the shapes to check experts against are the model's, built from the GGUF's config.
    """
    path = Path(base_path)
    if not (path / gguf_file).is_file():
        raise UserError(f"model.gguf_file {gguf_file!r} is not a file in {path}")
    model, config = meta_model(path, trust_remote_code, gguf_file)
    tensors = {n: TensorMeta(path / gguf_file, tuple(p.shape), "F32") for n, p in model.named_parameters()}
    described = config.to_dict()
    described["architectures"] = [type(model).__name__]  # a GGUF config names only its model_type
    return Checkpoint(path=path, config=described, tensors=tensors)


def open_experts(
    base_path: str | Path,
    experts: dict[str, str],
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Checkpoint, dict[str, Checkpoint], dict[str, LoraAdapter]]:
    """Open the base and every expert, dense checkpoints and LoRA adapters, and check them against the base.

    Dense experts are checked from their headers; adapters are read (their factors are small) and
    checked against the base's tensor shapes. A GGUF base is described by its architecture. The
    base and the dense experts are returned under the model's parameter names, where transformers
    converts the checkpoint's on load (a mixture-of-experts' fused expert weights:
    :mod:`mergeopt.loading.conversions`).
    """
    model = architecture = None
    if gguf_file is not None:
        base = gguf_base(base_path, gguf_file, trust_remote_code)
        architecture, _ = meta_model(base_path, trust_remote_code, gguf_file)  # adapters' target_parameters
    else:
        base = open_checkpoint(base_path, allow_pickle, role="model.base")
        if base.tensors:
            model, _ = meta_model(base.path, trust_remote_code)
        check_config_matches_weights(base, "base", trust_remote_code, model)
    shapes = {name: meta.shape for name, meta in base.tensors.items()}
    tied = tied_parameters(base)
    dense, adapters = {}, {}
    for name, path in experts.items():
        if is_adapter(path):
            adapters[name] = read_adapter(path, shapes, allow_pickle, tied, model or architecture)
            check_adapter_base(adapters[name].base_model, Path(path), base.path, name)
        else:
            dense[name] = open_checkpoint(path, allow_pickle, role=f"model.experts.{name}")
            check_compatible_as_stored(base, dense[name], name, model)
    if (note := precision_warning(base, dense)) is not None:
        warn(note)
    if model is not None:
        base = under_model_names(base, model)
        dense = {name: under_model_names(expert, model) for name, expert in dense.items()}
    return base, dense, adapters
