"""Whether an expert's tokenizer has the base's vocabulary, read from the two tokenizer.json files.

Merging is meaningless between models whose token ids mean different tokens, even at equal
vocabulary sizes (an expert fine-tuned with a tokenizer that puts other tokens at some ids): the
embedding rows would be averaged across different tokens. The comparison reads the
tokenizers' JSON only (no tokenizer is built) and names the first id that differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergeopt.errors import UserError


def vocabulary_difference(base: Path, expert: Path) -> str | None:
    """None when the two directories' tokenizer.json give the same vocabulary (or either has none);
    else ``": token id N is 'a' in the base, 'b' in the expert"`` at the first id that differs (""
    when the two cannot be compared by id), what the caller's one-line error says."""
    base_vocab, expert_vocab = _tokenizer_vocab(base), _tokenizer_vocab(expert)
    if base_vocab is None or expert_vocab is None or base_vocab == expert_vocab:
        return None
    return _first_token_difference(base_vocab, expert_vocab)


def _tokenizer_vocab(path: Path) -> dict | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{file}: not valid JSON") from None
    model = data.get("model", {}) if isinstance(data, dict) else {}
    vocab = model.get("vocab")
    added = (
        [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])]
        if isinstance(data, dict)
        else []
    )
    return {"vocab": vocab, "added": added}


def _tokens_by_id(vocab: dict) -> dict:
    """id -> token of a :func:`_tokenizer_vocab` (a BPE/WordPiece token -> id map, or a Unigram list
    of [token, score] pairs), added tokens included."""
    model = vocab["vocab"]
    if isinstance(model, dict):
        tokens = {i: t for t, i in model.items()}
    elif isinstance(model, list):
        tokens = {i: (e[0] if isinstance(e, list | tuple) and e else e) for i, e in enumerate(model)}
    else:
        tokens = {}
    tokens.update({i: t for i, t in vocab["added"]})
    return tokens


def _first_token_difference(base: dict, expert: dict) -> str:
    """``: token id N is 'a' in the base, 'b' in the expert`` at the lowest id where they differ
    (what to look for in the tokenizers), or nothing when the maps cannot be compared by id."""
    try:
        ours, theirs = _tokens_by_id(base), _tokens_by_id(expert)
    except (TypeError, ValueError):
        return ""
    ids = sorted(i for i in set(ours) | set(theirs) if isinstance(i, int))
    for i in ids:
        if ours.get(i) != theirs.get(i):
            shown = ["absent" if i not in side else repr(side[i]) for side in (ours, theirs)]
            return f": token id {i} is {shown[0]} in the base, {shown[1]} in the expert"
    return ""
