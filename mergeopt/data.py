"""Dev sets: JSONL records, tokenised with the base's tokenizer, with the tokens that count marked.

A record is ``{"text": ...}`` (every token is scored) or ``{"prompt": ..., "completion": ...}``
(only completion tokens are scored, as in supervised fine-tuning). Each dev set is split once, with
the recipe's seed, into a part the weights are fitted on and a held-out part for early stopping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeopt.errors import UserError


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (L,) int64
    scored: torch.Tensor  # (L,) bool: token t is a target (predicted from tokens < t)


@dataclass
class DevSet:
    name: str
    weight: float
    fit: list[Example]
    heldout: list[Example]

    @property
    def all(self) -> list[Example]:
        return self.fit + self.heldout


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Parse and validate a JSONL dev set; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dev set {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: a record must be a JSON object")
            if "text" in record:
                keys = ("text",)
            elif "prompt" in record and "completion" in record:
                keys = ("prompt", "completion")
            else:
                raise UserError(f"{path}:{lineno}: a record needs 'text', or 'prompt' and 'completion'")
            for key in keys:
                if not isinstance(record[key], str):
                    raise UserError(f"{path}:{lineno}: {key!r} must be a string")
            if not record[keys[-1]]:
                raise UserError(f"{path}:{lineno}: {keys[-1]!r} is empty, nothing to score")
            records.append({k: record[k] for k in keys})
    if not records:
        raise UserError(f"dev set {path} is empty")
    return records


def tokenize(record: dict[str, str], tokenizer, max_length: int) -> Example | None:
    """Tokenise one record; None when truncation left no scored token."""
    if "text" in record:
        ids = tokenizer(record["text"])["input_ids"]
        scored = [False] + [True] * (len(ids) - 1)
    else:
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        ids = prompt + completion
        scored = [False] * len(prompt) + [True] * len(completion)
        scored[0] = False
    ids, scored = ids[:max_length], scored[:max_length]
    if not any(scored):
        return None
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(scored, dtype=torch.bool))


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
    records = read_jsonl(path)
    if max_examples is not None:
        records = records[:max_examples]
    examples = [ex for ex in (tokenize(r, tokenizer, max_length) for r in records) if ex is not None]
    if not examples:
        raise UserError(f"dev set {path}: every example was truncated away at max_length={max_length}")
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
        yield collate(items, pad_id)


def evaluation_batches(sets: Sequence[DevSet], part: str, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example of every set once, in order (``part``: 'fit', 'heldout' or 'all')."""
    items = [(i, ex) for i, s in enumerate(sets) for ex in getattr(s, part)]
    items.sort(key=lambda item: item[1].input_ids.numel())  # similar lengths together: less padding
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_id)
