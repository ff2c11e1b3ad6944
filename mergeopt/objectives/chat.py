"""Chat records: conversations rendered with the base's chat template, scored on the assistant's tokens.

Instruction and chat data are mostly kept as conversations, not text. mergeopt reads TRL's two
conversational layouts: ``{"messages": [{"role": ..., "content": ...}, ...]}`` and
``{"prompt": [messages], "completion": [messages]}``, with the ``tools`` and ``chat_template_kwargs``
a record may give its template. An expert fine-tuned on such data saw each
conversation rendered by its tokenizer's chat template and learned from the assistant's tokens, so
its dev loss reads them the same way, as TRL's ``SFTTrainer`` prepares them (tests/test_chat.py
compares the masks with TRL's own preparation):

- ``prompt``/``completion``: the whole conversation is rendered, and the tokens after its common
  prefix with the prompt rendered alone with the generation prompt are scored (TRL's completion
  mask).
- ``messages``: every assistant turn is scored, as TRL's ``assistant_only_loss`` scores it (TRL's
  default for ``messages`` is every token). Where the template marks those turns
  (``{% generation %}``), transformers' assistant mask says which tokens they are. Where TRL keeps
  a training version of the template (Llama 3, Qwen 2.5 and 3, Gemma, Phi 3, DeepSeek-V3, GPT-OSS
  and others: marked, and rendering earlier turns as when they end the conversation), the
  conversation is rendered with that version, as TRL's ``SFTTrainer`` does. Other templates do
  not say, so a turn spans from the end of the conversation before it, rendered with the
  generation prompt, to the end of the conversation up to it: the tokens the template writes for
  that turn, its end-of-turn token included.

Rendering and tokenising are transformers' ``apply_chat_template``; nothing here parses a template.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError, warn

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def is_chat(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a conversation (a list of messages) rather than text."""
    return "messages" in record or isinstance(record.get("prompt"), list)


def validated_chat(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The conversation's fields, checked; ``where`` names the record in the error."""
    extras = _template_inputs(record, where)
    if "messages" in record:
        _check_messages(record["messages"], "messages", where)
        if not any(m["role"] == "assistant" and _says_something(m) for m in record["messages"]):
            raise UserError(f"{where}: 'messages' has no assistant message with content, nothing to score")
        return {"messages": record["messages"], **extras}
    if "choices" in record:
        raise UserError(f"{where}: a multiple-choice record's 'prompt' must be a string")
    if "completion" not in record:
        raise UserError(f"{where}: a conversation in 'prompt' needs a 'completion' (a list of messages)")
    for key in ("prompt", "completion"):
        _check_messages(record[key], key, where)
    if not any(_says_something(m) for m in record["completion"]):
        raise UserError(f"{where}: 'completion' has no content, nothing to score")
    return {"prompt": record["prompt"], "completion": record["completion"], **extras}


def _template_inputs(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What a record gives its template besides the messages, as TRL reads it: ``tools`` (a list
    of tool schemas, or that list as a JSON string) and ``chat_template_kwargs`` (e.g. Qwen 3's
    ``{"enable_thinking": false}``)."""
    extras = {}
    if record.get("tools") is not None:
        tools = record["tools"]
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: 'tools' is a string but not JSON ({err.msg})") from None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise UserError(f"{where}: 'tools' must be a list of tool schemas (objects)")
        extras["tools"] = tools
    if record.get("chat_template_kwargs") is not None:
        if not isinstance(record["chat_template_kwargs"], dict):
            raise UserError(f"{where}: 'chat_template_kwargs' must be an object of template variables")
        for key in record["chat_template_kwargs"]:
            if key in RENDERING_ARGUMENTS:
                raise UserError(
                    f"{where}: 'chat_template_kwargs' sets {key!r}, an argument of apply_chat_template "
                    "that mergeopt chooses to score the record, not a template variable"
                )
        extras["chat_template_kwargs"] = record["chat_template_kwargs"]
    return extras


# apply_chat_template's own arguments that mergeopt sets, or that change what it returns: in a
# record's chat_template_kwargs each was a TypeError or RuntimeError traceback (given twice, or a
# tensor where a list was read), or scored the conversation otherwise than it reads
RENDERING_ARGUMENTS = frozenset(
    (
        "add_generation_prompt",
        "chat_template",
        "continue_final_message",
        "max_length",
        "padding",
        "return_assistant_tokens_mask",
        "return_dict",
        "return_tensors",
        "tokenize",
        "tokenizer_kwargs",
        "truncation",
    )
)


def template_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's template inputs as ``apply_chat_template`` takes them."""
    return {"tools": record.get("tools"), **record.get("chat_template_kwargs", {})}


def _check_messages(messages: Any, key: str, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {key!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise UserError(f"{where}: {key} message {i} must be an object with a 'role' string")
        typo = _misspelt_role(message["role"])
        if typo:
            raise UserError(
                f"{where}: {key} message {i} has role {message['role']!r} (did you mean {typo!r}?)"
            )
        if _legacy_call(message.get("function_call")) and not calls_tools(message):
            raise UserError(
                f"{where}: {key} message {i} has OpenAI's legacy 'function_call', which chat "
                "templates do not write: give it as 'tool_calls': [{'type': 'function', "
                "'function': {'name': ..., 'arguments': ...}}]"
            )
        if not isinstance(message.get("content"), str) and not (
            message.get("content") is None and calls_tools(message)
        ):
            raise UserError(
                f"{where}: {key} message {i} needs 'content' as a string (text conversations only; "
                "a turn that calls tools may have none)"
            )


def _legacy_call(call: Any) -> bool:
    """Whether OpenAI's legacy ``function_call`` names a function. An empty one ('', {}, or the
    ``{'name': None, 'arguments': None}`` Arrow makes of {} in a parquet file whose other records
    call) is no call."""
    if isinstance(call, Mapping):
        return bool(call.get("name"))
    return bool(call.strip()) if isinstance(call, str) else bool(call)


def calls_tools(message: Mapping[str, Any]) -> bool:
    """Whether the message calls tools (a non-empty ``tool_calls`` list, as TRL's tool-calling
    records and OpenAI's messages have: such a turn's ``content`` may be None or absent, and
    Arrow fills None into the other messages of a parquet file)."""
    return isinstance(message.get("tool_calls"), list) and bool(message["tool_calls"])


def _says_something(message: Mapping[str, Any]) -> bool:
    """Whether the message has something to score: text, or a tool call."""
    return bool(message.get("content")) or calls_tools(message)


# The roles chat templates know (OpenAI's, Llama 3.1's ipython); a role close to one of them but
# not one ('sytem', 'Assistant', 'users') is a typo: most templates render any role, so the turn
# would be scored, or its system prompt replaced by the template's default, without a word.
ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")


def _misspelt_role(role: str) -> str | None:
    """The known role ``role`` is a misspelling of, or None (a known role, or one unlike any)."""
    if role in ROLES:
        return None
    close = difflib.get_close_matches(role.lower(), ROLES, n=1, cutoff=0.8)
    return close[0] if close else None


def conversation(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The whole conversation of a chat record: its messages, or its prompt followed by its completion."""
    return list(record["messages"]) if "messages" in record else [*record["prompt"], *record["completion"]]


def require_template(tokenizer) -> None:
    """Refuse chat records where the tokenizer has no chat template to render them with."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "a conversation needs a chat template, and the base's tokenizer has none "
            "(chat_template.jinja or tokenizer_config.json's chat_template in model.base): "
            "set data.chat_template to a Jinja file or to a directory whose tokenizer has one"
        )


def read_template(path: str) -> str:
    """The template ``data.chat_template`` names: a Jinja file, or a directory whose tokenizer has
    one (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``, the one named
    'default' when it holds several), as TRL's ``chat_template_path`` reads it."""
    where = Path(path)
    if where.is_file():
        return _text(where)
    if not where.is_dir():
        raise UserError(f"data.chat_template: {path} does not exist")
    if (where / "chat_template.jinja").is_file():
        return _text(where / "chat_template.jinja")
    config = where / "tokenizer_config.json"
    template = _config_template(config) if config.is_file() else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if not isinstance(template, str) or not template:
        raise UserError(
            f"data.chat_template: {path} holds no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template)"
        )
    return template


def _text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.chat_template: {path} is not UTF-8 text (is it a Jinja template?)") from None
    if not text.strip():
        raise UserError(f"data.chat_template: {path} is empty")
    return text


def _config_template(config: Path):
    try:
        data = json.loads(_text(config))
    except json.JSONDecodeError as err:
        raise UserError(f"data.chat_template: {config} is not valid JSON ({err.msg})") from None
    return data.get("chat_template") if isinstance(data, dict) else None


def with_template(tokenizer, path: str | None):
    """``tokenizer``, its chat template replaced by the one ``data.chat_template`` names, if any."""
    if path is not None:
        tokenizer.chat_template = read_template(path)
    return tokenizer


# Llama 3.x's templates print today's date in their system header unless ``date_string`` is given
# (through transformers' ``strftime_now``); given this one, their own fallback, a dev set reads the
# same on every day and a seeded fit is the same fit tomorrow.
DATE_STRING = "26 Jul 2024"


def render(tokenizer, messages: Sequence[Mapping[str, Any]], **options) -> dict[str, list[int]]:
    """``apply_chat_template`` tokenised (``input_ids``, and ``assistant_masks`` when asked for),
    dated :data:`DATE_STRING`; a template that refuses the conversation (roles out of order, a role
    it does not know) is a UserError with the template's own message."""
    from jinja2.exceptions import TemplateError

    template = options.get("chat_template") or _template(tokenizer)
    if "strftime_now" in template and "date_string" not in template:
        _warn_once(
            template,
            "the chat template prints today's date (strftime_now): the dev sets' tokens, and so the "
            "fit, can differ from one day to the next",
        )
    options = {"date_string": DATE_STRING, **options}  # a record's own date_string wins
    try:
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **options)
    except TemplateError as err:
        raise UserError(f"the chat template refused the conversation: {err}") from None
    except TEMPLATE_RUNTIME_ERRORS as err:
        if not _from_template_or_inputs(err):  # a bug past the rendering (transformers, mergeopt)
            raise
        raise UserError(
            f"the chat template failed on the conversation ({type(err).__name__}: {err})"
        ) from None
    return {key: list(out[key]) for key in ("input_ids", "assistant_masks") if key in out}


# What Jinja code raises at render time besides jinja2's own TemplateError (an operation on the
# wrong type, a missing key or index, a division by zero), and transformers' ValueError for inputs
# it refuses: a mistake in the template or in the record (see _from_template_or_inputs).
TEMPLATE_RUNTIME_ERRORS = (TypeError, ValueError, LookupError, ArithmeticError, AttributeError)
JINJA_FILENAME = "<template>"  # the code of a template Jinja compiled from a string (transformers')


def _from_template_or_inputs(err: BaseException) -> bool:
    """Whether ``err`` is the template's or the record's: raised inside the template's own code,
    by ``apply_chat_template``'s checks of its arguments (a ValueError: a record's
    ``chat_template_kwargs`` asking for the impossible), or when binding them (a TypeError: one
    naming ``tokenize``). Raised elsewhere (transformers' tokenising of the rendered text, its
    assistant mask), it is a bug to see with its traceback, not a line that sends the user to the
    template."""
    codes, tb = [], err.__traceback__
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    if any(code.co_filename == JINJA_FILENAME for code in codes):
        return True
    if not codes:
        return False
    if isinstance(err, TypeError) and codes[-1] is render.__code__:
        return True
    return isinstance(err, ValueError) and codes[-1].co_name == "apply_chat_template"


def _template(tokenizer) -> str:
    """The tokenizer's template (the 'default' one of several named ones)."""
    try:
        return tokenizer.get_chat_template()
    except ValueError as err:  # several named templates, none of them 'default'
        raise UserError(f"the base's chat template: {' '.join(str(err).split())[:200]}") from None


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def tokenize_chat(record: Mapping[str, Any], tokenizer) -> tuple[list[int], list[bool]]:
    """The token ids of a chat record and which of them are scored (see the module docstring); a
    template that writes nothing for the conversation, or nothing of what is scored (the
    assistant's turns, the completion) after its first token, is a UserError: such a record is not
    cut by ``data.max_length``, so dropping it would report a truncation that never happened."""
    require_template(tokenizer)
    ids, scored = _tokenize_chat(record, tokenizer)
    if not ids:
        raise UserError("the chat template renders the conversation as no tokens at all")
    what = "the assistant's messages" if "messages" in record else "the completion"
    if not any(scored[1:]):
        raise UserError(f"the chat template writes no tokens of {what}: nothing to score")
    if not _writes_what_is_said(record, tokenizer):
        raise UserError(
            f"the chat template writes nothing of what {what} say (the same text whatever they hold): "
            "only its own markup around them would be scored"
        )
    return ids, scored


def _writes_what_is_said(record: Mapping[str, Any], tokenizer) -> bool:
    """Whether the conversation's rendering changes with what is scored (the assistant's messages,
    the completion): their content, or what else they carry that the template writes (a tool
    call, which Llama 3.1's template writes in place of the content). A template that leaves it
    all out still writes its turn's markup (an end-of-turn token), which alone was scored as the
    answer. A template that fails on the stand-ins is given the benefit of the doubt (the record
    itself rendered)."""
    options = {"date_string": DATE_STRING, **template_options(record)}

    def rendering(said: Any, keep: bool) -> str:
        def stand_in(message: Mapping[str, Any]) -> dict[str, Any]:
            # a turn without text (a tool call, content None or absent) keeps having none: given a
            # stand-in text, a template that writes no tool call would seem to write what it says
            text = isinstance(message.get("content"), str)
            kept = dict(message) if keep else {"role": message["role"], "content": ""}
            return {**kept, "content": said} if text else kept

        if "messages" in record:
            messages = [stand_in(m) if m["role"] == "assistant" else m for m in record["messages"]]
        else:
            messages = [*record["prompt"], *(stand_in(m) for m in record["completion"])]
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)

    scored = record["completion"] if "messages" not in record else record["messages"]
    carries_more = any(
        set(m) - {"role", "content"} for m in scored if "messages" not in record or m["role"] == "assistant"
    )
    try:
        first = rendering("a", keep=True)
        if rendering("b", keep=True) != first:
            return True
        # the content is not written; the turn's other fields (a tool call) may be what it says
        return carries_more and rendering("a", keep=False) != first
    except Exception:  # the record's own rendering succeeded; not this check's to say
        return True


def _tokenize_chat(record: Mapping[str, Any], tokenizer) -> tuple[list[int], list[bool]]:
    extra = template_options(record)
    if "messages" not in record:
        ids = render(tokenizer, conversation(record), **extra)["input_ids"]
        start = common_prefix_length(
            render(tokenizer, record["prompt"], add_generation_prompt=True, **extra)["input_ids"], ids
        )
        return ids, [False] * start + [True] * (len(ids) - start)
    messages = record["messages"]
    template = _template(tokenizer)
    marked = template if GENERATION_TAG.search(template) else training_template(tokenizer, template)
    if marked is not None:
        out = render(tokenizer, messages, return_assistant_tokens_mask=True, chat_template=marked, **extra)
        return out["input_ids"], [bool(bit) for bit in out["assistant_masks"]]
    ids = render(tokenizer, messages, **extra)["input_ids"]
    scored = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            render(tokenizer, messages[:i], add_generation_prompt=True, **extra)["input_ids"] if i else []
        )
        upto = render(tokenizer, messages[: i + 1], **extra)["input_ids"]
        start, end = common_prefix_length(before, ids), common_prefix_length(upto, ids)
        if start < len(before) or end < len(upto):
            _warn_once(template, PARTED)
        scored[start:end] = [True] * max(0, end - start)
    return ids, scored


_TRAINING: dict[str, str | None] = {}  # TRL's training version of each template seen, by template


def training_template(tokenizer, template: str) -> str | None:
    """TRL's training version of ``template`` (the same conversation with ``{% generation %}``
    marks, and earlier turns rendered as when they end it), which TRL's SFTTrainer renders with
    under ``assistant_only_loss``; None for a template TRL has none for. TRL checks the template by
    rendering with ``tokenizer``."""
    if template not in _TRAINING:
        from jinja2.exceptions import TemplateError
        from trl.chat_template_utils import get_training_chat_template

        probe = copy.copy(tokenizer)
        probe.chat_template = template
        try:
            _TRAINING[template] = get_training_chat_template(probe)
        # ValueError: "patching is not supported for this template"; the others: the template fails
        # on TRL's probe conversations (a tool call), so the conversation itself says whether it can
        # be rendered, with render's one line where it cannot
        except ValueError:
            _TRAINING[template] = None
        except (TemplateError, *TEMPLATE_RUNTIME_ERRORS) as err:
            if not isinstance(err, TemplateError) and not _from_template_or_inputs(err):
                raise  # TRL's own code failed: falling back would score otherwise than TRL trains
            _TRAINING[template] = None
    return _TRAINING[template]


_WARNED: set[tuple[str, str]] = set()  # (template, warning) already said, once per process


def _warn_once(template: str, message: str) -> None:
    if (template, message) not in _WARNED:
        _WARNED.add((template, message))
        warn(message)


PARTED = (
    "the chat template renders the start of a conversation differently alone than within the "
    "whole (an assistant turn that ends it, or the generation prompt); such a turn is scored "
    "from or up to where the two renderings part (an earlier turn may score nothing): give "
    "data.chat_template a version of it with {% generation %} marks around what the "
    "assistant says"
)


def answerable(record: Mapping[str, Any]) -> bool:
    """Whether a chat record can be scored by generation: it ends with an assistant message that
    follows at least one other message and has text to compare with (not a tool call alone), as
    :func:`chat_prompt` reads it: checked before any model is loaded."""
    messages = conversation(record)
    return _ends_with_answer(messages) and isinstance(messages[-1].get("content"), str)


def _ends_with_answer(messages: Sequence[Mapping[str, Any]]) -> bool:
    return len(messages) >= 2 and messages[-1]["role"] == "assistant"


def chat_prompt(record: Mapping[str, Any], tokenizer) -> tuple[list[int], str]:
    """A chat record as a generation task: the token ids of the conversation before its last
    message, with the generation prompt, and that last message's content as the reference."""
    require_template(tokenizer)
    messages = conversation(record)
    if not _ends_with_answer(messages):
        raise UserError(
            "a conversation scored by generation must end with an assistant message after the prompt"
        )
    if not isinstance(messages[-1].get("content"), str):
        raise UserError(
            "a conversation scored by generation must end with an assistant message with text "
            "(its last message calls tools and has no text to compare the generation with)"
        )
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True, **template_options(record))
    return prompt["input_ids"], messages[-1]["content"]
