"""Mean tokens per sample of each domain's data: what turns token shares into sample probabilities.

mergeopt's weights are shares of training tokens; most loaders (interleave_datasets, LLaMA-Factory,
streaming, open-instruct, TRL) draw whole samples. A domain whose samples are twice as long needs
half the sample probability for the same token share, so the conversion needs each domain's mean
tokens per sample, measured here. Files are read with the ``datasets`` library (JSONL, JSON, CSV,
parquet, arrow, or a directory written by ``save_to_disk``: :mod:`mergeopt.objectives.data_files`,
which reads dev sets kept that way too) and each record is counted the way
:mod:`mergeopt.objectives.data` reads it: ``text`` is every token of the text, ``prompt``/``completion`` the
prompt's tokens (special tokens included) plus the completion's (none added), a multiple-choice
record the prompt plus the right choice, a conversation its rendering by the chat template. Nothing is truncated: a trainer's own cut-off is its own.
JSON Lines records are read once, line by line, as a dev set's are, so a bad one is named ``FILE:LINE`` alike
(and a large corpus is not copied into an Arrow cache first).
Data already in a trainer's own format (MDS, Megatron indexed, OLMo token files) is measured by
:mod:`mergeopt.export.token_files`, as stored; the tokenizer is loaded only when text is counted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.inputs import tokenizer_error
from mergeopt.objectives.data_files import (  # noqa: F401 (the formats read LOADERS and source_of here)
    LOADERS,
    Source,
    is_json_array,
    jsonl_records,
    load,
    source_of,
)

BATCH = 1000  # records tokenised per call


@dataclass(frozen=True)
class DomainStats:
    """One dataset: how many samples and tokens it holds. ``added``: the special tokens a trainer
    adds to each sample beyond mergeopt's count, included in ``tokens`` (0: as mergeopt counts)."""

    samples: int
    tokens: int
    added: int = 0
    # records whose text, or completion, already ends with the tokenizer's EOS text (a trainer that
    # appends the EOS only where it is missing, as TRL's SFTTrainer, adds none to them)
    ending_eos: int = 0
    # the most tokens one sample holds, as counted (with ``added``: as trained); 0 where not known
    # (stored token ids); not compared: two measurements of the same records are the same stats
    longest: int = field(default=0, compare=False)

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.samples


_COLUMNS: dict[
    tuple, dict[str, bool]
] = {}  # a source's columns (whether each holds text), by its files' identity
_TOOLS: dict[tuple, ToolUse] = {}  # a source's tool-calling records, by its files' identity
_TYPES: dict[
    tuple, dict[str, Any]
] = {}  # a source's column types (:func:`value_type`), by its files' identity


@dataclass(frozen=True)
class ToolUse:
    """A dataset's conversations that use tools, noted while its tokens are counted: ``calls``,
    the records with a tool call or a tool's answer (an assistant turn's ``tool_calls``, a
    ``tool``, ``function`` or ``ipython`` message); ``untooled``, the records that give no ``tools``;
    ``said_and_called``, those with a turn that has text and calls tools; ``contentless``, those
    with a message that has no ``content`` key (a turn that only calls tools may leave it out);
    ``shapes``, the sets of
    fields the ``messages`` hold (one set: ``datasets`` reads them as structs of those fields;
    several: as JSON objects, a type no struct is concatenated with)."""

    calls: int = 0
    untooled: int = 0
    said_and_called: int = 0  # records with a turn that both says something and calls tools
    roles: frozenset[str] = frozenset()  # the roles of the tools' answers (tool, function, ipython)
    contentless: int = 0  # records with a message that has no 'content' key (a turn that only calls tools)
    shapes: frozenset[frozenset[str]] = frozenset()  # each message's fields, of the messages layout
    # conversations that are not user and assistant turns in turn from a user's to an assistant's,
    # after at most one system message first (LLaMA-Factory's converters skip them)
    unpaired: int = 0

    def add(self, records: list[dict[str, Any]]) -> ToolUse:
        from mergeopt.objectives.chat import conversation, is_chat

        chats = [conversation(r) for r in records if is_chat(r)]
        calls = sum(any(_uses_tools(m) for m in c) for c in chats)
        both = sum(any(m.get("tool_calls") and m.get("content") for m in c) for c in chats)
        untooled = sum(r.get("tools") is None for r in records)
        roles = {m.get("role") for c in chats for m in c if m.get("role") in TOOL_ROLES}
        contentless = sum(any("content" not in m for m in c) for c in chats)
        shapes = {frozenset(m) for r in records if "messages" in r for m in r["messages"]}
        unpaired = sum(not _paired(c) for c in chats)
        return ToolUse(
            self.calls + calls,
            self.untooled + untooled,
            self.said_and_called + both,
            self.roles | roles,
            self.contentless + contentless,
            self.shapes | shapes,
            self.unpaired + unpaired,
        )


def _paired(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation is exchanges of a user's turn and an assistant's, after at most one
    system message first: what LLaMA-Factory's sharegpt converter reads (converter.py, 0.9.5: each
    turn's role by its place, an even count; any other record is skipped, "Invalid role tag",
    "Invalid message count", and an empty one is dropped)."""
    roles = [m.get("role") for m in messages]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    return (
        bool(roles)
        and len(roles) % 2 == 0
        and all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles))
    )


TOOL_ROLES = ("tool", "function", "ipython")


def _uses_tools(message: dict[str, Any]) -> bool:
    from mergeopt.objectives.chat import calls_tools

    return message.get("role") in TOOL_ROLES or calls_tools(message)


def tool_use(source: Source) -> ToolUse:
    """The dataset's tool-calling records: remembered from :func:`measure` in this process (the
    records are scanned in the pass that counts their tokens), else read once."""
    key = _identity(source)
    if key not in _TOOLS:
        with tempfile.TemporaryDirectory(prefix="mergeopt-export-") as cache:
            lines = is_json_lines(source)
            found = ToolUse()
            for records in record_batches(source, None if lines else load(source, cache)):
                found = found.add(records)
        _TOOLS[key] = found
    return _TOOLS[key]


def _identity(source: Source) -> tuple:
    """``source`` with its files' sizes and modification times: a file rewritten is a new source."""
    files = [Path(f) for f in source.data_files] or [source.path]
    return (source, *((f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def columns(source: Source) -> frozenset[str]:
    """The dataset's column names: remembered from :func:`measure` in this process, else read once.
    (Formats that need the layout, axolotl and torchtune, ask after the datasets were measured.)"""
    return frozenset(_columns(source))


def text_columns(source: Source) -> frozenset[str]:
    """The columns that hold strings (a conversation's ``prompt`` holds a list of messages)."""
    return frozenset(name for name, text in _columns(source).items() if text)


def column_types(source: Source) -> dict[str, Any]:
    """The type ``datasets`` gives each column (:func:`value_type`'s terms): remembered from
    :func:`measure` in this process, else read once. Formats that join the loaded datasets
    (``concatenate_datasets``, ``interleave_datasets``) compare them: a column typed differently in
    two datasets stops the join ("The features can't be aligned")."""
    _columns(source)
    return _TYPES[_identity(source)]


def _columns(source: Source) -> dict[str, bool]:
    key = _identity(source)
    if key not in _COLUMNS:
        if is_json_lines(source):
            kinds = ColumnKinds()
            for name in source.data_files:
                for _, record in jsonl_records(Path(name)):
                    kinds.add(record)
            _COLUMNS[key], _TYPES[key] = kinds.result(), kinds.types
        else:
            with tempfile.TemporaryDirectory(prefix="mergeopt-export-") as cache:
                dataset = load(source, cache)
                _COLUMNS[key], _TYPES[key] = _column_kinds(dataset), _feature_types(dataset)
    return _COLUMNS[key]


class ColumnKinds:
    """The columns of JSON Lines records and whether each holds text, as ``datasets`` would type
    them (a column of strings and nulls is text, one of nulls alone is not), gathered while the
    lines are read: a JSON Lines dataset is read once, never copied into an Arrow cache."""

    def __init__(self):
        self._text: dict[str, bool | None] = {}  # None: only nulls so far
        self.types: dict[str, Any] = {}  # each column's type, as datasets infers it (value_type)

    def add(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            self.types[name] = merge_types(self.types.get(name), value_type(value))
            seen = self._text.get(name)
            if value is None:
                self._text.setdefault(name, None)
            elif seen is not False:
                self._text[name] = isinstance(value, str)

    def result(self) -> dict[str, bool]:
        return {name: bool(text) for name, text in self._text.items()}


# ----------------------------------------------------------------------------- column types
# What type ``datasets`` (5.x) gives a JSON value, in terms two datasets' columns can be compared
# in: None for null (it joins any type), a scalar's Arrow name, ("list", ITEM) and ("struct",
# ((field, TYPE), ...)); "json" where a struct's fields vary from one value to the next, which
# ``datasets`` reads as Json objects (tool-calling messages beside plain ones, tools of different
# parameters), a type that joins only itself.

JSON = "json"
_SCALARS = ((bool, "bool"), (int, "int64"), (float, "float64"), (str, "string"))


def value_type(value: Any) -> Any:
    """The type of one JSON value (see above)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return ("struct", tuple(sorted((k, value_type(v)) for k, v in value.items())))
    if isinstance(value, list):
        item = None
        for each in value:
            item = merge_types(item, value_type(each))
        return ("list", item)
    return next((name for kind, name in _SCALARS if isinstance(value, kind)), type(value).__name__)


def merge_types(a: Any, b: Any) -> Any:
    """The type of a column holding values of types ``a`` and ``b``, as ``datasets`` infers it."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if {a, b} == {"int64", "float64"}:
        return "float64"
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        return ("list", merge_types(a[1], b[1]))
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "struct":
        if [k for k, _ in a[1]] != [k for k, _ in b[1]]:
            return JSON
        return ("struct", tuple((k, merge_types(x, y)) for (k, x), (_, y) in zip(a[1], b[1], strict=True)))
    return JSON


def type_difference(a: Any, b: Any, where: str) -> tuple[str, str, str] | None:
    """Where types ``a`` and ``b`` cannot be joined (a null joins anything), and each type there in
    words: (``column[].field``, ``a``'s, ``b``'s); None where they join."""
    if a is None or b is None or a == b:
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        return type_difference(a[1], b[1], f"{where}[]")
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "struct":
        if [k for k, _ in a[1]] == [k for k, _ in b[1]]:
            for (k, x), (_, y) in zip(a[1], b[1], strict=True):
                if (found := type_difference(x, y, f"{where}.{k}")) is not None:
                    return found
            return None
    return where, describe_type(a), describe_type(b)


def describe_type(kind: Any) -> str:
    if kind == JSON:
        return "objects of varying fields"
    if isinstance(kind, tuple) and kind[0] == "struct":
        return f"fields {', '.join(k for k, _ in kind[1])}"
    if isinstance(kind, tuple):
        return "a list"
    return str(kind)


def _feature_types(dataset) -> dict[str, Any]:
    """:func:`value_type`'s terms for the features of a dataset ``datasets`` loaded."""
    return {name: _feature_type(feature) for name, feature in dataset.features.items()}


def _feature_type(feature: Any) -> Any:
    from datasets import LargeList, List, Value

    if isinstance(feature, dict):
        return ("struct", tuple(sorted((k, _feature_type(v)) for k, v in feature.items())))
    if isinstance(feature, (List, LargeList)):
        return ("list", _feature_type(feature.feature))
    if isinstance(feature, Value):
        dtype = {"large_string": "string", "double": "float64"}.get(feature.dtype, feature.dtype)
        return None if dtype == "null" else dtype
    if type(feature).__name__ == "Json":
        return JSON
    return repr(feature)


def _column_kinds(dataset) -> dict[str, bool]:
    from datasets import Value

    return {
        name: isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        for name, feature in dataset.features.items()
    }


def count_tokens(records: list[dict[str, Any]], tokenizer) -> int:
    """Tokens of a batch of validated records, as :func:`mergeopt.objectives.data.tokenize` counts them untruncated."""
    return sum(token_lengths(records, tokenizer))


def token_lengths(records: list[dict[str, Any]], tokenizer) -> list[int]:
    """Each record's tokens, as :func:`count_tokens` counts them (texts, then pairs, then conversations)."""
    from mergeopt.objectives.chat import conversation, is_chat, render, require_template, template_options

    texts = [r["text"] for r in records if "text" in r]
    pairs = [r for r in records if "text" not in r and not is_chat(r)]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
    chats = [r for r in records if is_chat(r)]
    if pairs:
        prompts = tokenizer([r["prompt"] for r in pairs])["input_ids"]
        answers = [r["choices"][r["answer"]] if "choices" in r else r["completion"] for r in pairs]
        completions = tokenizer(answers, add_special_tokens=False)["input_ids"]
        lengths += [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    if chats:
        require_template(tokenizer)
        lengths += [
            len(render(tokenizer, conversation(r), **template_options(r))["input_ids"]) for r in chats
        ]
    return lengths


def _count(records: list[dict[str, Any]], tokenizer, path) -> int:
    """:func:`count_tokens`, its errors (a conversation without a chat template) naming the dataset."""
    return sum(_lengths(records, tokenizer, path))


def _lengths(records: list[dict[str, Any]], tokenizer, path) -> list[int]:
    """:func:`token_lengths`, its errors (a conversation without a chat template) naming the dataset."""
    try:
        return token_lengths(records, tokenizer)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


class LazyTokenizer:
    """A tokenizer loaded on first use: stored token ids need none, so none is demanded for them."""

    def __init__(self, load: Callable[[], Any]):
        self._load, self._tokenizer = load, None

    def __call__(self):
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer


def measure(path: Path, tokenizer, token_files=None) -> DomainStats:
    """Samples and tokens of one dataset (read into a throw-away cache).

    ``tokenizer`` is a tokenizer or a :class:`LazyTokenizer`; ``token_files`` a
    :class:`~mergeopt.export.token_files.TokenFiles` (how stored ids are read; default: from the
    tokenizer, or as the files say).
    """
    # imported here: the interrupts module imports torch, which `mergeopt --help` (that lists the
    # export formats, whose registry imports this module) must answer without
    from mergeopt.export import token_files as stored
    from mergeopt.runtime.interrupts import check_interrupt

    given = tokenizer
    lazy = given if isinstance(given, LazyTokenizer) else LazyTokenizer(lambda: given)
    kind = stored.kind_of(Path(path))
    if kind is not None:
        options = token_files or stored.TokenFiles()
        samples, tokens = stored.measure(
            kind, Path(path), lazy, options, lambda records: _count(records, lazy(), path)
        )
        return DomainStats(samples=samples, tokens=tokens)
    tokenizer = lazy()
    source = source_of(path)
    samples, tokens, ending_eos, longest = 0, 0, 0, 0
    eos = getattr(tokenizer, "eos_token", None)
    with tempfile.TemporaryDirectory(prefix="mergeopt-export-") as cache:
        lines = is_json_lines(source)  # read line by line, not through datasets' Arrow copy
        dataset = None if lines else load(source, cache)
        kinds = ColumnKinds() if lines else None
        tools = ToolUse()
        for records in record_batches(source, dataset, kinds):
            check_interrupt(f"counting the tokens of {path}")  # inside a fit: Ctrl-C within a chunk
            samples += len(records)
            lengths = _lengths(records, tokenizer, path)
            tokens += sum(lengths)
            longest = max([longest, *lengths])
            ending_eos += ends_with(records, eos)
            tools = tools.add(records)
        _COLUMNS[_identity(source)] = kinds.result() if kinds is not None else _column_kinds(dataset)
        _TYPES[_identity(source)] = kinds.types if kinds is not None else _feature_types(dataset)
        _TOOLS[_identity(source)] = tools
    if samples == 0:
        raise UserError(f"{path}: the dataset is empty")
    if tokens == 0:
        raise UserError(f"{path}: every record tokenises to nothing")
    return DomainStats(samples=samples, tokens=tokens, ending_eos=ending_eos, longest=longest)


def ends_with(records: list[dict[str, Any]], eos: str | None) -> int:
    """How many of ``records`` end their ``text``, or else their ``completion`` (a string), with
    ``eos``: TRL's SFTTrainer appends the EOS to the others only ("Adding EOS")."""
    if not eos:
        return 0
    count = 0
    for r in records:
        last = r["text"] if "text" in r else r.get("completion")
        count += isinstance(last, str) and last.endswith(eos)
    return count


def record_batches(
    source: Source, dataset, kinds: ColumnKinds | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The dataset's validated records, :data:`BATCH` at a time. JSON Lines are read line by line, as
    fit reads a dev set (:func:`~mergeopt.objectives.data.read_jsonl`), so a bad record is named
    ``FILE:LINE`` in both, and their columns noted in ``kinds``; other files through ``dataset``'s
    rows (``FILE: record N``)."""
    from mergeopt.objectives.data import table_records, validated_record

    if not is_json_lines(source):
        yield from table_records(dataset, source.path, BATCH)
        return
    batch: list[dict[str, Any]] = []
    for name in source.data_files:
        for lineno, record in jsonl_records(Path(name)):
            if kinds is not None:
                kinds.add(record)
            batch.append(validated_record(record, f"{name}:{lineno}"))
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def is_json_lines(source: Source) -> bool:
    """Whether every file of a ``json`` source is JSON Lines (not one JSON array)."""
    return source.loader == "json" and not any(is_json_array(Path(f)) for f in source.data_files)


def measure_all(datasets: Mapping[str, Path], tokenizer, token_files=None) -> dict[str, DomainStats]:
    return {name: measure(path, tokenizer, token_files) for name, path in datasets.items()}


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer the counts are made with (the run's base, or ``--tokenizer``)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise tokenizer_error(path, err, gguf_file=gguf_file) from None
