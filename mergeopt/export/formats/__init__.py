"""The registry of export formats: one entry per training framework, keyed by ``--to``'s name.

Why a registry: the CLI, ``--to all`` and the tests walk the same table, and each entry says what
its numbers are (``unit``: shares of tokens or of samples, or None for the merge itself) and
whether it must name data files (``needs_paths``), so the checks that depend on those (missing
``--datasets``, the equal-length note) are made once, in the CLI, before any format is rendered.
A renderer takes a :class:`Context` and returns the file's text; it raises
:class:`~mergeopt.errors.UserError` when the mixture cannot be said in its format.
"""

from __future__ import annotations

from mergeopt.export.formats.base import Context, Format


def _registry() -> dict[str, Format]:
    from mergeopt.export.formats import (
        axolotl,
        doremi,
        hf_datasets,
        llamafactory,
        llm_foundry,
        megatron,
        mergekit,
        olmo_core,
        open_instruct,
        torchtune,
        trl,
    )

    formats = [
        llamafactory.FORMAT,
        hf_datasets.PYTHON,
        hf_datasets.YAML,
        megatron.MEGATRON,
        megatron.NEMO,
        megatron.NEMO_SFT,
        llm_foundry.FORMAT,
        open_instruct.FORMAT,
        olmo_core.FORMAT,
        trl.FORMAT,
        axolotl.FORMAT,
        torchtune.FORMAT,
        doremi.FORMAT,
        mergekit.FORMAT,
    ]
    return {f.name: f for f in formats}


FORMATS: dict[str, Format] = _registry()

__all__ = ["FORMATS", "Context", "Format"]
