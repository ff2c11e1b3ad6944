"""PEFT's adapter directory as written on disk: its file names, the keys of its tensors, and its
adapter_config.json checked (:func:`read_adapter_config`) with each module's rank and scaling
(:func:`scaling_for`).

Kept apart from the readers (:mod:`mergeopt.loading.lora`) because a memory plan, the exporters and
the checks need the format without reading a tensor: what a key adapts, where the config lives,
whether a directory is an adapter at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path

from mergeopt.errors import UserError
from mergeopt.inputs import json_file, lora_patterns

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# a full model's weight files, as transformers names them: not an adapter's
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PREFIX = "base_model.model."
FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# what PEFT saves besides linear factors: DoRA magnitudes, embedding factors, a LoRA bias, and the
# embedding's own weight under ``base_layer`` (PEFT saves it when an embedding is adapted)
MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$")
LORA_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
TOKENS = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
# adapter_config.json keys that change the model beyond its weights (its depth, when the adapter
# acts, how inputs are pooled, which parameters of a module are adapted): refused, named
CHANGES_THE_MODEL = {
    "layer_replication": "layer replication (it changes the model's depth)",
    "alora_invocation_tokens": "activated LoRA (it acts only after its invocation tokens)",
    "use_qalora": "QA-LoRA (its factors act on pooled inputs)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing between adapters (arrow_config)",
    "kasa_config": "KaSA (it truncates the base's weights and scales the factors by lora_diag)",
}
# tensors PEFT keeps beside the factors only for training: VeLoRA's projection of the activations its
# backward saves, MonteCLoRA's variational sampler of A. Their training passes differ, not the model:
# PEFT serves and merges either as plain LoRA, so they are left unread (tests/test_lora_inits.py)
TRAINING_ONLY = {
    "velora_config": re.compile(r"\.lora_velora_embed(?:\.[^.]+)?$"),
    "monteclora_config": re.compile(r"\.lora_monteclora_sampler\."),
}
# init_lora_weights with which PEFT changes the base's weights before training: PiSSA, OLoRA, CorDA,
# LoRA-GA and ASTRA subtract the initial factors' product from them, LoftQ quantizes them. The
# trained factors belong over that changed base; over the base as saved they are another model
# (PiSSA's logits 0.12 from PEFT's on a tiny Llama, tests/test_lora_inits.py). PEFT's conversion
# (save_pretrained with path_initial_model_for_weight_conversion) writes init_lora_weights: true.
CHANGES_THE_BASE = ("pissa", "olora", "corda", "lora_ga", "astra", "loftq")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it has adapter_config.json), not a checkpoint.

    A directory holding a full model's weights beside adapter_config.json (an adapter saved, then a
    merged or fine-tuned model saved into the same directory) is refused: transformers loads it as
    that model with the adapter on top, PEFT as the adapter over its base, and which one the user
    means cannot be told from the files.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    if model_files := [name for name in MODEL_FILES if (path / name).is_file()]:
        raise UserError(
            f"{path} holds both a PEFT adapter ({CONFIG_FILE}) and a full model ({model_files[0]}): "
            "transformers would load that model with the adapter on top, mergeopt the adapter over "
            "the base; move one of them to a directory of its own"
        )
    return True


# A module both in modules_to_save and resized (a new token's embedding row) is saved by PEFT with
# ``save_embedding_layers`` as every tensor of its wrapper: beside the trained copy ``X.weight``, the
# wrapper's ``X.modules_to_save.weight`` (the same tensor) and ``X.original_module.weight`` (the base's
# resized copy). PEFT's loading reads ``X.weight`` alone and leaves the other two unread.
WRAPPER_INFIX = re.compile(r"\.(?:modules_to_save|original_module)(?=\.)")


def copy_of_another_shape(path: Path, key: str, shape, target: str, base_shape) -> UserError:
    """The adapter's copy ``key`` of base parameter ``target`` has another shape than the base's:
    the fit's refusal (:mod:`mergeopt.loading.lora`) and the plan's (:mod:`mergeopt.memory.dry_run`)."""
    return UserError(
        f"{path}: {key} is {list(shape)} but the base's {target} is {list(base_shape)} (an adapter "
        "trained with a resized vocabulary needs the base resized the same way)"
    )


def left_unread(config: Mapping, keys: Collection[str]) -> set[str]:
    """The keys of an adapter's tensors that PEFT's served model never reads, so neither the fit nor
    the plan does: a resized wrapper's copies (``X.modules_to_save.P``, ``X.original_module.P``
    beside ``X.P``, :data:`WRAPPER_INFIX`) and what ``config``'s variant keeps only for training
    (:data:`TRAINING_ONLY`)."""
    keys = set(keys)
    training = [pattern for option, pattern in TRAINING_ONLY.items() if config.get(option)]
    return {
        key
        for key in keys
        if (WRAPPER_INFIX.search(key) and WRAPPER_INFIX.sub("", key) in keys)
        or any(pattern.search(key) for pattern in training)
    }


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
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, what in CHANGES_THE_MODEL.items():
        if config.get(key):
            raise UserError(f"{path}: {what} is not supported ({key} is set in {CONFIG_FILE})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(CHANGES_THE_BASE):
        raise UserError(
            f"{path}: init_lora_weights is {init!r} in {CONFIG_FILE}: PEFT trains such an adapter over "
            "base weights it changed first, so over the base it is another model; pass it converted to "
            "plain LoRA (save_pretrained with path_initial_model_for_weight_conversion) or merged into "
            "a full checkpoint (merge_and_unload)"
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise UserError(f"{path / CONFIG_FILE}: bias must be none, all or lora_only, got {config['bias']!r}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise UserError(f"{path / CONFIG_FILE}: {key} must be a positive number, got {value!r}")
    if not isinstance(config["r"], int):
        raise UserError(f"{path / CONFIG_FILE}: r must be a whole number, got {config['r']!r}")
    lora_patterns(config, str(path / CONFIG_FILE))
    return config
