"""A recipe's mixture constraints as one :class:`~mergeopt.merging.constraints.FeasibleSet`.

Bounds and pins are in the recipe. A repetition cap needs each source's size in the mixture's unit
(``weights.unit``): training tokens, or samples. Those ``weights.tokens`` (``weights.samples``)
gives, the others counted from ``train.data`` with the base's tokenizer, the way ``mergeopt export``
counts them (:mod:`mergeopt.export.token_stats`), so a cap the fit honours is the cap the export
checks. The recipe schema has already checked everything it could see; what
only the counts reveal (caps that leave no mixture) is refused here, before the model is loaded
and before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

from mergeopt.config import Recipe
from mergeopt.errors import UserError
from mergeopt.inputs import existing
from mergeopt.merging.constraints import FeasibleSet, repetition_caps


def source_sizes(recipe: Recipe, log: Callable[[str], None] = print) -> dict[str, int] | None:
    """Every expert's training source's size in weights.unit, T_i or N_i (None without a repetition cap)."""
    w = recipe.weights
    if w.max_epochs is None:
        return None
    sizes = w.source_sizes
    uncounted = [n for n in recipe.expert_names if n not in sizes]
    if uncounted:
        from mergeopt.export.token_stats import load_tokenizer, measure
        from mergeopt.objectives.chat import with_template

        assert recipe.train is not None  # the schema refuses a cap with neither
        tokenizer = with_template(
            load_tokenizer(recipe.model.base, recipe.model.gguf_file, recipe.model.trust_remote_code),
            recipe.data.chat_template,
        )
        for name in uncounted:
            path = existing(recipe.train.data[name], f"train.data {name!r}:")
            stats = measure(path, tokenizer)
            sizes[name] = stats.tokens if w.unit == "tokens" else stats.samples
        counted = ", ".join(f"{n} {sizes[n]:,}" for n in uncounted)
        log(f"training {w.unit} for weights.max_epochs, counted from train.data: {counted}")
    return {n: sizes[n] for n in recipe.expert_names}


def feasible_set(recipe: Recipe, sizes: dict[str, int] | None) -> FeasibleSet:
    """The box the recipe's bounds, pins and caps leave; a UserError when no mixture fits in it."""
    w = recipe.weights
    caps = repetition_caps(w.max_epochs, w.cap_budget, sizes) if sizes is not None else None
    feasible = FeasibleSet.build(recipe.expert_names, w.bounds, w.pinned, caps)
    if (problem := feasible.problem()) is not None:
        raise UserError(f"weights: no mixture meets the constraints: {problem}")
    return feasible


def constraints_record(recipe: Recipe, feasible: FeasibleSet, sizes: dict[str, int] | None) -> dict:
    """mixture.json's ``constraints`` (:class:`mergeopt.run_files.MixtureConstraints`): the sources'
    sizes under ``tokens`` or ``samples``, the unit of the cap."""
    w = recipe.weights
    tokens = sizes if w.unit == "tokens" else None
    samples = sizes if w.unit == "samples" else None
    return {
        "lower": dict(zip(feasible.names, feasible.lower)),
        "upper": dict(zip(feasible.names, feasible.upper)),
        "upper_from": dict(zip(feasible.names, feasible.upper_from)),
        "bounds": {n: list(b) for n, b in w.bounds.items()},
        "pinned": dict(w.pinned),
        "max_epochs": w.max_epochs,
        "token_budget": w.token_budget,
        "tokens": tokens,
        "sample_budget": w.sample_budget,
        "samples": samples,
    }
