"""What a ground-truth training run reads: a domain's examples, the seeded mixture sampler, and
batches of equal token budget.

Why a module of its own: these decide which tokens a run of ``mergeopt train`` trains on, so they
are what makes two runs differ only in their mixture. They are pure functions of the examples, the
weights and a seed (no model, no recipe), tested on their own (tests/test_mixtures.py) and read by
``benchmarks/budget.py`` to count a grid's training tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mergeopt.errors import UserError
from mergeopt.export.shares import convert
from mergeopt.objectives.data import (
    Batch,
    Example,
    check_known_tokens,
    collate,
    read_records,
    tokenize_records,
)


def load_examples(path: str, tokenizer, max_length: int) -> list[Example]:
    """A training set's examples, tokenised as the dev sets are; a set that truncation empties is refused."""
    examples = tokenize_records(
        read_records(path, "training set"), tokenizer, max_length, f"training set {path}"
    )
    if not examples:
        raise UserError(f"training set {path}: every example was truncated away at max_length={max_length}")
    check_known_tokens(examples, tokenizer, f"training set {path}")
    return examples


def draw_probabilities(weights: Sequence[float], domains: Sequence[list[Example]], unit: str) -> list[float]:
    """The probability of drawing each domain's next example, so the run trains on ``weights`` in ``unit``.

    samples: the weights themselves. tokens: w_i divided by domain i's mean tokens per example,
    renormalised (:func:`mergeopt.export.shares.convert`, the conversion ``mergeopt export`` writes),
    so domain i's expected share of the trained tokens is w_i. A one-hot mixture is the same in both.
    """
    if unit == "samples":
        return [float(w) for w in weights]
    lengths = {str(i): sum(ex.input_ids.numel() for ex in d) / len(d) for i, d in enumerate(domains)}
    shares = {str(i): float(w) for i, w in enumerate(weights)}
    return list(convert(shares, lengths, "samples").values())


def mixture_examples(
    domains: Sequence[list[Example]], probabilities: Sequence[float], seed: int
) -> Iterator[tuple[int, Example]]:
    """Endless (domain, example) pairs, the domain drawn from ``probabilities``; each domain reshuffled
    every epoch."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.tensor(probabilities, dtype=torch.float64)
    cursors = [[0, torch.randperm(len(d), generator=generator).tolist()] for d in domains]
    while True:
        i = int(torch.multinomial(probs, 1, generator=generator))
        pos, order = cursors[i]
        if pos == len(order):
            pos, order = 0, torch.randperm(len(domains[i]), generator=generator).tolist()
        cursors[i] = [pos + 1, order]
        yield i, domains[i][order[pos]]


def token_batches(
    examples: Iterator[tuple[int, Example]], batch_tokens: int, pad_id: int, n_domains: int
) -> Iterator[tuple[Batch, list[int]]]:
    """Batches filled with examples until they hold ``batch_tokens`` tokens: equal budget per step.

    Each comes with the tokens it holds of every domain, which run.json totals: the shares a run
    really trained on.
    """
    while True:
        items, per_domain = next_batch(examples, batch_tokens, n_domains)
        yield collate([(0, ex) for ex in items], pad_id), per_domain


def next_batch(
    examples: Iterator[tuple[int, Example]], batch_tokens: int, n_domains: int
) -> tuple[list[Example], list[int]]:
    """The next batch's examples, drawn until they hold ``batch_tokens`` tokens, and the tokens of
    each domain among them; uncollated, so a run's batches can be counted before it trains."""
    items, tokens, per_domain = [], 0, [0] * n_domains
    while tokens < batch_tokens:
        i, ex = next(examples)
        items.append(ex)
        tokens += ex.input_ids.numel()
        per_domain[i] += ex.input_ids.numel()
    return items, per_domain
