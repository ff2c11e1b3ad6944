"""export to axolotl and torchtune: each file read back by the framework's own code, as sample counts.

Neither framework weighs datasets, so both exports say the mixture as per-dataset counts
(``split: train[:N]``, a dataset listed once per full pass). torchtune's ``config.instantiate``
builds each entry of the ``dataset:`` list with a tiny character tokenizer and its
``ConcatDataset`` joins them, as a recipe's ``_setup_data`` does; axolotl's own config model
(``AxolotlInputConfig``) validates the file and its ``load_dataset_with_config`` and
``merge_datasets`` load and concatenate the entries, as its SFT loader does. Each sample's domain is
counted and must equal the exported counts, with and without a budget. The world's domains have
disjoint record lengths (a: 4 or 8 characters, b: 20 or 30, c: 9 or 11), so torchtune's token
counts tell each sample's domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.shares import make_plan
from tests.export_world import (
    LENGTHS,
    WEIGHTS,
    build_world,
    chat_world,
    export,
    measured_stats,
    tool_world,
    yaml_body,
)

BUDGET = ("--budget-samples", "6000")  # repeats a and b: entries listed once per full pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


def expected(extra: tuple[str, ...], added: int = 1) -> dict[str, int]:
    """The counts of the world's records: each trainer adds an EOS to a prompt/completion or text
    sample (``added``; none to a conversation), and counts the fitted token shares of its tokens."""
    stats = measured_stats(added)
    if extra:
        return make_plan(WEIGHTS, "tokens", stats, budget_samples=int(extra[1])).counts
    return make_plan(WEIGHTS, "tokens", stats).no_repeat_counts()


# ---------------------------------------------------------------- torchtune


class CharTokenizer:
    """What torchtune's ``instruct_dataset`` needs of a model transform: messages -> tokens and mask."""

    max_seq_len = None

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        tokens = [ord(ch) for message in sample["messages"] for ch in message.text_content]
        return {**sample, "tokens": tokens, "mask": [False] * len(tokens)}


def test_torchtune_instantiates_the_export_to_the_counts(world, tmp_path):
    config = pytest.importorskip("torchtune.config")
    from omegaconf import OmegaConf
    from torchtune.datasets import ConcatDataset

    domain_of = {length: name for name, lengths in LENGTHS.items() for length in lengths}
    for extra in ((), BUDGET):
        path = tmp_path / f"torchtune-{len(extra)}.yaml"
        path.write_text(export(world, "torchtune", tmp_path, *extra))
        cfg = OmegaConf.load(path)  # what the recipe reads: ``dataset`` is a ListConfig
        parts = [config.instantiate(entry, CharTokenizer()) for entry in cfg.dataset]
        mixture = ConcatDataset(datasets=parts)
        counts = dict.fromkeys(WEIGHTS, 0)
        for i in range(len(mixture)):
            counts[domain_of[len(mixture[i]["tokens"])]] += 1
        assert counts == expected(extra)


# ---------------------------------------------------------------- axolotl


def test_axolotl_schema_and_loader_read_the_export_as_the_counts(world, tmp_path):
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    pytest.importorskip("axolotl.utils.data.shared")

    for extra in ((), BUDGET):
        exported = yaml_body(export(world, "axolotl", tmp_path, *extra))
        cfg = schema.AxolotlInputConfig(base_model=world["tokenizer"], learning_rate=1e-5, **exported)
        assert len(cfg.datasets) == len(exported["datasets"])
        assert cfg.dataset_exact_deduplication is False
        assert _axolotl_counts(cfg) == expected(extra)


def _axolotl_counts(cfg) -> dict[str, int]:
    """Samples per domain of the validated config's entries loaded by axolotl's
    ``load_dataset_with_config`` and concatenated by its ``merge_datasets``, as its SFT loader does."""
    from axolotl.utils.data import shared
    from axolotl.utils.dict import DictDefault

    loaded = [
        shared.load_dataset_with_config(DictDefault(d.model_dump()), use_auth_token=False)
        for d in cfg.datasets
    ]
    mixture = shared.merge_datasets(loaded, DictDefault(cfg.model_dump()))
    return {n: mixture["domain"].count(n) for n in WEIGHTS}


# ---------------------------------------------------------------- what neither can take


@pytest.mark.parametrize("fmt", ["axolotl", "torchtune"])
@pytest.mark.parametrize(
    "record,says",
    [
        ({"prompt": "q", "choices": ["x", "y"], "answer": 1}, "multiple-choice"),
        ({"text": "abc"}, "mixes 'text' and 'prompt'"),
    ],
)
def test_a_layout_the_format_cannot_read_is_refused(world, tmp_path, capsys, fmt, record, says):
    bad = tmp_path / "a.jsonl"
    rows = [record, {"prompt": "p", "completion": "c"}] if "text" in record else [record] * 2
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = {**world["paths"], "a": bad}
    out = tmp_path / "out.yaml"
    argv = [str(world["mixture"]), "--to", fmt, "--tokenizer", world["tokenizer"], "--out", str(out)]
    argv += ["--datasets", *(f"{n}={p}" for n, p in paths.items())]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fmt in err[0] and "'a'" in err[0] and str(bad) in err[0] and says in err[0]
    assert not out.exists()


def _torchtune_counts(entries: list[dict], transform, domain_of: dict[int, str]) -> dict[str, int]:
    """Samples per domain (told by their token counts) of the entries built by torchtune's
    ``config.instantiate`` and joined by its ``ConcatDataset``, as a recipe's ``_setup_data`` does."""
    config = pytest.importorskip("torchtune.config")
    from omegaconf import OmegaConf
    from torchtune.datasets import ConcatDataset

    mixture = ConcatDataset(datasets=[config.instantiate(OmegaConf.create(e), transform) for e in entries])
    counts = dict.fromkeys(WEIGHTS, 0)
    for i in range(len(mixture)):
        counts[domain_of[len(mixture[i]["tokens"])]] += 1
    return counts


# ---------------------------------------------------------------- text records


class CharEncoder:
    """What torchtune's ``text_completion_dataset`` needs of a tokenizer: ``encode`` and ``max_seq_len``."""

    max_seq_len = None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return [1] * add_bos + [ord(ch) for ch in text] + [2] * add_eos


def test_text_records_go_to_each_frameworks_text_builder(world, tmp_path):
    """``text`` datasets: torchtune's text_completion_dataset and axolotl's ``type: completion``,
    the same counts (the texts are the world's prompt + completion, so the lengths are kept)."""
    schema = pytest.importorskip("axolotl.utils.schemas.config")

    text_world = {**world, "paths": {}}
    for name, path in world["paths"].items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        text_world["paths"][name] = tmp_path / f"{name}-text.jsonl"
        text_world["paths"][name].write_text(
            "".join(json.dumps({"text": r["prompt"] + r["completion"], "domain": name}) + "\n" for r in rows)
        )
    domain_of = {2 + length: name for name, lengths in LENGTHS.items() for length in lengths}  # BOS, EOS
    tune = yaml_body(export(text_world, "torchtune", tmp_path, *BUDGET))
    assert {e["_component_"] for e in tune["dataset"]} == {"torchtune.datasets.text_completion_dataset"}
    assert _torchtune_counts(tune["dataset"], CharEncoder(), domain_of) == expected(BUDGET)
    axo = yaml_body(export(text_world, "axolotl", tmp_path, *BUDGET))
    cfg = schema.AxolotlInputConfig(base_model=world["tokenizer"], learning_rate=1e-5, **axo)
    assert {d.type for d in cfg.datasets} == {"completion"}  # reads the ``text`` field by default
    assert [d.split for d in cfg.datasets] == [e["split"] for e in tune["dataset"]]


# ---------------------------------------------------------------- conversations


def test_conversations_go_to_each_frameworks_chat_builder(world, tmp_path):
    """``messages`` datasets: torchtune's chat_dataset (OpenAI style) and axolotl's ``type:
    chat_template``, each read back to the counts, which the template keeps those of the text."""
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    pytest.importorskip("axolotl.utils.data.shared")

    chat = chat_world(world, tmp_path, "messages")
    domain_of = {length: name for name, lengths in LENGTHS.items() for length in lengths}
    tune = yaml_body(export(chat, "torchtune", tmp_path, *BUDGET))
    assert {e["_component_"] for e in tune["dataset"]} == {"torchtune.datasets.chat_dataset"}
    assert _torchtune_counts(tune["dataset"], CharTokenizer(), domain_of) == expected(BUDGET, added=0)
    axo = yaml_body(export(chat, "axolotl", tmp_path, *BUDGET))
    cfg = schema.AxolotlInputConfig(base_model=chat["tokenizer"], learning_rate=1e-5, **axo)
    assert {(d.type, d.field_messages, tuple(d.roles_to_train)) for d in cfg.datasets} == {
        ("chat_template", "messages", ("assistant",))
    }
    assert _axolotl_counts(cfg) == expected(BUDGET, added=0)


# renders the tools, each message and its tool calls; its loop variable is not named ``message``
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['role'] }}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% endif %}{% endfor %}"
)


def test_axolotl_trains_the_tool_calls_it_was_counted_with(world, tmp_path):
    """axolotl's chat_template strategy gives the template only the message fields its template
    analyzer finds read on a loop variable named ``message``: under a template that loops
    ``{% for m in messages %}`` the export's entry (role and content mapped) lost every
    ``tool_calls``, so axolotl trained the tool-calling domain on about a third fewer tokens than
    were counted, and never on a call. The entry maps the tool fields now: axolotl's own loader
    and tokenizer give the ids mergeopt counted, record by record, calls trained."""
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    sft = pytest.importorskip("axolotl.utils.data.sft")
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from mergeopt.objectives.chat import render

    tools = tool_world(world, tmp_path)
    (Path(tools["tokenizer"]) / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    path = tools["paths"][tools["tool_domain"]]
    axo = yaml_body(export(tools, "axolotl", tmp_path))
    cfg = schema.AxolotlInputConfig(
        base_model=tools["tokenizer"], learning_rate=1e-5, sequence_len=4096, **axo
    )
    (entry,) = [d for d in cfg.datasets if d.path == str(path)]
    tokenizer = AutoTokenizer.from_pretrained(tools["tokenizer"])
    loaded, _ = sft._load_and_process_single_dataset(
        dataset_config=DictDefault(entry.model_dump(exclude_none=True)),
        cfg=DictDefault(cfg.model_dump(exclude_none=True)),  # as axolotl normalizes its config
        tokenizer=tokenizer,
        split="train",
        seed=0,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()][: len(loaded)]
    counted = [render(tokenizer, r["messages"], tools=r["tools"])["input_ids"] for r in records]
    assert len(loaded) == int(entry.split.removeprefix("train[:").removesuffix("]")) > 0
    assert loaded["input_ids"] == counted
    trained = [
        i for i, label in zip(loaded[0]["input_ids"], loaded[0]["labels"], strict=True) if label != -100
    ]
    call = json.dumps(records[0]["messages"][1]["tool_calls"])
    assert tokenizer.decode(tokenizer(call, add_special_tokens=False)["input_ids"]) in tokenizer.decode(
        trained
    )


def test_torchtune_refuses_conversations_that_call_tools(world, tmp_path, capsys):
    """torchtune's OpenAIToMessages keeps each message's content alone: the tool call is lost and
    the turn without text trains the user's question (checked with torchtune's own transform where
    installed). The export used to write chat_dataset for them; it refuses in one line now."""
    tools = tool_world(world, tmp_path)
    name, path = tools["tool_domain"], tools["paths"][tools["tool_domain"]]
    try:
        from torchtune.data import OpenAIToMessages
    except ImportError:
        pass
    else:
        record = json.loads(path.read_text().splitlines()[0])
        read = OpenAIToMessages()(record)["messages"]
        assert read[1].text_content == record["messages"][0]["content"]  # the question, trained again
    out = tmp_path / "out.yaml"
    argv = [str(tools["mixture"]), "--to", "torchtune", "--tokenizer", tools["tokenizer"], "--out", str(out)]
    argv += ["--datasets", *(f"{n}={p}" for n, p in tools["paths"].items())]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name!r} (" in err[0] and "call tools" in err[0] and "--to trl" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["axolotl", "torchtune"])
def test_prompt_completion_conversations_are_refused_for_one_column_builders(world, tmp_path, capsys, fmt):
    chat = chat_world(world, tmp_path, "prompt")
    out = tmp_path / "out.yaml"
    argv = [str(chat["mixture"]), "--to", fmt, "--tokenizer", chat["tokenizer"], "--out", str(out)]
    argv += ["--datasets", *(f"{n}={p}" for n, p in chat["paths"].items())]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fmt in err[0] and "prompt/completion lists of messages" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["axolotl", "torchtune"])
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_each_dataset_is_read_once_for_its_counts_and_its_layout(world, tmp_path, monkeypatch, fmt, suffix):
    """The layout (columns) comes from the read that measured the dataset, not a second load; JSON
    Lines are read line by line alone, never through ``datasets`` (no Arrow copy of a large corpus)."""
    from mergeopt.export import token_stats
    from mergeopt.objectives import data_files

    if suffix == "parquet":
        paths = {}
        for name, path in world["paths"].items():
            paths[name] = tmp_path / f"{name}.parquet"
            datasets.Dataset.from_json(str(path), cache_dir=str(tmp_path / "cache")).to_parquet(paths[name])
        world = {**world, "paths": paths}
    loads, lines = [], []
    real_load, real_lines = token_stats.load, data_files.jsonl_records

    def counted(source, cache=None):
        loads.append(source.path)
        return real_load(source, cache)

    def counted_lines(path):
        lines.append(path.resolve())
        return real_lines(path)

    monkeypatch.setattr(token_stats, "load", counted)
    monkeypatch.setattr(token_stats, "jsonl_records", counted_lines)
    export(world, fmt, tmp_path)
    read = sorted(lines if suffix == "jsonl" else loads)
    assert read == sorted(p.resolve() for p in world["paths"].values())
    assert not (loads if suffix == "jsonl" else lines)


def test_json_lines_columns_are_typed_as_datasets_types_them(tmp_path):
    """The columns gathered line by line, and whether each holds text, equal ``datasets``' features
    of the same file: extra columns, numbers, nulls, lists of messages."""
    from mergeopt.export import token_stats

    records = [
        {"prompt": "p", "completion": "c", "id": 1, "source": None, "note": None, "tags": ["a"]},
        {"prompt": "q", "completion": "d", "id": 2, "source": "web", "note": None, "tags": []},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
    ]
    cases = {"pairs": records[:2], "chat": records[2:], "text": [{"text": "t", "n": 0.5}, {"text": "u"}]}
    for name, rows in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        source = token_stats.source_of(path)
        expected = token_stats._column_kinds(token_stats.load(source, str(tmp_path / "cache")))
        token_stats._COLUMNS.clear()
        assert token_stats._columns(source) == expected, name
        kinds = token_stats.ColumnKinds()
        for records_read in token_stats.record_batches(source, None, kinds):
            assert records_read
        assert kinds.result() == expected, name


def test_a_dataset_rewritten_since_its_columns_were_read_is_read_again(tmp_path):
    from mergeopt.export import token_stats

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert token_stats.columns(token_stats.source_of(path)) == {"prompt", "completion"}
    path.write_text(json.dumps({"text": "a longer text"}) + "\n")  # another size
    assert token_stats.columns(token_stats.source_of(path)) == {"text"}
