"""Dev sets: JSONL records, tokenised with the base's tokenizer, with the tokens that count marked.

A record is ``{"text": ...}`` (every token is scored), ``{"prompt": ..., "completion": ...}`` (only
completion tokens are scored, as in supervised fine-tuning) or a multiple-choice question
``{"prompt": ..., "choices": [...], "answer": i}`` (for the loss, the prompt followed by the right
choice, with only the choice scored; :mod:`mergeopt.objectives.metrics` scores every choice), or a
conversation, ``{"messages": [...]}`` or ``{"prompt": [...], "completion": [...]}`` (rendered with the
base's chat template, the assistant's tokens scored: :mod:`mergeopt.objectives.chat`). Each dev set is
split once, with the recipe's seed, into a part the weights are fitted on and a held-out part for
early stopping. Every example keeps the record it came from, so a metric that needs the raw text
(generation, choices) sees exactly the same split as the loss.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeopt.errors import UserError, warn
from mergeopt.inputs import existing, existing_file
from mergeopt.objectives.chat import is_chat, tokenize_chat, validated_chat
from mergeopt.objectives.data_files import is_json_array, jsonl_records, load, source_of
from mergeopt.runtime.distributed import rank_and_size, shard


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (L,) int64
    scored: torch.Tensor  # (L,) bool: token t is a target (predicted from tokens < t)
    record: dict[str, Any] | None = field(default=None, compare=False)  # the JSONL record it came from


@dataclass
class DevSet:
    name: str
    weight: float
    fit: list[Example]
    heldout: list[Example]

    @property
    def all(self) -> list[Example]:
        return self.fit + self.heldout


def has_heldout(sets: Sequence[DevSet], set_weights: Sequence[float] | None = None) -> bool:
    """Whether every dev set that counts holds examples out: all of them, or with ``set_weights``
    those of positive weight. Held-out losses, early stopping and held-out scores exist only then."""
    weights = [1.0] * len(sets) if set_weights is None else [float(a) for a in set_weights]
    return all(len(s.heldout) > 0 for s, a in zip(sets, weights, strict=True) if a > 0)


TABLE_SUFFIXES = (".parquet", ".arrow", ".csv")  # read by the datasets library; anything else is JSONL


def read_records(path: str | Path, what: str = "dev set") -> list[dict[str, Any]]:
    """The validated records of a dev set (or training set: ``what``): JSONL line by line (errors
    name the line), or parquet, arrow, CSV, a JSON array or a ``save_to_disk`` directory through the
    ``datasets`` library (errors name the record)."""
    path = existing(path, what)
    if path.is_dir():
        if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise UserError(
                f"{what} {path} is a directory but not a saved dataset (save_to_disk's state.json or "
                "dataset_dict.json)"
            )
        return _read_table(path, what)
    if path.suffix.lower() in TABLE_SUFFIXES or (path.suffix.lower() == ".json" and is_json_array(path)):
        return _read_table(path, what)
    return read_jsonl(path, what)


def _read_table(path: Path, what: str) -> list[dict[str, Any]]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mergeopt-data-") as cache:
        records = [r for chunk in table_records(load(source_of(path), cache), path) for r in chunk]
    if not records:
        raise UserError(f"{what} {path} is empty")
    return records


def table_records(dataset, path: Path, batch: int = 1000) -> Iterator[list[dict[str, Any]]]:
    """A ``datasets.Dataset``'s rows as validated records, ``batch`` at a time; errors name the
    record's number. A column a record lacks is None in its row (a table has every column): left out."""
    for start in range(0, len(dataset), batch):
        chunk = dataset[start : start + batch]  # columns -> lists
        keys = list(chunk)
        yield [
            validated_record(
                {k: chunk[k][i] for k in keys if chunk[k][i] is not None}, f"{path}: record {start + i + 1}"
            )
            for i in range(len(chunk[keys[0]]) if keys else 0)
        ]


def read_jsonl(path: str | Path, what: str = "dev set") -> list[dict[str, Any]]:
    """Parse and validate a JSONL dev set (or training set: ``what``); errors name the file and the line."""
    path = existing_file(path, what)
    records = [validated_record(record, f"{path}:{lineno}") for lineno, record in jsonl_records(path)]
    if not records:
        raise UserError(f"{what} {path} is empty")
    return records


def validated_record(record: dict, where: str) -> dict[str, Any]:
    """The record's known fields, checked; ``where`` is 'file:line' for the error message.

    The one definition of a record (text, prompt and completion, or a multiple-choice question) for
    dev sets and for the training data the exporters count, so both refuse the same records alike."""
    if "text" in record:
        keys: tuple[str, ...] = ("text",)
    elif is_chat(record):
        return validated_chat(record, where)
    elif "prompt" in record and "choices" in record:
        keys = ("prompt", "choices", "answer")
    elif "prompt" in record and "completion" in record:
        keys = ("prompt", "completion")
    else:
        raise UserError(
            f"{where}: a record needs 'text', or 'prompt' and 'completion', or 'prompt', 'choices' and "
            "'answer', or 'messages'"
        )
    if keys[1:2] == ("choices",):
        _check_choices(record, where)
    else:
        for key in keys:
            if not isinstance(record[key], str):
                raise UserError(f"{where}: {key!r} must be a string")
        if not record[keys[-1]]:
            raise UserError(f"{where}: {keys[-1]!r} is empty, nothing to score")
    return {k: record[k] for k in keys}


def _check_choices(record: dict, where: str) -> None:
    if not isinstance(record["prompt"], str):
        raise UserError(f"{where}: 'prompt' must be a string")
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: 'choices' must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise UserError(f"{where}: choice {i} must be a non-empty string")
    if "answer" not in record:
        raise UserError(f"{where}: a record with 'choices' needs 'answer' (the index of the right choice)")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: 'answer' must be an index into 'choices' (0 to {len(choices) - 1})")


def tokenize(record: dict[str, Any], tokenizer, max_length: int) -> Example | None:
    """Tokenise one record; None when truncation left no scored token.

    A multiple-choice record is scored like a prompt/completion record whose completion is the right
    choice: the loss rewards the answer, not the wrong options.
    """
    if "text" in record:
        ids = tokenizer(record["text"])["input_ids"]
        scored = [False] + [True] * (len(ids) - 1)
    elif is_chat(record):
        ids, scored = tokenize_chat(record, tokenizer)
        scored[0] = False
    else:
        answer = record["choices"][record["answer"]] if "choices" in record else record["completion"]
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = prompt + completion
        scored = [False] * len(prompt) + [True] * len(completion)
        scored[0] = False
    ids, scored = ids[:max_length], scored[:max_length]
    if not any(scored):
        return None
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(scored, dtype=torch.bool), record)


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer, max_length: int, what: str
) -> list[Example]:
    """:func:`tokenize` over a set's records, the ones left unscored dropped: those truncation cuts
    before their first scored token, and those of a single token (a one-token text, or a one-token
    completion after a prompt of no tokens: a sequence's first token is never scored), each kind
    named in one warning line unless no record is left (truncation's then refused by the callers,
    the others here); an error (a conversation its chat template refuses) names ``what`` and the
    record's number."""
    examples, dropped, short = [], [], []
    for number, record in enumerate(records, start=1):
        try:
            example = tokenize(record, tokenizer, max_length)
        except UserError as err:
            raise UserError(f"{what}: record {number}: {err}") from None
        if example is not None:
            examples.append(example)
        elif tokenize(record, tokenizer, sys.maxsize) is None:  # nothing to score at any length
            short.append(number)
        else:
            dropped.append(number)
    if short and not examples:
        raise UserError(
            f"{what}: no record has a token to score: {_numbers(short)} {_one_token(len(short))}"
            + (f", and max_length={max_length} cuts the others before theirs" if dropped else "")
        )
    if dropped and examples:
        warn(
            f"{what}: {len(dropped)} of {len(records)} records left out: max_length="
            f"{max_length} cuts them before their first scored token ({_numbers(dropped)})"
        )
    if short:
        warn(
            f"{what}: {len(short)} of {len(records)} records left out: {_numbers(short)} {_one_token(len(short))}"
        )
    return examples


def _numbers(numbers: Sequence[int]) -> str:
    """'record 3', or 'record 1, 2, 3, 4, 5 and 7 more'."""
    return (
        "record "
        + ", ".join(map(str, numbers[:5]))
        + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    )


def _one_token(count: int) -> str:
    return (
        f"{'is' if count == 1 else 'are'} a single token, and a sequence's first token is never "
        "scored (nothing comes before it to predict it from)"
    )


UNKNOWN_REFUSED = 0.5  # a set whose scored tokens are this share <unk> or more measures nothing
UNKNOWN_WARNED = 0.1  # from this share on, the loss is partly "predict <unk>": said, not refused


def check_known_tokens(examples: Sequence[Example], tokenizer, what: str) -> None:
    """Refuse a set whose scored tokens are mostly the tokenizer's unknown token; warn when many are.

    Text the tokenizer cannot represent (another script, a binary file read as text, the wrong
    tokenizer) becomes ``<unk>``: the loss then rewards predicting ``<unk>``, the same for every
    mixture, and the fit ranks noise. A tokenizer without an unknown token (byte-level BPE) can
    represent any text and is not checked.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    scored = sum(int(ex.scored.sum()) for ex in examples)
    unknown = sum(int((ex.input_ids[ex.scored] == unk).sum()) for ex in examples)
    share = unknown / scored if scored else 0.0
    if share >= UNKNOWN_REFUSED:
        raise UserError(
            f"{what}: {share:.0%} of its scored tokens are the unknown token {tokenizer.unk_token!r} "
            "(text this tokenizer cannot represent: another script, or the wrong file?); "
            "the loss would measure nothing"
        )
    if share >= UNKNOWN_WARNED:
        warn(f"{what}: {share:.0%} of its scored tokens are the unknown token {tokenizer.unk_token!r}")


def load_dev_set(
    name: str,
    path: str | Path,
    weight: float,
    tokenizer,
    max_length: int,
    heldout_fraction: float,
    seed: int,
    max_examples: int | None = None,
) -> DevSet:
    """Read, tokenise and split one dev set.

    A record that truncation leaves without a scored token is dropped for every term, metrics
    included, so all terms of a dev set are scored on the same examples.
    """
    records = read_records(path)
    if max_examples is not None:
        records = records[:max_examples]
    examples = tokenize_records(records, tokenizer, max_length, f"dev set {path}")
    if not examples:
        raise UserError(f"dev set {path}: every example was truncated away at max_length={max_length}")
    check_known_tokens(examples, tokenizer, f"dev set {path}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    n_heldout = round(heldout_fraction * len(examples))
    if heldout_fraction > 0 and (n_heldout == 0 or n_heldout == len(examples)):
        raise UserError(
            f"dev set {path} has {len(examples)} usable examples, too few to hold out "
            f"{heldout_fraction:.0%} for early stopping (set data.heldout_fraction=0 or add examples)"
        )
    heldout = [examples[i] for i in order[:n_heldout]]
    fit = [examples[i] for i in order[n_heldout:]]
    return DevSet(name=name, weight=weight, fit=fit, heldout=heldout)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    scored: torch.Tensor  # (B, L) bool
    set_index: torch.Tensor  # (B,) which dev set each row came from

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.scored, self.set_index)
            )
        )


def collate(items: Sequence[tuple[int, Example]], pad_id: int) -> Batch:
    """Right-pad a list of (dev set index, example) into one batch."""
    length = max(ex.input_ids.numel() for _, ex in items)
    n = len(items)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    scored = torch.zeros((n, length), dtype=torch.bool)
    for row, (_, ex) in enumerate(items):
        size = ex.input_ids.numel()
        input_ids[row, :size] = ex.input_ids
        attention[row, :size] = 1
        scored[row, :size] = ex.scored
    set_index = torch.tensor([i for i, _ in items], dtype=torch.long)
    return Batch(input_ids, attention, scored, set_index)


def training_batches(
    sets: Sequence[DevSet], set_ids: Sequence[int], batch_size: int, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Endless batches with ``batch_size`` examples from each targeted set, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    cursors = {i: (0, torch.randperm(len(sets[i].fit), generator=generator).tolist()) for i in set_ids}
    while True:
        items = []
        for i in set_ids:
            pos, order = cursors[i]
            for _ in range(batch_size):
                if pos == len(order):
                    pos, order = 0, torch.randperm(len(sets[i].fit), generator=generator).tolist()
                items.append((i, sets[i].fit[order[pos]]))
                pos += 1
            cursors[i] = (pos, order)
        yield rank_batch(items, pad_id)  # under torchrun: this rank's share of the batch


def evaluation_batches(sets: Sequence[DevSet], part: str, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example of every set once, in order (``part``: 'fit', 'heldout' or 'all').

    Under torchrun the examples are taken ``batch_size`` × world size at a time and each rank gets
    every world-size-th of them (the caller sums over the ranks), so every rank runs the same
    number of batches, as a sharded stack needs (its layers gather across the ranks).
    """
    items = [(i, ex) for i, s in enumerate(sets) for ex in getattr(s, part)]
    items.sort(key=lambda item: item[1].input_ids.numel())  # similar lengths together: less padding
    step = batch_size * rank_and_size()[1]
    for start in range(0, len(items), step):
        yield rank_batch(items[start : start + step], pad_id)


def rank_batch(items: Sequence[tuple[int, Example]], pad_id: int) -> Batch:
    """This rank's share of ``items`` as one batch; a rank whose share is empty gets one padding
    token that scores nothing, so it still runs the forward pass the other ranks run."""
    mine = shard(items)
    if not mine:
        mine = [(0, Example(torch.tensor([pad_id]), torch.tensor([False])))]
    return collate(mine, pad_id)
