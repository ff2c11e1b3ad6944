"""The base's architecture without its weights: its config, parsed once per file version
(:func:`base_config`), and the model built on the meta device (:func:`meta_model`).

Checks, plans and the loaders all need the architecture before any weight is read; building it on
the meta device costs no memory, and caching the parse matters for a GGUF base, whose metadata
(its whole vocabulary included) takes seconds to read.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from mergeopt.errors import UserError


@functools.lru_cache(maxsize=4)
def _parsed_config(path: str, gguf_file: str | None, trust_remote_code: bool, stamp: tuple[int, int]):
    """The base's config as transformers parses it, once per file version (``stamp``: its mtime and
    size). Parsing a GGUF's metadata takes seconds (its whole vocabulary is read with it), and a fit
    needs the config three times: for the checks, the meta model and the weights."""
    from transformers import AutoConfig

    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf)


GGUF_MIN_VERSION = "0.10"  # transformers' minimum (GGUF_MIN_VERSION), as the gguf extra pins it


def require_gguf(what: str) -> None:
    """One line naming the extra to install where transformers would need the gguf package to read
    a GGUF file (its own ImportError surfaces as a traceback, or folded into another message): not
    installed (a folder named gguf on the path is no package), or older than transformers reads."""
    from packaging.version import InvalidVersion, Version

    spec = importlib.util.find_spec("gguf")
    if spec is None or spec.origin in (None, "namespace"):
        raise UserError(f"{what} needs the gguf package, not installed here: pip install 'mergeopt[gguf]'")
    try:
        installed = importlib.metadata.version("gguf")
        old = Version(installed) < Version(GGUF_MIN_VERSION)
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return  # a source checkout without metadata: transformers asks the module itself
    if old:
        raise UserError(
            f"{what} needs gguf>={GGUF_MIN_VERSION}, {installed} installed here: pip install 'mergeopt[gguf]'"
        )


def base_config(base_path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None):
    """A copy of the base's config, from config.json or the GGUF's metadata, parsed once per file."""
    if gguf_file:
        require_gguf(f"reading model.base from the GGUF file {gguf_file!r} (model.gguf_file)")
    path = Path(base_path)
    where = path / gguf_file if gguf_file else path / "config.json"
    try:
        stat = where.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = (0, 0)  # transformers says what is missing
    return copy.deepcopy(_parsed_config(str(path), gguf_file, trust_remote_code, stamp))


def meta_model(
    base_path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None
) -> tuple[torch.nn.Module, object]:
    """(model, config): the base's architecture on the meta device, from config.json or GGUF metadata."""
    from transformers import AutoModelForCausalLM

    path = Path(base_path)
    try:
        config = base_config(path, trust_remote_code, gguf_file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = path / gguf_file if gguf_file else path / "config.json"
        raise UserError(f"{where}: cannot build the architecture on the meta device ({first})") from None
    return model, config
