"""The objective section: what the search maximises, as terms combined into one utility."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from mergeopt.config.base import PathText, Section

# the fields each kind reads, beside kind, weight and name (and dev, which lm_eval does not read)
KIND_FIELDS = {
    "loss": ("dev",),
    "exact_match": ("dev", "max_new_tokens", "stop"),
    "choice_accuracy": ("dev", "length_normalize"),
    "custom": ("dev", "function", "higher_is_better"),
    "lm_eval": ("task", "include_path", "metric", "limit", "higher_is_better"),
}
# the columns of a zero-order search's journal (evaluations.csv) beside the terms' and w_<expert>
RESERVED_COLUMNS = ("index", "phase", "value", "seconds")
# the options only some kinds read, checked by value (a written recipe.yaml carries every default)
KIND_OPTIONS = ("max_new_tokens", "stop", "length_normalize", "higher_is_better", "metric", "limit")


class ObjectiveTerm(Section):
    """One score of the merged model; several terms combine into one utility (a weighted macro-average)."""

    kind: Literal["loss", "exact_match", "choice_accuracy", "custom", "lm_eval"] = Field(
        description="loss (differentiable), exact_match (greedy generation), choice_accuracy (log-likelihood "
        "of options), custom, lm_eval (an lm-eval-harness task)."
    )
    dev: str = Field(
        default="all",
        description="Dev set it is scored on ('all' only for loss; lm_eval uses its task's data).",
    )
    # le: relative, and applied in float32, where 1e308 (or a sum past 3.4e38) is inf
    weight: float = Field(default=1.0, gt=0.0, le=1e30, description="Share of this term in the utility.")
    name: str | None = Field(default=None, description="Column name in logs; default '<kind>:<dev>'.")
    function: str | None = Field(
        default=None, description="custom: 'package.module:function' called with (model, tokenizer, records)."
    )
    higher_is_better: bool = Field(default=True, description="custom, lm_eval: direction of the score.")
    max_new_tokens: int = Field(default=32, gt=0, description="exact_match: greedy tokens generated.")
    stop: tuple[str, ...] = Field(
        default=("\n",),
        description="exact_match: the generation is cut at the first of these strings (lm-eval's "
        "until); [] for none.",
    )
    length_normalize: bool = Field(
        default=False,
        description="choice_accuracy: score options by log-likelihood per character (lm-eval's acc_norm).",
    )
    task: str | None = Field(default=None, description="lm_eval: the task name.")
    include_path: PathText | None = Field(
        default=None,
        description="lm_eval: a directory of task YAMLs (local tasks); null: lm-eval's own tasks.",
    )
    metric: str = Field(
        default="acc", description="lm_eval: the result key, e.g. 'acc' or 'exact_match,strict-match'."
    )
    limit: int | None = Field(default=None, gt=0, description="lm_eval: score only the first N documents.")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"lm_eval:{self.task}" if self.kind == "lm_eval" else f"{self.kind}:{self.dev}"

    def record(self) -> dict:
        """The term as mixture.json keeps it: its label and the fields its kind reads, so that a loss
        term does not show exact match's generation settings or a direction it does not have."""
        keep = {"kind", "weight", "name", *KIND_FIELDS[self.kind]}
        fields = self.model_dump(exclude_none=True)
        return {k: v for k, v in fields.items() if k in keep} | {"label": self.label}

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> ObjectiveTerm:
        if self.kind == "custom":
            if not self.function:
                raise ValueError("a custom term needs function: 'package.module:function'")
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
                # the function is there but misspelt: say so, or the user looks for a missing key
                raise ValueError(
                    f"a custom term's function {self.function!r} is not 'package.module:function' "
                    "(a module path, a colon, then the function's name)"
                )
        elif self.function is not None:
            raise ValueError(f"function is only for kind 'custom', not {self.kind!r}")
        if self.kind == "lm_eval":
            if not self.task:
                raise ValueError("an lm_eval term needs task: <lm-eval task name>")
            if self.dev != "all":
                raise ValueError("an lm_eval term is scored on its task's own data: leave dev unset")
        elif self.task is not None or self.include_path is not None:
            raise ValueError(f"task and include_path are only for kind 'lm_eval', not {self.kind!r}")
        elif self.kind != "loss" and self.dev == "all":
            raise ValueError(f"{self.kind} terms must name one dev set each (dev: <name>), not all")
        self._no_option_of_other_kinds()
        return self

    def _no_option_of_other_kinds(self) -> None:
        """An option another kind reads, set on this term, is refused: it would do nothing, silently
        (``limit: 50`` on an exact_match term still generates for every record, ``max_new_tokens`` on
        a loss term generates nothing), as ``function`` and ``task`` are refused off their kinds."""
        for option in KIND_OPTIONS:
            if option in KIND_FIELDS[self.kind]:
                continue
            if getattr(self, option) != type(self).model_fields[option].default:
                kinds = " or ".join(repr(k) for k, fields in KIND_FIELDS.items() if option in fields)
                raise ValueError(f"{option} is only for kind {kinds}, not {self.kind!r}")


class ObjectiveSection(Section):
    """What the search maximizes. No terms: minimize the dev loss of data.target (differentiable)."""

    terms: tuple[ObjectiveTerm, ...] = Field(
        default=(), description="Scores combined into the utility; empty: the loss of data.target."
    )
    normalize: Literal["none", "experts"] = Field(
        default="none",
        description="experts: min-max each term over the K single experts before averaging (MergeMix).",
    )
