"""Conversations as dev sets: which tokens are scored, against TRL's own preparation, and a fit on
conversations against the same fit on the text records they render to.

References: TRL's ``SFTTrainer._prepare_dataset`` (its labels: the completion mask for
prompt/completion conversations, the assistant mask for ``messages`` under ``assistant_only_loss``)
on SmolLM2-135M-Instruct's own ChatML template; transformers' assistant mask of a template with
``{% generation %}`` marks; and, end to end, the tiny world with a template that writes BOS and the
messages' contents, under which a conversation is token for token its prompt/completion record.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError, run_cli
from mergeopt.export.command import main as export_main
from mergeopt.export.token_stats import count_tokens, measure
from mergeopt.fit import fit
from mergeopt.loading.problem import load_problem
from mergeopt.objectives import metrics
from mergeopt.objectives.chat import chat_prompt, tokenize_chat
from mergeopt.objectives.data import load_dev_set, read_jsonl, read_records, tokenize
from mergeopt.worlds import toy
from tests.conftest import write_jsonl

# SmolLM2's template with {% generation %} around what each assistant turn adds after its header
TAGGED_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the tiny world's: BOS, then the messages' contents, so a conversation renders as its text record
CONCAT = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Eleven, and then thirteen."},
    ],
    [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "and subtract?"},
        {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
    ],
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def smollm2(smollm2_world):
    return AutoTokenizer.from_pretrained(smollm2_world / "base")


def trl_labels(rows: list[dict], tokenizer, assistant_only: bool, chat_template: str | None = None) -> list:
    """TRL's SFT preparation of ``rows``: the labels it trains on (-100 where no loss is taken)."""
    trl = pytest.importorskip("trl")
    import datasets

    datasets.disable_progress_bars()
    with warnings.catch_warnings():  # transformers' own deprecation inside TrainingArguments
        warnings.simplefilter("ignore", FutureWarning)
        args = trl.SFTConfig(
            output_dir=tempfile.mkdtemp(),
            max_length=None,
            assistant_only_loss=assistant_only,
            use_cpu=True,
            bf16=False,
            report_to=[],
            dataset_num_proc=None,
        )
    trainer = types.SimpleNamespace(
        chat_template=chat_template, completion_only_loss=True, _tokenizer=tokenizer
    )
    prepared = trl.SFTTrainer._prepare_dataset(
        trainer, datasets.Dataset.from_list(rows), tokenizer, args, False, None, "dev"
    )
    return [(row["input_ids"], [label != -100 for label in row["labels"]]) for row in prepared]


def ours(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    example = tokenize(record, tokenizer, 10_000)
    return example.input_ids.tolist(), example.scored.tolist()


# ----------------------------------------------------------------------------- against TRL


def test_prompt_completion_conversations_score_trls_completion_mask(smollm2):
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    rows.append(
        {"prompt": [user("Two answers?")], "completion": [assistant("One."), user("and?"), assistant("Two.")]}
    )
    for row, reference in zip(rows, trl_labels(rows, smollm2, assistant_only=False), strict=True):
        assert ours(row, smollm2) == reference
        ids, scored = reference
        assert smollm2.decode([i for i, s in zip(ids, scored) if s]).startswith(
            row["completion"][0]["content"]
        )


def test_messages_score_every_assistant_turn_as_trls_assistant_only_loss(smollm2):
    """SmolLM2's template has no generation marks: each turn is found from the renderings before and
    after it, and must be exactly what TRL takes when the same template marks the assistant's part."""
    rows = [{"messages": c} for c in CONVERSATIONS]
    references = trl_labels(rows, smollm2, assistant_only=True, chat_template=TAGGED_CHATML)
    for row, reference in zip(rows, references, strict=True):
        assert ours(row, smollm2) == reference
        ids, scored = reference
        spoken = "".join(m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant")
        # what the assistant said (a turn that starts with spaces shares a token with its header's
        # newline, and that token is scored: TRL counts a token that overlaps the turn)
        said = smollm2.decode([i for i, s in zip(ids, scored) if s])
        assert said.split() == spoken.split()


def test_a_template_with_generation_marks_is_read_through_transformers_mask(smollm2):
    tagged = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tagged.chat_template = TAGGED_CHATML
    for messages in CONVERSATIONS:
        mask = tagged.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, scored = tokenize_chat({"messages": messages}, tagged)
        assert ids == list(mask["input_ids"]) and scored == [bool(b) for b in mask["assistant_masks"]]
        assert (ids, scored) == tokenize_chat({"messages": messages}, smollm2)  # the same tokens either way


def test_a_turn_rendered_differently_when_last_is_scored_to_where_the_renderings_part(smollm2, capsys):
    late = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    late.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}{{ ' [end]' }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = CONVERSATIONS[1]
    ids, scored = tokenize_chat({"messages": messages}, late)
    text = late.decode([i for i, s in zip(ids, scored) if s])
    # the first answer, rendered last, says " [end]": scored up to it; the last answer whole
    assert text == "Seven." + "Eleven, and then thirteen. [end]<|im_end|>\n"
    tokenize_chat({"messages": messages}, late)
    err = capsys.readouterr().err
    assert err.count("renders the start of a conversation differently") == 1


# ----------------------------------------------------------------------------- the tiny world


EXPERTS = ("arith", "reverse", "brackets")  # the tiny world's prompt/completion domains


@pytest.fixture(scope="module")
def tiny_chat_world(tiny_world, tmp_path_factory) -> dict:
    """The tiny world with a chat template, its prompt/completion dev sets also as conversations."""
    root = tmp_path_factory.mktemp("tiny-chat")
    base = root / "base"
    shutil.copytree(tiny_world / "base", base)
    (base / "chat_template.jinja").write_text(CONCAT)
    dev = {}
    for name in EXPERTS:
        records = read_jsonl(tiny_world / "dev" / f"{name}.jsonl")[:30]
        layouts = {
            "text": records,
            "prompt": [
                {"prompt": [user(r["prompt"])], "completion": [assistant(r["completion"])]} for r in records
            ],
            "messages": [{"messages": [user(r["prompt"]), assistant(r["completion"])]} for r in records],
        }
        for layout, rows in layouts.items():
            dev[name, layout] = root / f"{name}-{layout}.jsonl"
            write_jsonl(dev[name, layout], rows)
    return {"world": tiny_world, "base": base, "dev": dev, "root": root}


def test_a_conversation_tokenises_as_the_record_it_renders_to(tiny_chat_world):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_world["base"])
    for layout in ("prompt", "messages"):
        text = load_dev_set("a", tiny_chat_world["dev"]["arith", "text"], 1.0, tokenizer, 64, 0.25, 0)
        chat = load_dev_set("a", tiny_chat_world["dev"]["arith", layout], 1.0, tokenizer, 64, 0.25, 0)
        for part in ("fit", "heldout"):
            for a, b in zip(getattr(text, part), getattr(chat, part), strict=True):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.scored, b.scored)


def _tree(chat_world: dict, layout: str, out: Path, **sections) -> dict:
    world = chat_world["world"]
    return {
        "seed": 0,
        "output_dir": str(out),
        "device": "cpu",
        "model": {
            "base": str(chat_world["base"]),
            "experts": {n: str(world / "experts" / n) for n in EXPERTS},
        },
        "data": {
            "dev": [{"name": n, "path": str(chat_world["dev"][n, layout])} for n in ("arith", "reverse")],
            "max_length": 64,
        },
        "optim": {"steps": 6, "batch_size": 8},
        **sections,
    }


# what a fit found and measured: mixture.json less what names the run (paths, times)
SAME = (
    "weights",
    "dev_loss",
    "heldout_loss",
    "per_set_dev_loss",
    "expert_dev_loss",
    "objective",
    "search",
    "logits",
)


@pytest.mark.parametrize("layout", ["prompt", "messages"])
def test_a_fit_on_conversations_is_the_fit_on_their_text(tiny_chat_world, tmp_path, layout):
    """The gradient fit, and a grid scored by exact match (generation from the rendered prompt), on
    conversations end where the same fits on the prompt/completion records end."""
    grid = {
        "objective": {"terms": [{"kind": "exact_match", "dev": "arith", "max_new_tokens": 4}]},
        "search": {"strategy": "grid", "grid": {"divisions": 2}},
    }
    for sections in ({}, grid):
        text = fit(
            recipe_from_dict(_tree(tiny_chat_world, "text", tmp_path / "t", **sections)), progress=False
        )
        chat = fit(
            recipe_from_dict(_tree(tiny_chat_world, layout, tmp_path / "c", **sections)), progress=False
        )
        assert {k: chat.get(k) for k in SAME} == {k: text.get(k) for k in SAME}


def test_exact_match_answers_the_conversation_before_its_last_message(tiny_chat_world):
    recipe = recipe_from_dict(_tree(tiny_chat_world, "messages", tiny_chat_world["root"] / "run"))
    problem = load_problem(recipe, progress=False)
    chats = read_jsonl(tiny_chat_world["dev"]["arith", "messages"])
    texts = read_jsonl(tiny_chat_world["dev"]["arith", "text"])
    prompt, reference = chat_prompt(chats[0], problem.tokenizer)
    assert (
        prompt == problem.tokenizer(texts[0]["prompt"])["input_ids"] and reference == texts[0]["completion"]
    )
    with problem.stack.at(torch.tensor([0.6, 0.2, 0.2])) as merged:
        on_chats = metrics.exact_match(merged, problem.tokenizer, chats, 4, 8, "cpu")
        on_texts = metrics.exact_match(merged, problem.tokenizer, texts, 4, 8, "cpu")
    assert on_chats == on_texts > 0


# ----------------------------------------------------------------------------- token counts of exports


def test_export_counts_a_conversations_rendered_tokens(tmp_path):
    """Under the BOS-and-contents template the character tokenizer gives one token per character
    plus BOS: the count is known without rendering."""
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = CONCAT
    rows = [
        {"messages": [user("12+8="), assistant("20.")]},
        {"prompt": [user("rev ab:")], "completion": [assistant("ba.")]},
    ]
    expected = (1 + 5 + 3) + (1 + 7 + 3)
    assert count_tokens(rows, tokenizer) == expected
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    stats = measure(path, tokenizer)
    assert (stats.samples, stats.tokens) == (2, expected)


# ----------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": []}, "'messages' must be a non-empty list of messages"),
        ({"messages": [user("hi")]}, "no assistant message with content"),
        ({"messages": [{"content": "hi"}]}, "messages message 0 must be an object with a 'role' string"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs 'content' as a string"),
        ({"prompt": [user("hi")]}, "needs a 'completion' (a list of messages)"),
        ({"prompt": [user("hi")], "completion": "yes"}, "'completion' must be a non-empty list of messages"),
        ({"prompt": [user("hi")], "completion": [assistant("")]}, "'completion' has no content"),
        (
            {"messages": [user("hi"), assistant("") | {"function_call": {"name": "f", "arguments": "{}"}}]},
            "messages message 1 has OpenAI's legacy 'function_call', which chat templates do not write",
        ),
        (
            {
                "messages": [
                    user("q"),
                    assistant("a"),
                    user("hi"),
                    {"role": "assistant", "function_call": {"name": "f"}},
                ]
            },
            "messages message 3 has OpenAI's legacy 'function_call'",
        ),
        ({"prompt": [user("hi")], "choices": ["a", "b"], "answer": 0}, "'prompt' must be a string"),
    ],
)
def test_a_malformed_conversation_names_file_and_line(tmp_path, record, message):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"messages": [user("q"), assistant("a")]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_a_conversation_without_a_chat_template_is_refused_naming_the_set(tmp_path):
    path = tmp_path / "dev.jsonl"
    write_jsonl(path, [{"messages": [user("1+1="), assistant("2.")]}] * 4)
    with pytest.raises(UserError, match=rf"dev set {path}: record 1: a conversation needs a chat template"):
        load_dev_set("a", path, 1.0, toy.build_tokenizer(), 64, 0.25, 0)


def test_a_conversation_the_template_refuses_names_the_record(tmp_path):
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "dev.jsonl"
    write_jsonl(
        path,
        [
            {"messages": [user("1+1="), assistant("2.")]},
            {"messages": [{"role": "system", "content": "x"}, user("1+1="), assistant("2.")]},
        ],
    )
    with pytest.raises(
        UserError,
        match=rf"dev set {path}: record 2: the chat template refused the conversation: System role not supported",
    ):
        load_dev_set("a", path, 1.0, tokenizer, 64, 0.0, 0)


def test_an_error_past_the_template_is_a_traceback_not_a_line_about_the_template(tmp_path, monkeypatch):
    """Only what the template's code, or apply_chat_template's checks of a record's arguments,
    raise is the template's or the record's line; an error in transformers' own work after the
    rendering (here its assistant mask over a tokenizer output with no offsets, as a tokenizer
    without a Rust backend gives) is a bug with its traceback: the line sent the user to a
    template that rendered fine, and hid the traceback even under --debug."""
    from transformers import BatchEncoding

    from mergeopt.objectives.chat import render

    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    messages = [user("1+1="), assistant("2.")]
    with pytest.raises(UserError, match=r"failed on the conversation \(ValueError: continue_final_message"):
        render(tokenizer, messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(UserError, match=r"failed on the conversation \(TypeError: .*'tokenize'"):
        render(tokenizer, messages, tokenize=False)  # a record's chat_template_kwargs naming it
    encode = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: BatchEncoding(dict(encode(*a, **k))))
    with pytest.raises(TypeError):
        render(tokenizer, messages, return_assistant_tokens_mask=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    with pytest.raises(UserError, match=r"failed on the conversation \(TypeError: can only concatenate"):
        render(tokenizer, messages)


def test_trls_own_failure_is_not_read_as_a_template_without_a_training_version(monkeypatch):
    """TRL saying it has no training version (its ValueError), or the template failing on TRL's
    probe conversations, is None: the conversation is scored by the renderings' difference. TRL's
    own code failing otherwise is raised: read as None, the turns were scored otherwise than TRL's
    SFTTrainer trains on them, without a word."""
    import trl.chat_template_utils as trl_templates

    from mergeopt.objectives import chat

    tokenizer = toy.build_tokenizer()
    for number, (raised, expected) in enumerate(
        [(ValueError("not supported"), None), (TypeError("bug"), TypeError)]
    ):

        def failing(_probe, error=raised):
            raise error

        monkeypatch.setattr(trl_templates, "get_training_chat_template", failing)
        template = f"{{{{ bos_token }}}}{{# {number} #}}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"
        if expected is None:
            assert chat.training_template(tokenizer, template) is None
        else:
            with pytest.raises(expected):
                chat.training_template(tokenizer, template)
    monkeypatch.undo()
    failing_on_tools = "{% for m in messages %}{{ m['content'] + (m['tool_calls'] | length) }}{% endfor %}"
    assert chat.training_template(tokenizer, failing_on_tools) is None


def test_exact_match_refuses_a_conversation_that_does_not_end_with_an_answer(tiny_chat_world, tmp_path):
    path = tmp_path / "open.jsonl"
    write_jsonl(path, [{"messages": [user("1+1="), assistant("2."), user("and 2+2?")]}] * 8)
    tree = _tree(
        tiny_chat_world,
        "messages",
        tmp_path / "run",
        objective={"terms": [{"kind": "exact_match", "dev": "arith"}]},
        search={"strategy": "grid", "grid": {"divisions": 2}},
    )
    tree["data"]["dev"][0]["path"] = str(path)
    with pytest.raises(
        UserError, match=r"exact_match needs .* conversation \(ending with the assistant's answer\)"
    ):
        fit(recipe_from_dict(tree), progress=False)
    assert not (tmp_path / "run").exists()


def test_exact_match_refuses_a_conversation_ending_in_a_tool_call_before_any_model_is_loaded():
    """A conversation whose last turn calls tools with no text has no reference for exact match:
    chat_prompt refuses it, but only when the metric is computed, after the experts are stacked;
    the dev sets' check (before any model is loaded) let it through as ending with an answer."""
    from mergeopt.objectives.data import DevSet, Example
    from mergeopt.objectives.term_scores import check_term_records

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = {
        "messages": [user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [call]}]
    }
    example = Example(torch.tensor([1, 2]), torch.tensor([False, True]), record)
    term = types.SimpleNamespace(kind="exact_match", dev="calls", label="em")
    with pytest.raises(
        UserError, match=r"exact_match needs .* conversation \(ending with the assistant's answer\)"
    ):
        check_term_records([DevSet("calls", 1.0, [example], [])], [term])


def test_grid_runs_train_on_a_conversation_as_on_its_text(tiny_chat_world):
    """``mergeopt train`` reads its training sets as the dev sets are read: the same tokens, the
    same scored ones."""
    from mergeopt.worlds.training_data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_world["base"])
    text = load_examples(str(tiny_chat_world["dev"]["reverse", "text"]), tokenizer, 64)
    for layout in ("prompt", "messages"):
        chat = load_examples(str(tiny_chat_world["dev"]["reverse", layout]), tokenizer, 64)
        assert [(e.input_ids.tolist(), e.scored.tolist()) for e in chat] == [
            (e.input_ids.tolist(), e.scored.tolist()) for e in text
        ]


# ----------------------------------------------------------------------------- data.chat_template


def _template_sources(root: Path) -> dict[str, Path]:
    """The same template as data.chat_template can name it: a file, or a tokenizer directory that
    holds it as chat_template.jinja, as tokenizer_config.json's string, or as its 'default' entry."""
    root.mkdir(parents=True, exist_ok=True)
    sources = {"file": root / "template.jinja"}
    sources["file"].write_text(CONCAT)
    for kind, config in {
        "jinja": None,
        "config": {"chat_template": CONCAT},
        "named": {
            "chat_template": [
                {"name": "tool_use", "template": "{{ 0 }}"},
                {"name": "default", "template": CONCAT},
            ]
        },
    }.items():
        sources[kind] = root / kind
        sources[kind].mkdir()
        if config is None:
            (sources[kind] / "chat_template.jinja").write_text(CONCAT)
        else:
            (sources[kind] / "tokenizer_config.json").write_text(json.dumps(config))
    return sources


def test_data_chat_template_renders_conversations_for_a_base_without_one(tiny_chat_world, tmp_path):
    """The tiny world's own base has no template: each way of naming one gives the fit on the text,
    and the run's export counts the conversations with it."""
    text = fit(recipe_from_dict(_tree(tiny_chat_world, "text", tmp_path / "t")), progress=False)
    for kind, source in _template_sources(tmp_path / "templates").items():
        tree = _tree(tiny_chat_world, "messages", tmp_path / kind)
        tree["model"]["base"] = str(tiny_chat_world["world"] / "base")
        tree["data"]["chat_template"] = str(source)
        chat = fit(recipe_from_dict(tree), progress=False)
        assert {k: chat.get(k) for k in SAME} == {k: text.get(k) for k in SAME}, kind
    # counted alike, so sampled alike: hf-datasets, whose loader adds no token to either layout
    # (TRL appends an EOS to a text sample and none to a conversation: its counts differ by that)
    shares = {}
    for layout, run in (("text", tmp_path / "t"), ("messages", tmp_path / "file")):
        datasets = [f"{n}={tiny_chat_world['dev'][n, layout]}" for n in EXPERTS]
        out = tmp_path / f"export-{layout}.yaml"
        command = [str(run), "--to", "hf-datasets-yaml", "--out", str(out), "--datasets", *datasets]
        assert run_cli(export_main, command) == 0
        shares[layout] = yaml.safe_load(out.read_text())["probabilities"]
    assert shares["messages"] == shares["text"] and len(shares["text"]) == len(EXPERTS)
    # axolotl renders conversations with the tokenizer's template unless told: the run's is written
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    datasets = [f"{n}={tiny_chat_world['dev'][n, 'messages']}" for n in EXPERTS]
    out = tmp_path / "axolotl.yaml"
    assert (
        run_cli(
            export_main,
            [str(tmp_path / "file"), "--to", "axolotl", "--out", str(out), "--datasets", *datasets],
        )
        == 0
    )
    config = yaml.safe_load(out.read_text())
    cfg = schema.AxolotlInputConfig(base_model=str(tiny_chat_world["base"]), learning_rate=1e-5, **config)
    assert {(d.chat_template, d.chat_template_jinja) for d in cfg.datasets} == {("jinja", CONCAT)}


def test_the_chat_template_file_is_an_input_of_the_run(tiny_chat_world, tmp_path):
    """A template edited between a kill and the rerun is an input that changed: resume refuses it."""
    from mergeopt.runtime.fingerprint import first_changed, input_fingerprints

    template = tmp_path / "template.jinja"
    template.write_text(CONCAT)
    tree = _tree(tiny_chat_world, "messages", tmp_path / "run")
    tree["data"]["chat_template"] = str(template)
    saved = input_fingerprints(recipe_from_dict(tree))
    assert str(template) in saved and first_changed(saved) is None
    template.write_text(CONCAT + "{{ eos_token }}")
    assert first_changed(saved) == str(template)


def test_a_chat_template_that_is_not_text_is_named(tmp_path):
    from mergeopt.objectives.chat import read_template

    binary = tmp_path / "template.jinja"
    binary.write_bytes(b"\xff\xfe\x00{{")
    with pytest.raises(UserError, match=rf"data.chat_template: {binary} is not UTF-8 text"):
        read_template(str(binary))


def test_a_template_that_prints_todays_date_prints_a_fixed_one(tiny_chat_world, capsys):
    """Llama 3.x's header prints ``date_string``, today's date unless given: the same dev set must
    read the same tokens on every day, so mergeopt gives 26 Jul 2024 (the templates' own fallback);
    a template that prints the date some other way is named in one warning."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_world["base"])
    dated = AutoTokenizer.from_pretrained(tiny_chat_world["base"])
    dated.chat_template = (
        "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "{{ bos_token }}{{ date_string }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    record = {"messages": [user("1+1="), assistant("2.")]}
    ids, scored = tokenize_chat(record, dated)
    assert ids == tokenizer("26 Jul 20241+1=2.")["input_ids"] and scored == [False] * 16 + [True] * 2
    assert "today's date" not in capsys.readouterr().err
    dated.chat_template = (
        "{{ bos_token }}{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    tokenize_chat(record, dated)
    tokenize_chat(record, dated)
    assert capsys.readouterr().err.count("the chat template prints today's date") == 1


# ----------------------------------------------------------------------------- TRL's training templates


def _trl_template(name: str) -> str:
    """A chat template as its model ships it, from the copies TRL keeps (trl/chat_templates/)."""
    trl = pytest.importorskip("trl")
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["qwen3", "llama3", "qwen2_5"])
def test_messages_under_a_template_trl_keeps_a_training_version_of_score_as_trl(smollm2, name):
    """Qwen3's template writes an empty think block only into the turn that ends a conversation,
    so an earlier turn renders differently alone: TRL renders with its training version of the
    template (marked, prefix-preserving) under assistant_only_loss, and so does mergeopt; every
    assistant turn is scored, the earlier ones included."""
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tokenizer.chat_template = _trl_template(name)
    rows = [{"messages": c} for c in CONVERSATIONS]
    training = get_training_chat_template(tokenizer)
    for row, reference in zip(rows, trl_labels(rows, tokenizer, assistant_only=True, chat_template=training)):
        assert ours(row, tokenizer) == reference
        ids, scored = reference
        said = tokenizer.decode([i for i, s in zip(ids, scored) if s])
        for message in row["messages"]:
            if message["role"] == "assistant":
                assert message["content"].strip() in said


def test_repetition_caps_count_conversational_training_sets_with_the_recipes_template(
    tiny_chat_world, tmp_path
):
    """weights.max_epochs counts each train.data set's tokens: conversations as data.chat_template
    renders them, the same counts as the text records they render to."""
    template = tmp_path / "template.jinja"
    template.write_text(CONCAT)
    constraints = {}
    for layout in ("text", "messages"):
        tree = _tree(tiny_chat_world, layout, tmp_path / layout)
        tree["model"]["base"] = str(tiny_chat_world["world"] / "base")  # no template of its own
        tree["data"]["chat_template"] = str(template)
        tree["weights"] = {"max_epochs": 2.0, "token_budget": 2000}
        tree["train"] = {"data": {n: str(tiny_chat_world["dev"][n, layout]) for n in EXPERTS}}
        constraints[layout] = fit(recipe_from_dict(tree), progress=False)["constraints"]
    assert constraints["messages"] == constraints["text"] and constraints["text"]["tokens"]["arith"] > 0


def test_a_records_template_inputs_reach_the_template_as_in_trl(smollm2):
    """``chat_template_kwargs`` (Qwen 3's ``enable_thinking``) and ``tools`` go to the template with
    the record's messages, as TRL passes them: the same tokens and masks as TRL's preparation, in
    both layouts, and exact match's prompt is rendered with them too."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tokenizer.chat_template = _trl_template("qwen3")
    from trl.chat_template_utils import get_training_chat_template

    tool = {
        "type": "function",
        "function": {"name": "add", "description": "Add two numbers.", "parameters": {}},
    }
    extras = {"chat_template_kwargs": {"enable_thinking": False}, "tools": [tool]}
    conversation = CONVERSATIONS[1]
    messages = [{"messages": conversation, **extras}]
    pairs = [{"prompt": conversation[:-1], "completion": conversation[-1:], **extras}]
    training = get_training_chat_template(tokenizer)
    assert ours(messages[0], tokenizer) == trl_labels(messages, tokenizer, True, training)[0]
    assert ours(pairs[0], tokenizer) == trl_labels(pairs, tokenizer, False)[0]
    assert ours(messages[0], tokenizer) != ours({"messages": conversation}, tokenizer)  # they matter
    prompt, _ = chat_prompt(messages[0], tokenizer)
    expected = tokenizer.apply_chat_template(
        conversation[:-1],
        add_generation_prompt=True,
        enable_thinking=False,
        tools=[tool],
        date_string="26 Jul 2024",
    )["input_ids"]
    assert prompt == list(expected) and tokenizer.decode(prompt).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"chat_template_kwargs": ["enable_thinking"]}, "'chat_template_kwargs' must be an object"),
        ({"tools": {"name": "add"}}, "'tools' must be a list of tool schemas"),
        ({"tools": "[{"}, "'tools' is a string but not JSON"),
    ],
)
def test_a_records_malformed_template_inputs_are_named(tmp_path, extra, message):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"messages": [user("q"), assistant("a")], **extra}])
    with pytest.raises(UserError, match=rf"{path}:1: {re.escape(message)}"):
        read_jsonl(path)


def test_a_turn_whose_template_writes_its_tool_call_in_place_of_its_content_is_scored(smollm2):
    """Llama 3.1's template writes an assistant turn's tool call and not its content: the tool call
    is what the turn says and is scored (it was refused as a template writing only its markup); a
    template that writes neither is still refused."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tokenizer.chat_template = _trl_template("llama3_1")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turn = {"role": "assistant", "content": "Let me check.", "tool_calls": [call]}
    for record in (
        {"messages": [user("Weather in Paris?"), turn]},
        {"prompt": [user("Weather?")], "completion": [turn]},
    ):
        ids, scored = tokenize_chat(record, tokenizer)
        said = tokenizer.decode([i for i, s in zip(ids, scored) if s])
        assert '"name": "get_weather"' in said and "Let me check." not in said
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {% if m.role != 'assistant' %}{{ m.content }}{% endif %}\n{% endfor %}"
    with pytest.raises(
        UserError, match="the chat template writes nothing of what the assistant's messages say"
    ):
        tokenize_chat({"messages": [user("Weather in Paris?"), turn]}, tokenizer)


@pytest.mark.parametrize("content", [None, "absent"])
def test_a_turn_that_calls_tools_without_text_is_scored_as_its_tool_call(smollm2, tmp_path, content):
    """TRL's tool-calling records (and OpenAI's messages) give a turn that calls tools no text:
    ``content`` None or absent, as Arrow also writes it into a parquet file's other messages. Such
    records were refused ("needs 'content' as a string"); the tool call is scored now, as TRL
    scores it. A turn with neither text nor a tool call is still refused, and so is generation
    (exact match) on a conversation whose last turn has no text to compare with."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tokenizer.chat_template = _trl_template("qwen2_5")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turn = {"role": "assistant", "tool_calls": [call]} | ({} if content == "absent" else {"content": None})
    records = [
        {"messages": [user("Weather in Paris?"), turn]},
        {"prompt": [user("Weather in Paris?")], "completion": [turn]},
    ]
    path = write_jsonl(tmp_path / "dev.jsonl", records)
    read = read_jsonl(path)
    for record in read:
        ids, scored = tokenize_chat(record, tokenizer)
        said = tokenizer.decode([i for i, s in zip(ids, scored) if s])
        assert '"name": "get_weather"' in said, said
    from trl.chat_template_utils import get_training_chat_template

    training = get_training_chat_template(tokenizer)
    assert ours(read[0], tokenizer) == trl_labels(read[:1], tokenizer, True, training)[0]
    assert ours(read[1], tokenizer) == trl_labels(read[1:], tokenizer, False)[0]
    with pytest.raises(UserError, match="must end with an assistant message with text"):
        chat_prompt(read[0], tokenizer)
    silent = {"role": "assistant", "content": None, "tool_calls": []}
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("q"), silent]}])
    with pytest.raises(UserError, match=rf"{path}:1: messages message 1 needs 'content' as a string"):
        read_jsonl(path)


@pytest.mark.parametrize("name", ["gemma", "llama3"])
def test_a_tool_call_a_template_does_not_write_is_not_scored_as_its_turns_markup(smollm2, tmp_path, name):
    """Gemma's and Llama 3.0's templates write an assistant turn's content and no tool call: a turn
    that calls tools with no text (content None, as in a parquet file whose other records have
    text turns) rendered as its end-of-turn markup alone, which was scored as the answer (the check
    gave the turn a stand-in text, which the template writes). Refused, as a template writing
    nothing of the answer is; a text turn beside it is still scored."""
    pd = pytest.importorskip("pandas")
    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    tokenizer.chat_template = _trl_template(name)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = {"role": "assistant", "content": None, "tool_calls": [call]}
    rows = [
        {"messages": [user("Hi"), assistant("Hello")]},
        {"messages": [user("Weather in Paris?"), turn]},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "dev.parquet")
    pd.DataFrame([{"prompt": [user("Weather?")], "completion": [turn]}]).to_parquet(tmp_path / "pc.parquet")
    text, calls = read_records(tmp_path / "dev.parquet")
    assert calls["messages"][1]["content"] is None and text["messages"][1]["tool_calls"] is None  # Arrow's
    ids, scored = tokenize_chat(text, tokenizer)
    assert "Hello" in tokenizer.decode([i for i, s in zip(ids, scored) if s])
    for record in (calls, *read_records(tmp_path / "pc.parquet")):
        with pytest.raises(UserError, match="the chat template writes nothing of what the"):
            tokenize_chat(record, tokenizer)


@pytest.mark.parametrize(
    "empty", ["", " ", {}, {"name": None, "arguments": None}, {"name": "", "arguments": ""}]
)
def test_an_empty_legacy_function_call_is_no_call(tmp_path, empty):
    """Exports fill an absent function_call as '' or {}, and Arrow makes {} a struct of nulls
    ({'name': None, 'arguments': None}) in a parquet file: none names a function, so none is refused
    (the struct of nulls was refused as OpenAI's legacy 'function_call', naming a record with no call)."""
    path = tmp_path / "dev.jsonl"
    record = {"messages": [user("hi") | {"function_call": empty}, assistant("yo") | {"function_call": empty}]}
    path.write_text(json.dumps(record) + "\n")
    assert read_jsonl(path) == [record]


def test_a_parquet_file_with_one_legacy_call_names_its_record(tmp_path):
    """{} in the other records is a struct of nulls once in parquet: the refusal names the record
    that calls, not the first record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = {"messages": [user("hi") | {"function_call": {}}, assistant("yo") | {"function_call": {}}]}
    call = {
        "messages": [
            user("q"),
            {"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}},
        ]
    }
    pq.write_table(pa.Table.from_pylist([plain, plain, call]), tmp_path / "dev.parquet")
    with pytest.raises(UserError) as err:
        read_records(tmp_path / "dev.parquet")
    assert "record 3" in str(err.value) and "legacy 'function_call'" in str(err.value)
