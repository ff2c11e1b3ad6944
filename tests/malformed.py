"""Builders of malformed inputs for the bad-input matrix's checks up front (issue 18): output paths
that cannot be written, adapters and checkpoints that do not parse, a base whose config.json
disagrees with its weights. Each returns a path; the matrix rows put it into a command line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

UNCREATABLE = "/proc/mergeopt-cannot-create/out"  # root may write anywhere, but not here


def a_file(tmp: Path, name: str = "a-file") -> str:
    """A plain file, where a directory is expected."""
    path = tmp / name
    path.write_text("not a directory\n")
    return str(path)


def a_dir(tmp: Path, name: str = "a-dir") -> str:
    """A directory, where a file is expected."""
    path = tmp / name
    path.mkdir()
    return str(path)


def adapter_with(tmp: Path, world: dict, config) -> str:
    """A copy of a LoRA adapter over the world's base whose adapter_config.json is ``config``
    (a function of the valid config, returning what is written: an object, a list, ...)."""
    from tests.test_bad_input import _adapter

    path = Path(_adapter(world, tmp))
    valid = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config(valid)))
    return str(path)


def truncated(directory: str | Path, file: str) -> str:
    """``directory`` with its safetensors ``file`` cut to half its length (a copy interrupted)."""
    target = Path(directory) / file
    os.truncate(target, target.stat().st_size // 2)
    return str(directory)


def copy_of(source: str | Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(source, tmp / name))


def linear_attention_without_shapes(world: dict, tmp: Path) -> str:
    """A copy of the base whose config.json names gated DeltaNet layers (Qwen 3.5's layer_types)
    but none of their shapes."""
    base = copy_of(world["base"], tmp, "linear-base")
    config = json.loads((base / "config.json").read_text())
    config["layer_types"] = ["linear_attention"] * config["num_hidden_layers"]
    (base / "config.json").write_text(json.dumps(config))
    return str(base)


def latent_attention_without_widths(world: dict, tmp: Path) -> str:
    """A copy of the base whose config.json names a kv_lora_rank (DeepSeek-V3's latent attention)
    but none of its heads' widths."""
    base = copy_of(world["base"], tmp, "latent-base")
    config = json.loads((base / "config.json").read_text())
    config["kv_lora_rank"] = 16
    (base / "config.json").write_text(json.dumps(config))
    return str(base)


def config_disagreeing(world: dict, tmp: Path) -> str:
    """A copy of the base whose config.json says hidden_size 64 while its tensors have 32."""
    base = copy_of(world["base"], tmp, "wide-base")
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_size=64, head_dim=16)
    (base / "config.json").write_text(json.dumps(config))
    return str(base)
