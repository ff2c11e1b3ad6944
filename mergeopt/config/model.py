"""The model section (the base, one expert per domain, how the stack is stored and run) and the
merge section (how the experts are combined at a mixture w).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mergeopt.config.base import PathText, Section, check_name


class ModelSection(Section):
    """The base checkpoint and one expert per domain, all fine-tuned from that base."""

    base: PathText = Field(description="HF checkpoint directory of the base model θ0.")
    experts: dict[str, PathText] = Field(
        description="Expert name -> HF checkpoint directory or PEFT LoRA adapter directory; at least 2."
    )
    exclude: tuple[str, ...] = Field(
        default=(), description="Regexes over parameter names kept at θ0 (e.g. 'embed_tokens', 'norm')."
    )
    stack_dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        default="float32",
        description="Storage dtype of the stack: anchor and differences (int8: differences with one "
        "absmax scale per expert and row, dequantised per layer; the anchor in the compute dtype). "
        "The merge arithmetic is float32.",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype of the forward and backward (merge arithmetic and the gradient to w stay "
        "float32); auto: bfloat16 on a GPU that has it, float32 elsewhere. float16 is refused on the CPU.",
    )
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype of the loss evaluations, which make no gradient (held-out early stopping, "
        "reported losses, zero-order scoring, the rank check); auto: float32. A bfloat16 merged weight "
        "is rounded by about as much as a task vector moves it, so bfloat16 evaluations rank close "
        "mixtures by rounding noise. Generation (metrics, lm-eval) runs in the compute dtype.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow custom modelling code from the base dir."
    )
    gguf_file: str | None = Field(
        default=None,
        description="A GGUF file inside model.base to load the base from (transformers dequantizes it); "
        "the experts are checked against the architecture it describes.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Read pickled .bin checkpoints and adapters (torch.load with weights_only=True).",
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = (
        Field(
            default=None,
            description="Spread the model over the local GPUs, each layer's stack beside it: a strategy "
            "planned with the stack's bytes, or an explicit {module: device} map. Default: all on `device`.",
        )
    )
    max_memory: dict[int | str, int | str] | None = Field(
        default=None,
        description="With device_map: bytes each GPU may hold, as accelerate writes it ({0: '70GiB'}); "
        "default: each GPU's free memory.",
    )
    shard: Literal["none", "fsdp"] = Field(
        default="none",
        description="Under torchrun, fsdp keeps 1/N of the rows of every matrix (the stack, LoRA factors, "
        "unmerged matrices) on each rank (FSDP2's Shard(0) layout), reads only those rows from the "
        "checkpoints and gathers each merged weight as its layer runs; none: every rank holds the "
        "whole stack.",
    )

    @field_validator("experts")
    @classmethod
    def _at_least_two(cls, experts: dict[str, str]) -> dict[str, str]:
        if len(experts) < 2:
            raise ValueError(f"needs at least 2 experts, got {len(experts)}")
        for name in experts:
            check_name(name, "expert name")
        return experts

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pattern {pattern!r} is not a valid regex ({err})") from None
        return patterns

    @model_validator(mode="after")
    def _max_memory_with_a_map(self) -> ModelSection:
        """max_memory budgets a device_map's placement and nothing else: without a map the fit ran on
        one device, ignoring it silently."""
        if self.max_memory is not None and self.device_map is None:
            raise ValueError(
                "model.max_memory is only read with model.device_map (the bytes its placement may put on each "
                "GPU): set model.device_map, or leave max_memory out"
            )
        return self

    def unmatched_exclusions(self, names: Iterable[str]) -> str | None:
        """A warning naming each ``exclude`` pattern that matches none of the base's parameter
        ``names`` (``re.search``, as the stacking matches): a typo ('lm-head') would otherwise keep
        nothing at θ0 and merge what the user meant to keep, silently. A tied output layer is no
        parameter of its own, so its pattern is named too."""
        names = list(names)
        unmatched = [p for p in self.exclude if not any(re.search(p, n) for n in names)]
        if not unmatched or not names:
            return None
        which = ", ".join(repr(p) for p in unmatched)
        matches = "matches" if len(unmatched) == 1 else "match"
        (closest,) = difflib.get_close_matches(unmatched[0], sorted(names), n=1, cutoff=0)
        return (
            f"model.exclude {which} {matches} no parameter of the base (the closest name to "
            f"{unmatched[0]!r} is {closest!r}), so nothing is kept at θ0 for "
            f"{'it' if len(unmatched) == 1 else 'them'}"
        )


class MergeSection(Section):
    """How the experts are merged at mixture w (mergeopt.merging.methods): θ0 + scale · Σ_i c_i(w) τ'_i."""

    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = Field(
        default="linear",
        description="linear (task arithmetic), ties (trim, elect sign, disjoint mean), dare_linear, dare_ties.",
    )
    scale: float = Field(default=1.0, gt=0.0, description="Global task-vector scale λ (1: on the simplex).")
    density: float = Field(
        default=0.5, gt=0.0, le=1.0, description="ties/dare: fraction of each task vector kept."
    )
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="ties/dare_ties: sign election by summed values or by counts."
    )
    mixup_alpha: float | None = Field(
        default=None,
        gt=0.0,
        description="M³ mixup on top of the method: coefficients w·λ/Σ(w·λ), λ ~ Dirichlet(α) drawn once per run.",
    )

    def unused_options(self) -> list[str]:
        """The options set away from their defaults that this method does not read: ``merge.density``
        with ``linear`` (a guide's ``density=0.3 scale=2`` without ``method=ties`` scores a linear
        merge at λ = 2), ``majority_sign`` without a sign election. Not refused: diagnose reads
        ``merge.density`` with a linear merge for its sign-conflict statistics."""
        read = {"linear": (), "ties": ("density", "majority_sign"), "dare_linear": ("density",)}
        read["dare_ties"] = read["ties"]
        unused = []
        for option in ("density", "majority_sign"):
            value = getattr(self, option)
            if option not in read[self.method] and value != type(self).model_fields[option].default:
                unused.append(f"merge.{option} {value} is not read by merge.method {self.method}")
        return unused
