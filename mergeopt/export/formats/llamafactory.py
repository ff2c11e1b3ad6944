"""LLaMA-Factory: the ``dataset``, ``mix_strategy`` and ``interleave_probs`` keys of a training YAML.

Followed: hiyouga/LLaMA-Factory src/llamafactory/hparams/data_args.py (commit 072bfe29, and the
same file in llamafactory 0.9.5 from PyPI): ``mix_strategy`` is one of ``concat``,
``interleave_under``, ``interleave_over`` (0.9.5 adds ``interleave_once``); ``interleave_probs`` is a
comma-separated string of probabilities, one per name in ``dataset`` (also comma-separated; each
item is stripped of spaces, so a name with a comma or edge spaces cannot be said), and is refused
with ``concat``. ``merge_dataset`` in src/llamafactory/data/data_utils.py hands them to
``datasets.interleave_datasets`` with ``stopping_strategy="first_exhausted"`` for
``interleave_under`` and ``"all_exhausted"`` for ``interleave_over``, so they are per-sample
probabilities: mergeopt writes the sample shares.
``dataset`` names entries of ``dataset_dir/dataset_info.json``; mergeopt uses the expert names, and
the header suggests each entry from the records' layout (src/llamafactory/data/parser.py,
converter.py, and data/README.md with the entries of data/dataset_info.json): ``text`` records
are a pretraining set, ``"columns": {"prompt": "text"}`` as LLaMA-Factory's own ``c4_demo``;
prompt/completion records map ``prompt`` and ``response``; a ``messages`` dataset takes the
sharegpt formatting with OpenAI role tags, or, where they call tools, the openai formatting
(converter.py's OpenAIDatasetConverter: ``tool_calls`` become a function turn, ``tool`` messages an
observation; sharegpt skips such a record and reads no tool call). A ``save_to_disk`` directory is named by its arrow shard
(the loader reads a directory as files of one type, and its JSON metadata is not). Records it cannot read as they are (multiple choice,
prompt/completion lists of messages, stored token ids) get a line saying what to write instead, and
without ``--datasets`` the layout is unknown, so the header lists the entry for each layout.

One run has one ``stage``. Text records beside prompt/completion or messages datasets cannot stay
pretraining data: ``stage: pt`` keeps only each record's prompt (processor/pretrain.py), so the
others' completions would be lost, and ``stage: sft`` drops a record without a response
(processor/supervised.py). So in a mixed export text is registered as the response to an empty
prompt, ``"columns": {"response": "text"}``, and trained with the others under ``stage: sft``.

With a budget the counts are exact rather than drawn: each dataset_info.json entry's
``num_samples`` makes the loader (loader.py) take that many records, each once up to the dataset's
size and then at random again, and ``mix_strategy: concat`` joins them (LLaMA-Factory's own advice
outside streaming; the trainer shuffles). Interleaving cannot stop at a budget: ``all_exhausted``
draws until the rarest dataset is used up, which for a small share is many times the budget.
"""

from __future__ import annotations

import copy
import json

import yaml

from mergeopt.errors import UserError
from mergeopt.export import token_stats
from mergeopt.export.formats import sliced
from mergeopt.export.formats.base import Context, Format, Specials, share_drift_per_token
from mergeopt.export.shares import format_number

# LLaMA-Factory's dataset_info.json entry (without file_name) for each record layout mergeopt reads
ENTRIES: dict[sliced.Layout, dict] = {
    "text": {"columns": {"prompt": "text"}},  # a pretraining set: its own c4_demo entry
    "prompt_completion": {"columns": {"prompt": "prompt", "response": "completion"}},
    # conversations in TRL's ``messages`` layout, as LLaMA-Factory's sharegpt converter reads them
    "messages": {
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    },
}
# conversations that call tools (OpenAI's layout, as TRL reads it): the sharegpt converter reads only
# each message's content (a tool call is lost) and skips a record with a ``tool`` message ("Invalid
# role tag"); the ``openai`` formatting (converter.py, OpenAIDatasetConverter) reads an assistant
# turn's ``tool_calls`` as a function turn (the calls' ``function`` objects as JSON, in place of
# the turn's text) and the ``tool`` messages after it as one observation, with the record's
# ``tools`` (a list, written as JSON) given to the template
TOOL_ENTRY = {
    "formatting": "openai",
    "columns": {"messages": "messages"},
    "tags": {
        **ENTRIES["messages"]["tags"],
        "observation_tag": "tool",
        "function_tag": "function_call",
    },
}
# text records in an sft run beside other layouts: the response to an empty prompt
SFT_TEXT = {"columns": {"response": "text"}}
LAYOUT_NAMES = {"text": "text records", "prompt_completion": "prompt/completion", "messages": "messages"}
READER = "LLaMA-Factory"


def dataset_info(ctx: Context, name: str) -> dict | str | None:
    """The dataset_info.json entry the header suggests for ``name``, from its records' layout;
    a sentence instead where LLaMA-Factory cannot read them as they are; None without a dataset
    (the layout is unknown, and a guessed entry would name columns that may not exist)."""
    from mergeopt.export import token_stats
    from mergeopt.export.token_files import kind_of
    from mergeopt.export.token_stats import source_of

    path = ctx.datasets.get(name)
    if path is None:
        return None
    if kind_of(path) is not None:
        return (
            f"holds stored token ids (MDS, Megatron or OLMo files); {READER} reads records "
            "(JSONL, JSON, CSV, parquet or arrow): give it those"
        )
    layout = sliced.classify(READER, path)
    if layout not in ENTRIES:
        return layout
    file_name = _file_name(path)
    if not isinstance(file_name, str):
        return file_name[0]
    use = token_stats.tool_use(source_of(path)) if layout == "messages" else None
    if use is not None and use.calls:
        # the converter maps each role through its tags (a KeyError stops the run on any other): the
        # tools' answers take the observation tag, which names one role
        if len(use.roles) > 1:
            return (
                f"holds tools' answers as {' and '.join(sorted(use.roles))} messages, and {READER}'s openai "
                "formatting reads one role as a tool's answer (any other stops it): give them one role, tool"
            )
        entry = copy.deepcopy(TOOL_ENTRY)
        entry["tags"]["observation_tag"] = next(iter(use.roles), "tool")
        if "tools" in token_stats.columns(source_of(path)):
            entry["columns"]["tools"] = "tools"
        return {"file_name": file_name, **entry}
    return {"file_name": file_name, **copy.deepcopy(ENTRIES[layout])}


def tool_notes(ctx: Context) -> list[str]:
    """A header line per dataset of tool calls that the ``openai`` formatting reads otherwise than
    the records say: a turn's text beside its tool calls is replaced by them, a message without a
    ``content`` key stops the converter (``message[content_tag]``; ``datasets`` keeps a JSON
    message's keys as written), and a record without ``tools`` gets the system prompt 'detailed
    thinking off' (converter.py, 0.9.5)."""
    lines = []
    for name, use in sliced.tool_calls(ctx).items():
        if use.said_and_called:
            lines.append(
                f"# {name}: {use.said_and_called} records have a turn with text and tool calls; {READER}'s "
                "openai formatting keeps only the calls (the text is not trained): move the text to a turn of its own"
            )
        if use.contentless:
            lines.append(
                f"# {name}: {use.contentless} records have a message without 'content' (a turn that only "
                f"calls tools), and {READER}'s openai converter reads every message's content and stops "
                "on it (KeyError: 'content'): give such turns \"content\": null"
            )
        if use.untooled:
            lines.append(
                f"# {name}: {use.untooled} records give no tools, and {READER}'s openai formatting adds the "
                "system prompt 'detailed thinking off' to each (not counted): give them \"tools\": []"
            )
    return lines


def unpaired_notes(ctx: Context) -> list[str]:
    """A header line per dataset of conversations (no tool calls: those take the openai formatting)
    with records the sharegpt converter skips (:func:`~mergeopt.export.token_stats._paired`): a
    conversation that ends on a user's turn, or whose turns are not a user's and an assistant's in
    turn. They were counted, and LLaMA-Factory trains none of their tokens, so that dataset trains
    fewer tokens than its share (a gap of 0.098 where 30% of a domain's conversations ended on a
    user's turn)."""
    from mergeopt.export.token_stats import source_of

    lines = []
    for name in sliced.record_layouts(ctx, "", {"messages": ""}):
        use = token_stats.tool_use(source_of(ctx.datasets[name]))
        if use.calls or not use.unpaired:
            continue
        of = f" of its {ctx.plan.stats[name].samples:,}" if ctx.plan.stats is not None else ""
        lines.append(
            f"# {name}: {use.unpaired:,}{of} records are not a user's turn and an assistant's in turn, ending "
            f"with the assistant's (after at most one system message); {READER}'s sharegpt converter skips "
            "them ('Invalid role tag', 'Invalid message count'), so they were counted and are not trained "
            f"(the shares of {name}'s tokens fall): end each with an assistant's turn, or drop them"
        )
    return lines


def _file_name(path) -> str | tuple[str]:
    """The ``file_name`` LLaMA-Factory loads the dataset from, or (why it cannot,) a clause.

    Its loader (data/loader.py) reads a directory as every file in it, all of one type by suffix,
    so a ``save_to_disk`` directory, whose arrow shards sit beside JSON metadata (state.json,
    dataset_info.json), stops it ("File types should be identical."): its one arrow shard is named
    instead, and several shards cannot be named at all."""
    from mergeopt.export.token_stats import source_of

    source = source_of(path)
    if source.loader != "disk":
        return str(path)
    if len(source.data_files) == 1:
        return source.data_files[0]
    return (
        f"is a save_to_disk directory of {len(source.data_files)} arrow files beside its JSON metadata, "
        f"and {READER} reads a directory only when all its files are of one type: move the arrow "
        "files to a directory of their own and register that",
    )


def _is_text(info: dict | str | None) -> bool:
    return isinstance(info, dict) and info.get("columns") == ENTRIES["text"]["columns"]


def entries(ctx: Context) -> dict[str, dict | str | None]:
    """Each name's dataset_info.json entry (see dataset_info), with text records made responses
    when other layouts share the run (one stage: sft), and each count as ``num_samples`` under a
    budget."""
    known = {name: dataset_info(ctx, name) for name in ctx.plan.names}
    if any(_is_text(info) for info in known.values()) and any(
        isinstance(info, dict) and not _is_text(info) for info in known.values()
    ):
        known = {
            name: {**info, **copy.deepcopy(SFT_TEXT)} if _is_text(info) else info
            for name, info in known.items()
        }
    if ctx.plan.counts is not None:
        known = {
            name: {**info, "num_samples": ctx.plan.counts[name]} if isinstance(info, dict) else info
            for name, info in known.items()
        }
    return known


def registration(ctx: Context) -> list[str]:
    """The header's dataset_info.json lines: one entry per name, or with no dataset known the
    entry for each layout, since the columns depend on the records."""
    known = entries(ctx)
    unknown = [name for name, info in known.items() if info is None]
    lines = [
        "# Register each name in dataset_dir/dataset_info.json"
        + (":" if len(unknown) == len(known) else ", e.g.")
    ]
    for name, info in known.items():
        if isinstance(info, str):
            lines.append(f"#   {name}: {info}")
        elif info is not None:
            lines.append(f"#   {json.dumps({name: info})}")
    if unknown:
        lines.append(
            f"#   {', '.join(unknown)}: no --datasets, so the records' layout is unknown; the entry "
            "for each layout (file_name: the file's path):"
        )
        for layout, entry in ENTRIES.items():
            example = {unknown[0]: {"file_name": "PATH", **entry}}
            lines.append(f"#     {LAYOUT_NAMES[layout]}: {json.dumps(example)}")
        example = {unknown[0]: {"file_name": "PATH", **SFT_TEXT}}
        lines.append(
            f"#     text records beside prompt/completion or messages (one run, stage: sft): {json.dumps(example)}"
        )
        if ctx.plan.counts is not None:
            counts = ", ".join(f"{name} {ctx.plan.counts[name]}" for name in unknown)
            lines.append(f'#   and in each entry "num_samples": its count under the budget: {counts}')
    dicts = [info for info in known.values() if isinstance(info, dict)]
    if any(info.get("columns") == SFT_TEXT["columns"] for info in dicts):
        lines.append(
            "# train with stage: sft; text records are the responses to an empty prompt, since one run "
            "has one stage and stage: pt would keep only the other datasets' prompts"
        )
    elif dicts and all(_is_text(info) for info in dicts):
        lines.append("# text records are pretraining data to LLaMA-Factory: train them with stage: pt")
    return lines


# template.py (0.9.5) ``get_template_and_fix_tokenizer``: ``template`` names one of its registered
# templates; left out, ``parse_template`` rebuilds one from slots cut out of the tokenizer's
# chat_template (a system, a user and an assistant turn), so no Jinja template is rendered as it is
OWN = "template: names a registered one; left out, it rebuilds one from the tokenizer's chat_template"


def rebuilt_tool_format_note(ctx: Context) -> list[str]:
    """A header line where datasets call tools: the template LLaMA-Factory rebuilds from the
    tokenizer's chat_template (``template`` left out; template.py's ``parse_template``) cuts only a
    system, a user and an assistant turn out of it, and writes the tools, the calls and their
    answers with its own ``default`` tool format (``FunctionFormatter``/``ToolFormatter``:
    "You have access to the following tools", "Action:", "Action Input:"), not as the chat template
    writes them: the model would learn another call syntax than it is prompted with, and those
    conversations' tokens differ from the counted ones (a third fewer over Qwen 2.5's template on
    SmolLM2's tokenizer; with ``template: qwen``, the same ids)."""
    names = list(sliced.tool_calls(ctx))
    if not names:
        return []
    return [
        f"# {', '.join(names)} call tools: with template: left out, {READER} rebuilds a template from the "
        "tokenizer's chat_template that writes the tools, calls and answers in its own default tool format "
        "('Action:', 'Action Input:'), not the chat template's: set template: to the registered one that "
        "writes them as the model reads them (qwen for Qwen 2.5's <tool_call> format)"
    ]


# a conversation of two exchanges: what the rebuilt template and the chat template are compared on
PROBE = (("user", "hi"), ("assistant", "ok"), ("user", "and"), ("assistant", "so"))


def rebuilt_template(tokenizer) -> tuple[str, str, str, str, str] | None:
    """The template LLaMA-Factory rebuilds from the tokenizer's chat_template where ``template:``
    is left out, as template.py's ``parse_template`` (0.9.5) cuts it: (prefix, system, user and
    assistant slots, default system prompt); None without a chat template or where rendering the
    slots fails. It takes ``decode(encode(""))`` (the BOS the tokenizer writes itself) as the
    template's first characters and cuts that many off each rendering, whether the chat template
    writes them or not."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None

    def text(messages, prompt):
        roles = {"s": "system", "u": "user", "a": "assistant"}
        chat = [{"role": roles[r], "content": c} for r, c in messages]
        return tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)

    try:
        prefix = tokenizer.decode(tokenizer.encode(""))
        system = text([("s", "{{content}}")], False)[len(prefix) :]
        user_empty_system = text([("s", ""), ("u", "{{content}}")], True)[len(prefix) :]
        user = text([("u", "{{content}}")], True)[len(prefix) :]
        assistant = text([("u", "{{content}}"), ("a", "{{content}}")], False)[len(prefix) + len(user) :]
    except Exception:  # noqa: BLE001 - a template that refuses a system message: LLaMA-Factory's stops too
        return None
    assistant = assistant.replace("<think>", "").replace("</think>", "").lstrip("\n")
    default = ""
    if len(user) > len(user_empty_system):  # find_diff: the characters the default system prompt adds
        i = j = 0
        while i < len(user_empty_system) and j < len(user):  # to the shorter's end, as find_diff stops
            if user_empty_system[i] == user[j]:
                i += 1
            else:
                default += user[j]
            j += 1
        user = user[len(system.replace("{{content}}", default, 1)) :]
    return prefix, system, user, assistant, default


def rebuilt_note(ctx: Context, tokenizer, conversations: list[str], wrapped: list[str]) -> list[str]:
    """A header line where the template LLaMA-Factory rebuilds (:func:`rebuilt_template`) writes
    a conversation otherwise than the tokenizer's chat_template, which counted ``conversations``
    (and the template's tokens added to the ``wrapped`` prompt/completion and text records: one
    exchange): a tokenizer that writes a BOS its chat_template does not (the BOS's characters are
    cut off the front of each turn's slot: SmolLM2's system turn reads 'ystem'), or a chat_template
    that writes its BOS, and no default system prompt, over a tokenizer that writes none (the BOS
    is then part of the user's slot, written at every user turn)."""
    rebuilt = rebuilt_template(tokenizer)
    if rebuilt is None:
        return []
    prefix, system, user, assistant, default = rebuilt
    slot = {"user": user, "assistant": assistant}

    def written(probe) -> tuple[list[str], str]:  # LLaMA-Factory's parts, and the chat template's text
        parts = [prefix, system.replace("{{content}}", default, 1) if default else ""]
        parts += [slot[role].replace("{{content}}", content, 1) for role, content in probe]
        chat = [{"role": role, "content": content} for role, content in probe]
        return parts, tokenizer.apply_chat_template(chat, tokenize=False)

    one, two = written(PROBE[:2]), written(PROBE)
    names = [
        *(wrapped if "".join(one[0]) != one[1] else []),
        *(conversations if "".join(two[0]) != two[1] else []),
    ]
    if not names:
        return []
    parts, chat = two
    rendered = "".join(parts)
    tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in parts if p)
    probe = [{"role": role, "content": content} for role, content in PROBE]
    counted = len(tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"])
    why = ""
    if prefix and not chat.startswith(prefix):
        why = (
            f"; the tokenizer writes a BOS ({prefix!r}) that its chat_template does not, and {READER} "
            "cuts that many characters off the front of each turn it cuts out of the chat_template: "
            "write {{ bos_token }} first in the chat_template, or"
        )
    at = next((i for i, (a, b) in enumerate(zip(rendered, chat)) if a != b), min(len(rendered), len(chat)))
    start = max(0, at - 12)

    def cut(text: str) -> str:
        return ("..." if start else "") + text[start : start + 40] + ("..." if len(text) > start + 40 else "")

    return [
        f"# with template: left out, {READER} rebuilds a template from the tokenizer's chat_template "
        f"that writes another text than it: a conversation of two exchanges reads {cut(rendered)!r} "
        f"({tokens} tokens in all) where the chat_template writes {cut(chat)!r} ({counted}), so "
        f"{', '.join(names)} train another text than counted{why or ':'} name a registered template: "
        "that writes as the chat_template does"
    ]


def added_tokens(layout: str, specials: Specials, layouts: frozenset[str]) -> int:
    """The tokens LLaMA-Factory trains on per sample beyond mergeopt's count.

    Where every dataset is text (stage: pt): processor/pretrain.py appends the EOS to each text and
    tokenizes it without special tokens, packing the run's texts (``packing`` defaults to on under
    pt, hparams/parser.py) with a BOS written over the first token of each block, none added: the
    count's own BOS and EOS left out, one EOS added (with ``packing: false`` it also prefixes a BOS
    where the tokenizer's ``add_bos_token`` is set).

    Under stage: sft, processor/supervised.py formats each record with the template
    (template.py's ``_encode``: each message's slots, content in place, tokenized without special
    tokens). A prompt/completion record, or a text record as the response to an empty prompt, is
    counted as its bare prompt and completion, so the template's fixed tokens are added: with
    ``template:`` left out, the one ``parse_template`` rebuilds from the tokenizer's chat_template,
    whose tokens around an exchange of empty messages (its BOS, role headers, default system
    prompt, end of turn) are :attr:`Specials.template`; without a chat_template the ``empty``
    template, which writes the prompt and the completion alone. The count's own BOS and EOS are
    left out (the template writes its own). Conversations are counted with that chat template as
    it is: none (a registered ``template:`` writes other tokens; the header says so)."""
    if layouts == {"text"}:
        return 1 - specials.bos - specials.eos
    if layout in ("prompt_completion", "text"):
        return (specials.template or 0) - specials.bos - specials.eos
    return 0


def sft_template_note(ctx: Context) -> list[str]:
    """A header line where prompt/completion or text records are trained under stage: sft: their
    counts include the tokens of the template LLaMA-Factory rebuilds from the tokenizer's
    chat_template (``template:`` left out), and a registered template writes other tokens (role
    headers, its own default system prompt), which move the trained token shares: by how much for
    each token more or fewer per sample."""
    from mergeopt.export.token_files import kind_of

    plan = ctx.plan
    if plan.stats is None:
        return []
    layouts = {
        n: sliced.kind(READER, p) for n, p in ctx.datasets.items() if n in plan.stats and kind_of(p) is None
    }
    if set(layouts.values()) == {"text"}:
        return []
    wrapped = [n for n, layout in layouts.items() if layout in ("prompt_completion", "text")]
    if not wrapped:
        return []
    drift = share_drift_per_token(plan, wrapped)
    return [
        f"# stage: sft formats each record with the template; the counts of {', '.join(wrapped)} (prompt/"
        "completion or text, counted bare) include the tokens that template: left out writes around each "
        "(the template rebuilt from the tokenizer's chat_template, or with none the empty one: "
        f"{', '.join(f'{n} {plan.stats[n].added:+d}' for n in wrapped)}); a registered template: writes "
        "its own (role headers, a default system prompt), and each token more or fewer per sample moves "
        f"a trained token share by up to {drift:.2g}: leave template: out for the shares as fitted"
    ]


def rebuilt_differs_note(ctx: Context) -> list[str]:
    """:func:`rebuilt_note` for the datasets of records whose counts hold a chat template's tokens
    (conversations, and under stage: sft prompt/completion and text records), where the datasets
    were counted with the tokenizer's own chat_template (a recipe's ``data.chat_template`` is not
    the one LLaMA-Factory reads: :func:`sliced.own_template_note` says so)."""
    from mergeopt.export.token_files import kind_of

    if ctx.plan.stats is None or ctx.tokenizer is None:
        return []
    if ctx.recipe is not None and ctx.recipe.data.chat_template is not None:
        return []
    layouts = {n: sliced.kind(READER, p) for n, p in ctx.datasets.items() if kind_of(p) is None}
    if set(layouts.values()) == {"text"}:  # stage: pt, no template
        return []
    conversations = [n for n, layout in layouts.items() if layout == "messages"]
    wrapped = [n for n, layout in layouts.items() if layout in ("prompt_completion", "text")]
    if not conversations and not wrapped:
        return []
    return rebuilt_note(ctx, ctx.tokenizer(), conversations, wrapped)


# hparams/data_args.py (0.9.5): ``cutoff_len``'s default
CUTOFF_LEN = 2048


def cutoff_note(ctx: Context) -> list[str]:
    """A header line under stage: sft (a dataset not text): processor/supervised.py cuts each sample
    to ``cutoff_len`` tokens (``infer_seqlen``: the prompt, the response or both; a conversation's
    later turns dropped), and the counts are of whole samples, so a dataset with samples longer
    than it trains fewer tokens than its share (0.039 over SmolLM2's tokenizer with cutoff_len
    256 and texts of up to 430 tokens): the longest sample of each dataset, as trained, and the
    cutoff_len that keeps every one whole. (``packing: true`` under stage: sft cuts each sample
    alike before packing them into cutoff_len blocks; under stage: pt packing cuts blocks of the
    joined texts, not samples.)"""
    from mergeopt.export.token_files import kind_of

    plan = ctx.plan
    if plan.stats is None:
        return []
    layouts = {n: sliced.kind(READER, p) for n, p in ctx.datasets.items() if kind_of(p) is None}
    if not layouts or set(layouts.values()) == {"text"}:
        return []
    longest = {n: plan.stats[n].longest for n in layouts if n in plan.stats and plan.stats[n].longest}
    if not longest:
        return []
    most = max(longest.values())
    each = ", ".join(f"{n} {t:,}" for n, t in longest.items())
    if most <= CUTOFF_LEN:
        return [
            f"# {READER} cuts each sample to cutoff_len tokens (default {CUTOFF_LEN:,}), and the longest "
            f"samples, as trained, hold {each}: a cutoff_len below {most:,} trains fewer tokens of "
            "those datasets than their shares"
        ]
    over = [n for n, t in longest.items() if t > CUTOFF_LEN]
    return [
        f"# {READER} cuts each sample to cutoff_len tokens (default {CUTOFF_LEN:,}), and the longest "
        f"samples, as trained, hold {each}: set cutoff_len: {most} (or more), or "
        f"{', '.join(over)} {'trains' if len(over) == 1 else 'train'} fewer tokens than "
        f"{'its share' if len(over) == 1 else 'their shares'} (the counts are of whole samples)"
    ]


def render(ctx: Context) -> str:
    plan = ctx.plan
    for name in plan.names:  # DataArguments splits ``dataset`` on ',' and strips each name
        if "," in name or name != name.strip():
            raise UserError(
                f"--to llamafactory: expert {name!r} cannot be a name in LLaMA-Factory's dataset key, "
                "which is split on commas and stripped of spaces: rename that expert"
            )
    lines = [
        ctx.header(FORMAT),
        *registration(ctx),
        *tool_notes(ctx),
        *unpaired_notes(ctx),
        *sliced.own_template_note(ctx, READER, OWN),
        *rebuilt_tool_format_note(ctx),
        *rebuilt_differs_note(ctx),
        *sft_template_note(ctx),
        *cutoff_note(ctx),
    ]
    config: dict = {"dataset": ",".join(plan.names)}
    if plan.counts is not None:
        lines.append(
            f"# The budget is {sum(plan.counts.values())} samples: each entry's num_samples takes its "
            "count (every record once up to the dataset's size, then at random again), concat joins "
            "them, and the trainer shuffles; one epoch (num_train_epochs: 1) trains the budget."
        )
        config["mix_strategy"] = "concat"
    else:
        config["mix_strategy"] = "interleave_under"  # first_exhausted: no dataset repeated
        # a string (quoted when it would read as a number): DataArguments splits it on ','
        config["interleave_probs"] = ",".join(format_number(plan.sample_shares[n]) for n in plan.names)
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


FORMAT = Format(
    name="llamafactory",
    filename="llamafactory.yaml",
    unit="samples",
    needs_paths=False,
    meaning=(
        "interleave_probs: the probability that each drawn sample comes from that dataset (sum 1); "
        "with a budget, each dataset_info.json entry's num_samples: its count of samples."
    ),
    render=render,
    added_tokens=added_tokens,
)
