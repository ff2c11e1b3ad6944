"""The registry of export formats: one entry per training framework, keyed by ``--to``'s name.

Why a registry: the CLI, ``--to all`` and the tests walk the same table, and each entry says what
its numbers are (``unit``: shares of tokens or of samples, or None for the merge itself) and
whether it must name data files (``needs_paths``), so the checks that depend on those (missing
``--datasets``, the equal-length note) are made once, in the CLI, before any format is rendered.
A renderer takes a :class:`Context` and returns the file's text; it raises
:class:`~mergeopt.errors.UserError` when the mixture cannot be said in its format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.export.mixture_input import Mixture
from mergeopt.export.shares import Plan, Unit


@dataclass
class Context:
    """Everything a renderer may use; ``notes`` collects lines the CLI prints on stderr."""

    mixture: Mixture
    plan: Plan
    datasets: dict[str, Path]  # positive-weight domain -> absolute path (empty without --datasets)
    recipe: Any = None  # the run's mergeopt.config.Recipe, if recipe.yaml is beside mixture.json
    seed: int = 0
    weights_are: Unit = "tokens"
    notes: list[str] = field(default_factory=list)
    recipe_error: Exception | None = None  # why recipe.yaml could not be read, if it could not

    def header(self, fmt: Format, comment: str = "#") -> str:
        """Comment lines: where the numbers come from and what they mean."""
        plan = self.plan
        lines = [
            f"Written by `python -m mergeopt.export --to {fmt.name}` from {self.mixture.path}.",
            fmt.meaning,
            "mixture ("
            + ("token" if self.weights_are == "tokens" else "sample")
            + " shares, as fitted): "
            + ", ".join(f"{n} {self.mixture.weights[n]:.6g}" for n in self.mixture.names),
        ]
        if fmt.unit is not None and fmt.unit != self.weights_are:
            if plan.stats is not None:
                means = ", ".join(f"{n} {plan.stats[n].mean_tokens:.4g}" for n in plan.names)
                lines.append(f"{fmt.unit[:-1]} shares use the measured mean tokens per sample: {means}")
            else:
                lines.append(f"no datasets measured: {fmt.unit[:-1]} shares equal the fitted shares")
        if plan.budget is not None:
            lines.append(f"budget: {plan.budget} {plan.budget_unit}")
        return "\n".join(f"{comment} {line}" for line in lines)


@dataclass(frozen=True)
class Format:
    name: str
    filename: str  # the file --to all writes into --out DIR
    unit: Unit | None  # the shares this format's numbers are in (None: the merge, not data)
    needs_paths: bool  # it names data files, so every positive-weight domain needs --datasets
    meaning: str  # one line: what the numbers mean
    render: Callable[[Context], str]
    needs_sizes: bool = False  # without a budget it still needs each dataset's size (measured)


def _registry() -> dict[str, Format]:
    from mergeopt.export.formats import (
        doremi,
        hf_datasets,
        llamafactory,
        llm_foundry,
        megatron,
        mergekit,
        olmo_core,
        open_instruct,
        trl,
    )

    formats = [
        llamafactory.FORMAT,
        hf_datasets.PYTHON,
        hf_datasets.YAML,
        megatron.MEGATRON,
        megatron.NEMO,
        llm_foundry.FORMAT,
        open_instruct.FORMAT,
        olmo_core.FORMAT,
        trl.FORMAT,
        doremi.FORMAT,
        mergekit.FORMAT,
    ]
    return {f.name: f for f in formats}


FORMATS: dict[str, Format] = _registry()

__all__ = ["FORMATS", "Context", "Format"]
