"""What every export format is made of: the :class:`Format` entry and the :class:`Context` a renderer reads.

Kept apart from the registry in ``__init__`` so that format modules import this, not the package that imports them.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.export.mixture_input import Mixture, describe_groups
from mergeopt.export.shares import DEFAULT_MAX_EPOCHS, Epochs, Plan, Unit


@dataclass(frozen=True)
class Specials:
    """The special tokens the counting tokenizer writes itself around a text (``tokenizer(text)``,
    what mergeopt counts a ``text`` record or a prompt with): a BOS first, an EOS last."""

    bos: bool
    eos: bool
    # the tokens its chat template writes around an empty user turn and an empty answer (role
    # headers, a default system prompt, what ends a turn; the BOS it writes): what a trainer that
    # formats each prompt/completion with that template adds to it; None without a chat template
    template: int | None = None

    @classmethod
    def of(cls, tokenizer) -> Specials:
        ids = tokenizer("a")["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        return cls(
            bool(ids) and bos is not None and ids[0] == bos,
            bool(ids) and eos is not None and ids[-1] == eos,
            _template_tokens(tokenizer),
        )


def _template_tokens(tokenizer) -> int | None:
    """:attr:`Specials.template`: the tokens of an exchange of empty messages as the tokenizer's
    chat template renders it (as mergeopt counts a conversation, dated as it dates one); None
    without a chat template. A template that refuses empty messages (``raise_exception``) renders
    an exchange of one-character messages instead, whose own tokens are taken off."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    from mergeopt.objectives.chat import DATE_STRING

    for content in ("", "a"):
        exchange = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
        try:
            out = tokenizer.apply_chat_template(
                exchange, tokenize=True, return_dict=True, date_string=DATE_STRING
            )
        except Exception:  # noqa: BLE001 - a template that refuses such messages: the next, or None
            continue
        own = len(tokenizer(content, add_special_tokens=False)["input_ids"]) if content else 0
        return len(out["input_ids"]) - 2 * own
    return None


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
    epochs: Epochs | None = None  # the budget's epochs over each source, when the sizes are known
    options: Sequence[str] = ()  # the command-line options that shaped the numbers (--datasets, budget, ...)
    out: str | None = None  # --out as given (None: stdout)
    many: bool = False  # --to all: one file per format into --out DIR
    max_epochs: float = DEFAULT_MAX_EPOCHS  # --max-epochs: how often a budget may repeat a dataset
    # the tokenizer the datasets were counted with (loaded on first call); None where none is known
    tokenizer: Callable[[], Any] | None = None

    def command(self, fmt: Format) -> str:
        """The ``mergeopt export`` command that writes this format's file again, with the options
        that shaped it: the file says how it was made, and a changed dataset can be re-measured."""
        words = ["mergeopt", "export", str(self.mixture.path), "--to", fmt.name, *self.options]
        return shlex.join(words)

    def written_to(self, fmt: Format) -> str:
        """Where this format's file is written, as a command that reads it must name it (its own
        file name when it goes to stdout: the name ``--to all`` gives it)."""
        return str(output_path(fmt, self.out, self.many) or fmt.filename)

    def epochs_line(self) -> str | None:
        """One line every data format carries under a budget: the epochs over each source."""
        if self.epochs is None:
            return None
        values = ", ".join(f"{n} {e:.4g}" for n, e in self.epochs.per_source.items())
        return f"epochs over each source under the budget ({self.epochs.source}): {values}"

    def whole_samples(self, fmt: Format) -> dict[str, int]:
        """The integer samples of each source that a format of counts writes: the budget's counts,
        else the largest mixture that repeats no dataset (needs measured sizes).

        A positive weight that rounds to no sample at all would vanish from the trainer's data
        without a word (an empty slice, a count or fraction of 0), so it is refused, naming the
        format, every such source and the budget that gives each of them one sample; or, where that
        budget (and so any that gives each one) repeats a dataset more than ``--max-epochs``
        allows, and would be refused for it, the repeat, the --max-epochs it needs, and the sources
        that no budget within --max-epochs gives a sample (to drop).
        """
        plan = self.plan
        counts = plan.counts if plan.counts is not None else plan.no_repeat_counts()
        empty = [name for name in plan.names if counts[name] == 0]
        if empty:
            sources = ", ".join(f"{n!r} (sample share {plan.sample_shares[n]:.3g})" for n in empty)
            one, each = (
                (f"source {sources} gets", "it") if len(empty) == 1 else (f"sources {sources} get", "each")
            )
            said = (
                f"--to {fmt.name} takes whole samples, and {one} none of the {sum(counts.values()):,} samples"
            )
            unit, budget = _budget_for_one_sample(plan, empty)
            option = f"a --budget-{unit} of {budget:,}"
            repeats = _repetition_at(plan, unit, budget)
            worst = max(repeats, key=repeats.get, default=None)
            if worst is None or repeats[worst] <= self.max_epochs:
                raise UserError(f"{said}; {option} or more gives {each} at least one")
            # the sources whose own sample needs a budget above --max-epochs (the largest one's does)
            hopeless = [
                n
                for n in empty
                if max(_repetition_at(plan, unit, _budget_for_one_sample(plan, [n])[1]).values())
                > self.max_epochs
            ]
            raise UserError(
                f"{said}; no budget gives {each} one within --max-epochs {self.max_epochs:g}: the smallest "
                f"that does, {option}, repeats dataset {worst!r} ({plan.stats[worst].samples:,} samples) "
                f"{repeats[worst]:,.0f} times; raise --max-epochs to {math.ceil(repeats[worst]):,}, or drop "
                f"{', '.join(map(repr, hopeless))} from the mixture"
            )
        return counts

    def header(self, fmt: Format, comment: str = "#") -> str:
        """Comment lines: where the numbers come from and what they mean."""
        plan = self.plan
        lines = [
            f"Written by `{self.command(fmt)}`.",
            fmt.meaning,
            "mixture ("
            + ("token" if self.weights_are == "tokens" else "sample")
            + " shares, as fitted): "
            + ", ".join(f"{n} {self.mixture.weights[n]:.6g}" for n in self.mixture.names),
        ]
        if self.mixture.groups is not None:  # the flat weights above stay what the trainer reads
            lines.append(
                "groups (share of the mixture, then shares within the group, as fitted): "
                + describe_groups(self.mixture.groups)
            )
        if fmt.unit is not None and fmt.unit != self.weights_are:
            if plan.stats is not None:
                means = ", ".join(f"{n} {plan.stats[n].mean_tokens:.4g}" for n in plan.names)
                added = ", ".join(f"{n} {plan.stats[n].added:+d}" for n in plan.names if plan.stats[n].added)
                trained = (
                    f" of the tokens {fmt.name} trains on (the count and the special tokens it adds to each sample: {added})"
                    if added
                    else ""
                )
                lines.append(
                    f"{fmt.unit[:-1]} shares use the measured mean tokens per sample{trained}: {means}"
                )
            else:
                lines.append(f"no datasets measured: {fmt.unit[:-1]} shares equal the fitted shares")
        if plan.budget is not None:
            budget = f"budget: {plan.budget} {plan.budget_unit}"
            added = {n: plan.stats[n].added for n in plan.names if plan.stats and plan.stats[n].added}
            if plan.budget_unit == "tokens" and added and fmt.unit == self.weights_are:
                # no mean-tokens line above says what the budget's tokens are (the shares convert not)
                each = ", ".join(f"{n} {a:+d}" for n, a in added.items())
                budget += (
                    f" of the tokens {fmt.name} trains on (the count and the special tokens it adds to each "
                    f"sample: {each}; mean tokens per sample "
                    + ", ".join(f"{n} {plan.stats[n].mean_tokens:.4g}" for n in plan.names)
                    + ")"
                )
            lines.append(budget)
            epochs = self.epochs_line()
            if epochs is not None and fmt.unit is not None:  # a data format (not the merge)
                lines.append(epochs)
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
    # the special tokens its trainer adds to each sample of a dataset beyond mergeopt's count (an
    # EOS, a BOS; negative where it leaves out one counted), by the dataset's record layout
    # (:func:`sliced.kind`), what the counting tokenizer writes itself, and the layouts of all the
    # datasets (one run's); None: none (the trainer reads the tokens as counted)
    added_tokens: Callable[[str, Specials, frozenset[str]], int] | None = None
    # what it adds is an EOS after the text or completion only where it does not already end with
    # the EOS text (DomainStats.ending_eos records get none: TRL's SFTTrainer, axolotl's _tokenize)
    eos_if_missing: bool = False


def share_drift_per_token(plan: Plan, names: Sequence[str]) -> float:
    """How far the trained token shares move, at most, when each sample of ``names`` carries one
    token more than counted: what a header says of tokens a trainer adds that the export cannot know."""
    samples = plan.sample_shares
    trained = {n: samples[n] * plan.stats[n].mean_tokens for n in plan.names}
    more = {n: samples[n] * (plan.stats[n].mean_tokens + (n in names)) for n in plan.names}
    return max(abs(more[n] / sum(more.values()) - trained[n] / sum(trained.values())) for n in plan.names)


def output_path(fmt: Format, out: str | None, many: bool) -> Path | None:
    """The file ``--out`` puts ``fmt`` in: ``DIR/filename`` for ``--to all``, an existing
    directory or one named with a trailing slash (``--out exports/``, created), else ``--out``
    itself; None for stdout."""
    if out is None:
        return None
    target = Path(out)
    return target / fmt.filename if many or names_a_directory(out) else target


def names_a_directory(out: str) -> bool:
    """Whether ``--out`` names a directory: one that exists, or a path ending in a separator, which
    ``Path`` would drop (``exports/`` is not a file to write)."""
    return Path(out).is_dir() or str(out).endswith(("/", os.sep))


def _budget_for_one_sample(plan: Plan, names: list[str]) -> tuple[Unit, int]:
    """The smallest budget, in the unit the user budgets in (samples without a budget), under which
    each of ``names`` gets at least one sample: its exact share of the budget is then 1 or more, and
    the largest remainders never round an amount of 1 or more down to 0."""
    if plan.budget_unit == "tokens" and plan.stats is not None:
        return "tokens", max(math.ceil(plan.stats[n].mean_tokens / plan.token_shares[n]) for n in names)
    return "samples", max(math.ceil(1 / plan.sample_shares[n]) for n in names)


def _repetition_at(plan: Plan, unit: Unit, budget: int) -> dict[str, float]:
    """The epochs over each measured dataset that a budget of ``budget`` ``unit`` needs, as
    :func:`~mergeopt.export.shares.check_repetition` would refuse them; none without sizes."""
    if plan.stats is None:
        return {}
    return {n: plan.shares(unit)[n] * budget / getattr(plan.stats[n], unit) for n in plan.names}
