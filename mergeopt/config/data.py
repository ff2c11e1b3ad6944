"""The data section: the dev sets a mixture is fitted on, and how they are read and split."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mergeopt.config.base import PathText, Section, check_name


class DevSetSpec(Section):
    """One dev set (JSONL, or a table the datasets library reads); its weight is its share of the target loss."""

    name: str = Field(description="The set's name, used in reports, data.target and objective.terms[].dev.")
    path: PathText = Field(
        description="JSONL file (or parquet, arrow, CSV, JSON array, save_to_disk directory) of text, "
        "prompt/completion, prompt/choices/answer or conversation records."
    )
    # le: the weights are relative and applied in float32, where 1e308 (or a sum past 3.4e38) is inf
    weight: float = Field(
        default=1.0, ge=0.0, le=1e30, description="The set's weight in a loss over all sets."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_name(name, "dev set name")


class DataSection(Section):
    """The dev sets the mixture is fitted on, and how they are read and split."""

    dev: tuple[DevSetSpec, ...] = Field(min_length=1, description="Dev sets, one per domain you care about.")
    target: str = Field(
        default="all", description="'all': the weighted average over dev sets; or the name of one dev set."
    )
    max_length: int = Field(
        default=256,
        gt=1,
        description="Tokens per example; longer examples are cut on the right, and one cut before its "
        "first scored token is left out, named in one warning line.",
    )
    heldout_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each dev set held out for early stopping (0 disables early stopping).",
    )
    max_examples: int | None = Field(default=None, gt=0, description="Cap on examples read per dev set.")
    chat_template: PathText | None = Field(
        default=None,
        description="The chat template conversations are rendered with, replacing the base tokenizer's: a "
        "Jinja file, or a directory whose tokenizer has one (an expert's, when the base has none).",
    )

    @model_validator(mode="after")
    def _names(self) -> DataSection:
        names = [d.name for d in self.dev]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dev set names must be unique, repeated: {', '.join(dupes)}")
        if self.target != "all" and self.target not in names:
            raise ValueError(
                f"target {self.target!r} is neither 'all' nor a dev set name ({', '.join(names)})"
            )
        targeted = names if self.target == "all" else [self.target]
        if sum(d.weight for d in self.dev if d.name in targeted) <= 0:
            raise ValueError("the targeted dev sets all have weight 0")
        return self
