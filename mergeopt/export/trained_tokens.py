"""The tokens a training framework trains on per sample, where they differ from mergeopt's count.

The fitted weights are shares of training tokens. A trainer adds special tokens to each sample
that the fit's tokenizer does not count (TRL and axolotl an EOS after a text or a completion,
torchtune a BOS and an EOS, LLaMA-Factory under stage: sft the tokens of its template around a
prompt/completion), so a short domain's samples carry relatively more of them, and sample
counts made from mergeopt's count alone give the trainer other token shares than fitted (0.483 for
0.5 on the export tests' world). Each format says what its trainer adds
(:attr:`~mergeopt.export.formats.base.Format.added_tokens`); :func:`as_trained` rebuilds the plan
from those tokens, so that its counts and probabilities give the fitted shares of what is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format, Specials
from mergeopt.export.shares import budget_epochs, make_plan
from mergeopt.export.token_files import kind_of
from mergeopt.export.token_stats import DomainStats


def as_trained(ctx: Context, fmt: Format, specials: Callable[[], Specials]) -> Context:
    """``ctx`` with its plan made from the tokens ``fmt``'s trainer trains on per sample: mergeopt's
    count plus the special tokens it adds to each (:attr:`Format.added_tokens`), so that its sample
    counts and probabilities give the fitted token shares of what it trains. ``specials`` (called
    only for a dataset of records) says what the counting tokenizer writes itself."""
    plan = ctx.plan
    if fmt.added_tokens is None or plan.stats is None:
        return ctx
    layouts = {}  # the datasets of records (token ids are trained as stored)
    for name in plan.names:
        path = ctx.datasets.get(name)
        if path is not None and kind_of(Path(path)) is None:
            layouts[name] = sliced.kind(fmt.name, path)
    every = frozenset(layouts.values())
    added = {n: fmt.added_tokens(layouts[n], specials(), every) if n in layouts else 0 for n in plan.names}
    if not any(added.values()):
        return ctx
    # a trainer that appends its EOS only where it is missing adds none to a record ending with it
    stats = {
        n: DomainStats(
            s.samples,
            s.tokens + added[n] * (s.samples - (s.ending_eos if fmt.eos_if_missing else 0)),
            added[n],
            longest=s.longest + added[n] if s.longest else 0,
        )
        for n, s in plan.stats.items()
    }
    budget = {f"budget_{plan.budget_unit}": plan.budget} if plan.budget is not None else {}
    trained = make_plan(ctx.mixture.weights, ctx.weights_are, stats, **budget)
    epochs = budget_epochs(trained, ctx.datasets, ctx.mixture.constraints)
    return replace(ctx, plan=trained, epochs=epochs)
