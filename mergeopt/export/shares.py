"""Token shares, sample shares, budgets and repetition: the numbers every format is written from.

A mixture is a share of training tokens per domain (``--weights-are tokens``, the default) or of
samples (``--weights-are samples``). With each domain's mean tokens per sample m_i the two convert:
p_i = (t_i / m_i) / Σ_j (t_j / m_j) and back t_i = p_i m_i / Σ_j p_j m_j. Without measured data the
lengths are taken as equal, so the shares are the same numbers (and the caller says so once).

A budget fixes absolute amounts: ``--budget-tokens N`` gives domain i t_i·N tokens, that is
t_i·N / m_i samples; ``--budget-samples N`` gives it p_i·N samples. Dividing by the dataset's
size gives its repetition factor (epochs over that dataset). Integer sample counts are rounded by
largest remainders, so they add up to the rounded total exactly. Domains of weight 0 are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mergeopt.errors import UserError
from mergeopt.export.token_stats import DomainStats

DEFAULT_MAX_EPOCHS = 4.0  # `mergeopt export --max-epochs`: a budget may repeat a dataset this often

Unit = Literal["tokens", "samples"]


@dataclass(frozen=True)
class Plan:
    names: tuple[str, ...]  # domains with a positive weight, in the mixture's order
    token_shares: dict[str, float]
    sample_shares: dict[str, float]
    stats: dict[str, DomainStats] | None  # measured datasets (None: equal lengths assumed)
    budget_unit: Unit | None = None
    budget: int | None = None
    samples: dict[str, float] | None = None  # exact samples each domain needs under the budget
    tokens: dict[str, float] | None = None  # exact tokens each domain gets under the budget
    counts: dict[str, int] | None = None  # integer samples (largest remainders)

    def shares(self, unit: Unit) -> dict[str, float]:
        return self.token_shares if unit == "tokens" else self.sample_shares

    @property
    def repetition(self) -> dict[str, float] | None:
        """Epochs over each dataset that the budget needs (samples needed / dataset size)."""
        if self.samples is None or self.stats is None:
            return None
        return {n: self.samples[n] / self.stats[n].samples for n in self.names}

    @property
    def total_tokens(self) -> int | None:
        return None if self.tokens is None else round(math.fsum(self.tokens.values()))

    def no_repeat_counts(self) -> dict[str, int]:
        """The largest integer mixture in sample shares that repeats no dataset (needs stats).

        S = min_i n_i / p_i samples in all; each count rounds p_i·S, never above n_i.
        """
        assert self.stats is not None
        total = min(self.stats[n].samples / self.sample_shares[n] for n in self.names)
        exact = {n: self.sample_shares[n] * total for n in self.names}
        counts = apportion(exact, math.floor(total + 1e-9))
        return {n: min(c, self.stats[n].samples) for n, c in counts.items()}


def convert(shares: Mapping[str, float], lengths: Mapping[str, float], to: Unit) -> dict[str, float]:
    """Token shares -> sample shares (divide by mean length) or back (multiply), renormalised."""
    raw = {n: (s / lengths[n] if to == "samples" else s * lengths[n]) for n, s in shares.items()}
    total = math.fsum(raw.values())
    return {n: v / total for n, v in raw.items()}


def apportion(exact: Mapping[str, float], total: int) -> dict[str, int]:
    """Integers summing to ``total``, each the floor of its exact value or one more (largest remainders).

    Ties go to the earlier domain, so the result is deterministic.
    """
    floors = {n: math.floor(v) for n, v in exact.items()}
    left = total - sum(floors.values())
    order = sorted(exact, key=lambda n: (-(exact[n] - floors[n]), list(exact).index(n)))
    for n in order[: max(left, 0)]:
        floors[n] += 1
    return floors


def make_plan(
    weights: Mapping[str, float],
    weights_are: Unit = "tokens",
    stats: Mapping[str, DomainStats] | None = None,
    budget_tokens: int | None = None,
    budget_samples: int | None = None,
) -> Plan:
    """Shares in both units for the positive-weight domains, and the budget's amounts if one is given.

    The given unit's shares are the mixture's weights unchanged; the other unit's are computed.
    """
    names = tuple(n for n, w in weights.items() if w > 0)
    given = {n: float(weights[n]) for n in names}  # as fitted (they sum to 1 within 1e-6)
    stats = {n: stats[n] for n in names} if stats else None
    if stats is not None:
        lengths = {n: stats[n].mean_tokens for n in names}
        other: Unit = "samples" if weights_are == "tokens" else "tokens"
        converted = convert(given, lengths, other)
    else:
        lengths, converted = None, dict(given)  # equal lengths: the same numbers
    token_shares = given if weights_are == "tokens" else converted
    sample_shares = converted if weights_are == "tokens" else given
    plan = Plan(names, token_shares, sample_shares, stats)
    if budget_tokens is not None:
        tokens = {n: token_shares[n] * budget_tokens for n in names}
        samples = {n: tokens[n] / lengths[n] for n in names} if lengths else None
        counts = apportion(samples, round(math.fsum(samples.values()))) if samples else None
        return Plan(
            names, token_shares, sample_shares, stats, "tokens", budget_tokens, samples, tokens, counts
        )
    if budget_samples is not None:
        samples = {n: sample_shares[n] * budget_samples for n in names}
        tokens = {n: samples[n] * lengths[n] for n in names} if lengths else None
        counts = apportion(samples, budget_samples)
        return Plan(
            names, token_shares, sample_shares, stats, "samples", budget_samples, samples, tokens, counts
        )
    return plan


@dataclass(frozen=True)
class Epochs:
    """Epochs over each source that the budget needs, and what the sources' sizes came from."""

    per_source: dict[str, float]
    measured: bool  # True: the --datasets measured; False: the counts mixture.json recorded
    sizes: dict[str, str]  # name -> what its size is, for messages (a path, or "N tokens recorded")
    recorded_unit: str = "tokens"  # what the counts mixture.json recorded count (not measured)

    @property
    def source(self) -> str:
        """Where the sizes came from, as every format states it."""
        if self.measured:
            return "measured datasets"
        return f"{self.recorded_unit[:-1]} counts recorded in mixture.json"


def _needed(plan: Plan, unit: str) -> dict[str, float] | None:
    """What the budget takes of each source, in ``unit`` (None where the plan cannot say)."""
    return plan.tokens if unit == "tokens" else plan.samples


def budget_epochs(plan: Plan, paths: Mapping[str, object], constraints=None) -> Epochs | None:
    """The budget's epochs over each source: from the measured datasets, else from the sizes the fit
    recorded (tokens, or samples under weights.unit: samples; given or counted from train.data);
    None without a budget or sizes.

    Tokens needed / tokens available equals samples needed / samples available, so both agree.
    """
    if plan.repetition is not None:
        return Epochs(dict(plan.repetition), True, {n: str(paths.get(n)) for n in plan.names})
    if constraints is None:
        return None
    unit, recorded = constraints.cap_unit, constraints.source_sizes()
    needed = _needed(plan, unit)
    if needed is None or not all(recorded.get(n) for n in plan.names):
        return None
    return Epochs(
        {n: needed[n] / recorded[n] for n in plan.names},
        False,
        {n: f"{recorded[n]:,} {unit} recorded in mixture.json" for n in plan.names},
        unit,
    )


def check_repetition(epochs: Epochs | None, max_epochs: float) -> list[str]:
    """Refuse a budget that repeats a dataset more than ``max_epochs`` times; describe the repeats.

    Returns one warning line (empty list if no dataset is repeated).
    """
    if epochs is None:
        return []
    per = epochs.per_source
    worst = max(per, key=lambda n: per[n])
    if per[worst] > max_epochs:
        raise UserError(
            f"the budget repeats dataset {worst!r} ({epochs.sizes[worst]}) {per[worst]:.3g} times, "
            f"above --max-epochs {max_epochs:g}; lower the budget, add data, or raise --max-epochs"
        )
    repeated = [n for n in per if per[n] > 1.0]
    if not repeated:
        return []
    factors = ", ".join(f"{n} {per[n]:.3g}x" for n in repeated)
    return [f"the budget repeats datasets beyond one epoch: {factors}"]


def check_recorded_cap(plan: Plan, constraints, paths: Mapping[str, object]) -> None:
    """Refuse a budget that repeats a source more often than the fit's ``weights.max_epochs`` allows.

    The fit capped w_i at R·T_i / B for its own budget B (in tokens, or in samples under
    weights.unit: samples); an export with another budget, or with data other than the counted
    sources, can break the cap the mixture was chosen under. Each source's size is the measured
    dataset's when ``--datasets`` are measured, else the count the fit recorded. ``constraints`` is
    mixture.json's record (None: the fit had none).
    """
    if constraints is None or constraints.max_epochs is None:
        return
    unit, recorded = constraints.cap_unit, constraints.source_sizes()
    needed = _needed(plan, unit)
    if needed is None:
        return
    measured = plan.stats is not None
    available = {n: (getattr(plan.stats[n], unit) if measured else recorded.get(n)) for n in plan.names}
    epochs = {n: needed[n] / t for n, t in available.items() if t}
    worst = max(epochs, key=epochs.get, default=None)
    if worst is not None and epochs[worst] > constraints.max_epochs * (1 + 1e-9):
        source = paths.get(worst) or f"{available[worst]:,} {unit} recorded in mixture.json"
        raise UserError(
            f"the budget repeats source {worst!r} ({source}) {epochs[worst]:.3g} times, above the fit's "
            f"weights.max_epochs {constraints.max_epochs:g}; lower the budget or refit with this one"
        )


def format_number(value: float) -> str:
    """A float as its shortest exact repr (what YAML and JSON writers also use)."""
    return repr(float(value))


def ordered(names: Sequence[str], values: Mapping[str, float]) -> list[float]:
    return [values[n] for n in names]
