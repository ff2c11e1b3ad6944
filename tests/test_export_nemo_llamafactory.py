"""export --to nemo / llamafactory, read by the frameworks' own code where it runs here.

LLaMA-Factory 0.9.5 (``pip install --no-deps``) parses the export with its own ``DataArguments`` and
mixes the world's JSONL datasets with its own ``merge_dataset``, in a child process: its import
checks transformers' version (``DISABLE_VERSION_CHECK=1``, its documented switch) and imports
torchaudio for audio templates this path never uses (stubbed in the child only). The child is
forked from a server that imported LLaMA-Factory once (tests/llamafactory_child.py).

NeMo: nemo-toolkit 3.0.0 has no LLM data path, and 2.7.3 (the last with one) does not import beside
this project's transformers 5, so the two NeMo forms go through the megatron-core code NeMo hands
them to: ``data_prefix`` through ``get_blend_from_list`` and ``BlendedMegatronDatasetBuilder`` (what
nemo-toolkit 2.7.3's ``PreTrainingDataModule(paths=...)`` calls), and ``concat_sampling_probabilities``
through ``build_blending_indices`` (the routine NeMo 1's ``BlendableDataset`` runs from its own copy of
Megatron's helpers) after NeMo 1's own checks on it (a list as long as ``file_names``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.shares import make_plan
from tests.export_world import (
    WEIGHTS,
    build_world,
    chat_run_with_template,
    chat_world,
    expected_sample_shares,
    export,
    header_entries,
    measured_stats,
    tool_world,
    write_run,
    yaml_body,
)
from tests.llamafactory_child import run_llamafactory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


def _within_4_se(counts: dict[str, int], expected: dict[str, float]) -> None:
    n = sum(counts.values())
    for name, p in expected.items():
        assert abs(counts[name] / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (name, counts, expected)


# ---------------------------------------------------------------- LLaMA-Factory

LLAMAFACTORY_MIX = """
import importlib.machinery, json, sys, types
audio = types.ModuleType("torchaudio")  # imported by its multimodal templates, unused here
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
import datasets
from transformers import HfArgumentParser
from llamafactory.data.data_utils import merge_dataset
from llamafactory.hparams.data_args import DataArguments

config, paths = json.loads(sys.argv[1])
(args,) = HfArgumentParser(DataArguments).parse_dict(config)
parts = [datasets.load_dataset("json", data_files=paths[n], split="train") for n in args.dataset]
mixed = merge_dataset(parts, args, seed=0)
print(json.dumps([args.dataset, args.interleave_probs, list(mixed["domain"])]))
"""


def _llamafactory_mix(config: dict, paths: dict) -> tuple[list, list, dict[str, int]]:
    child = run_llamafactory(LLAMAFACTORY_MIX, json.dumps([config, {n: str(p) for n, p in paths.items()}]))
    assert child.returncode == 0, child.stderr[-2000:]
    names, probs, domains = json.loads(child.stdout.strip().splitlines()[-1])
    return names, probs, {n: domains.count(n) for n in WEIGHTS}


def test_llamafactory_own_parser_and_merge_draw_the_sample_shares(world, tmp_path):
    """``interleave_under`` stops when the first dataset runs out (``first_exhausted``); every
    domain's share of the drawn samples is within 4 standard errors of its sample share."""
    pytest.importorskip("llamafactory")
    config = yaml_body(export(world, "llamafactory", tmp_path))
    names, probs, counts = _llamafactory_mix(config, world["paths"])
    assert names == list(WEIGHTS)
    # stage: sft, no chat_template: the empty template trains each record without the counted BOS
    assert probs == pytest.approx(list(expected_sample_shares(-1).values()), abs=1e-15)
    _within_4_se(counts, expected_sample_shares(-1))
    # first_exhausted: the domain with the fewest samples per unit of probability runs out
    assert counts["a"] == measured_stats()["a"].samples


LLAMAFACTORY_LOAD = """
import importlib.machinery, json, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
from transformers import HfArgumentParser, Seq2SeqTrainingArguments
from llamafactory.data.loader import _get_merged_dataset
from llamafactory.hparams import DataArguments, ModelArguments

out = []
for dataset_dir, config, stage in json.loads(sys.argv[1]):
    (data_args,) = HfArgumentParser(DataArguments).parse_dict({**config, "dataset_dir": dataset_dir})
    training = Seq2SeqTrainingArguments(output_dir=dataset_dir + "/out", seed=0)
    model_args = ModelArguments(model_name_or_path=dataset_dir)
    mixed = _get_merged_dataset(data_args.dataset, model_args, data_args, training, stage=stage)
    out.append([list(mixed["_system"]), list(mixed["_prompt"]), list(mixed["_response"])])
print(json.dumps(out))
"""


def _llamafactory_load(jobs: list[tuple[Path, dict, dict, str]]) -> list[tuple[list, list, list]]:
    """LLaMA-Factory's own loader, in one child process (its import takes seconds), for each
    ``(directory, header entries, config, stage)``: the entries as the directory's
    dataset_info.json, each record's ``domain`` read as its system column to count where it came
    from; for each job (domains, prompts, responses)."""
    for directory, info, _, _ in jobs:
        traced = {n: {**e, "columns": {**e.get("columns", {}), "system": "domain"}} for n, e in info.items()}
        (directory / "dataset_info.json").write_text(json.dumps(traced))
    arg = json.dumps([[str(directory), config, stage] for directory, _, config, stage in jobs])
    child = run_llamafactory(LLAMAFACTORY_LOAD, arg)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_llamafactory_own_loader_gives_the_budget_counts_and_the_pretraining_text(world, tmp_path):
    """A budget that repeats datasets: each dataset_info.json entry's num_samples is the plan's
    count and ``mix_strategy: concat`` joins them, so LLaMA-Factory's own loader gives exactly the
    budget's counts (interleaving would draw until the rarest dataset ran out, far past it). Every
    dataset of text records: its pretraining entries (``columns: {prompt: text}``, stage: pt),
    whose loader gives each record's text as the prompt its pt processor reads."""
    pytest.importorskip("llamafactory")
    budget_dir, text_dir = tmp_path / "budget", tmp_path / "text"
    budget_dir.mkdir()
    text_dir.mkdir()
    text = export(world, "llamafactory", budget_dir, "--budget-samples", "6000")
    assert "The budget is 6000 samples" in text
    config = yaml_body(text)
    assert config == {"dataset": ",".join(WEIGHTS), "mix_strategy": "concat"}
    info = header_entries(text)
    expected = make_plan(WEIGHTS, "tokens", measured_stats(-1), budget_samples=6000).counts
    assert {n: e["num_samples"] for n, e in info.items()} == expected
    assert any(expected[n] > s.samples for n, s in measured_stats().items())  # a dataset repeats

    paths = {}
    for name, path in world["paths"].items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        paths[name] = text_dir / f"{name}-text.jsonl"
        paths[name].write_text(
            "".join(json.dumps({"text": r["prompt"] + r["completion"], "domain": name}) + "\n" for r in rows)
        )
    pretraining = export({**world, "paths": paths}, "llamafactory", text_dir)
    assert "# text records are pretraining data to LLaMA-Factory: train them with stage: pt" in pretraining
    text_info = header_entries(pretraining)
    assert {e["columns"]["prompt"] for e in text_info.values()} == {"text"}

    (domains, _, _), (text_domains, prompts, _) = _llamafactory_load(
        [(budget_dir, info, config, "sft"), (text_dir, text_info, yaml_body(pretraining), "pt")]
    )
    assert {n: domains.count(n) for n in WEIGHTS} == expected
    texts = {json.loads(line)["text"] for p in paths.values() for line in p.read_text().splitlines()}
    assert set(text_domains) == set(WEIGHTS) and all(p[0]["content"] in texts for p in prompts)


def test_llamafactory_registers_a_save_to_disk_dataset_by_its_arrow_file(world, tmp_path):
    """LLaMA-Factory reads a ``file_name`` directory as all its files, of one type by suffix: a
    ``save_to_disk`` directory registered as it was stopped its loader ("File types should be
    identical.": the arrow shard beside state.json and dataset_info.json). Its one shard is
    registered now, and its loader gives the budget's counts; several shards cannot be one
    ``file_name``, and the header says what to do instead of registering a path it cannot load."""
    pytest.importorskip("llamafactory")
    import datasets

    rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
    saved, sharded = tmp_path / "saved", tmp_path / "sharded"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    datasets.Dataset.from_list(rows).save_to_disk(str(sharded), num_shards=2)
    out = tmp_path / "budget"
    out.mkdir()
    text = export(
        {**world, "paths": {**world["paths"], "a": saved}}, "llamafactory", out, "--budget-samples", "6000"
    )
    info = header_entries(text)
    assert info["a"]["file_name"] == str(saved / "data-00000-of-00001.arrow")
    ((domains, _, _),) = _llamafactory_load([(out, info, yaml_body(text), "sft")])
    expected = make_plan(WEIGHTS, "tokens", measured_stats(-1), budget_samples=6000).counts
    assert {n: domains.count(n) for n in WEIGHTS} == expected

    text = export({**world, "paths": {**world["paths"], "a": sharded}}, "llamafactory", tmp_path)
    assert "a" not in header_entries(text)
    (note,) = [line for line in text.splitlines() if line.startswith("#   a: ")]
    assert "save_to_disk directory of 2 arrow files" in note and "a directory of their own" in note


def test_llamafactory_refuses_a_name_with_a_comma(world, tmp_path, capsys):
    run = write_run(tmp_path / "run", {"a,x": 0.4, "b": 0.6})
    out = tmp_path / "llamafactory.yaml"
    argv = [str(run), "--to", "llamafactory", "--out", str(out), "--datasets"]
    argv += [f"a,x={world['paths']['a']}", f"b={world['paths']['b']}", "--tokenizer", world["tokenizer"]]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llamafactory" in err[0] and "'a,x'" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------- NeMo


def test_nemo_forms_are_in_their_units(world, tmp_path):
    """Pretraining (``nemo``) in token shares as fitted; fine-tuning (``nemo-sft``) in sample shares,
    the lengths measured even without a budget."""
    data = yaml_body(export(world, "nemo", tmp_path, "--budget-tokens", "50000"))["model"]["data"]
    assert data["data_prefix"][0::2] == list(WEIGHTS.values())
    text = export(world, "nemo-sft", tmp_path)
    train_ds = yaml_body(text)["model"]["data"]["train_ds"]
    assert train_ds["file_names"] == [str(world["paths"][n]) for n in WEIGHTS]
    probs = train_ds["concat_sampling_probabilities"]
    assert probs == pytest.approx(list(expected_sample_shares().values()), abs=1e-15)
    assert "# sample shares use the measured mean tokens per sample: a 7, b 26, c 11" in text


def test_nemo_sft_header_names_the_datasets_that_call_tools(world, tmp_path):
    """NeMo 1's chat records are a speaker and text per turn: a dataset of tool calls gets one
    header line, naming it and saying what to write (nothing said it before)."""
    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    lines = [line for line in export(tools, "nemo-sft", tmp_path).splitlines() if "call tools" in line]
    assert lines == [
        f"# {name}: {len(tools['paths'][name].read_text().splitlines())} records call tools, and "
        "GPTSFTChatDataset's turns are a speaker's name and text (from, value; no tool_calls): write each "
        "call and each tool's answer into the text of a turn, as the model is to read them, or leave those "
        "records out"
    ]


@pytest.mark.parametrize("fmt", ["llamafactory", "nemo-sft"])
def test_tool_calls_are_found_in_the_pass_that_counts_the_tokens(world, tmp_path, monkeypatch, fmt):
    """Which datasets call tools is noted while their tokens are counted: each file is read once."""
    from mergeopt.export import token_stats

    tools = tool_world(world, tmp_path)
    read, real = [], token_stats.jsonl_records

    def counted(path):
        read.append(path.resolve())
        return real(path)

    monkeypatch.setattr(token_stats, "jsonl_records", counted)
    said = {"llamafactory": '"formatting": "openai"', "nemo-sft": "call tools"}[fmt]
    assert said in export(tools, fmt, tmp_path)
    assert sorted(read) == sorted(p.resolve() for p in tools["paths"].values())


def test_nemo1_sft_blend_draws_the_sample_shares(world, tmp_path):
    """NeMo 1's checks on ``train_ds`` (megatron_gpt_sft_model.py: a ListConfig as long as
    ``file_names``), then its blending: weights normalized, samples assigned by
    ``build_blending_indices``; each domain's share of the samples is its sample share (the index
    is deterministic: within one sample)."""
    helpers = pytest.importorskip("megatron.core.datasets.helpers")
    omegaconf = pytest.importorskip("omegaconf")
    import numpy as np

    text = export(world, "nemo-sft", tmp_path, "--budget-tokens", "50000")
    train_ds = omegaconf.OmegaConf.create(yaml_body(text))["model"]["data"]["train_ds"]
    assert isinstance(train_ds.file_names, omegaconf.ListConfig)
    assert isinstance(train_ds.concat_sampling_probabilities, omegaconf.ListConfig)
    assert len(train_ds.concat_sampling_probabilities) == len(train_ds.file_names)
    weights = np.array(list(train_ds.concat_sampling_probabilities), dtype=np.float64)
    weights /= weights.sum()  # as BlendableDataset does
    size = 5000
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, sample_index, weights, len(weights), size, False)
    counts = np.bincount(dataset_index, minlength=len(weights))
    for name, count in zip(WEIGHTS, counts):
        assert abs(count - expected_sample_shares()[name] * size) <= 1, (name, count)


def test_nemo_pretraining_blend_draws_the_token_shares(world, tmp_path):
    """``data_prefix`` read as NeMo 2's ``PreTrainingDataModule(paths=...)`` reads it: megatron-core's
    ``get_blend_from_list`` and ``BlendedMegatronDatasetBuilder`` over tiny indexed datasets; the
    share of fixed-length sequences from each prefix is the token share (within one sequence)."""
    pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    from tests.test_export import MEGATRON_BLEND

    prefixes = [str(tmp_path / f"{n}_text_document") for n in WEIGHTS]
    for prefix in prefixes:  # the export checks that each prefix names an indexed dataset
        for suffix in (".bin", ".idx"):
            Path(f"{prefix}{suffix}").write_bytes(b"")
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "nemo.yaml"
    args = ["--datasets", *(f"{n}={p}.bin" for n, p in zip(WEIGHTS, prefixes))]
    assert run_cli(main, [str(run), "--to", "nemo", "--out", str(out), *args]) == 0
    flat = yaml_body(out.read_text())["model"]["data"]["data_prefix"]
    assert flat[1::2] == prefixes
    samples = 4000
    child = subprocess.run(
        [sys.executable, "-c", MEGATRON_BLEND, json.dumps([flat, prefixes, str(tmp_path), samples])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    counts = json.loads(child.stdout.strip().splitlines()[-1])
    plan = make_plan(WEIGHTS, "tokens", None)
    for name, count in zip(WEIGHTS, counts):
        assert abs(count - plan.token_shares[name] * samples) <= 1, (name, count)


LLAMAFACTORY_SHAREGPT = """
import importlib.machinery, json, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
from llamafactory.data.converter import get_dataset_converter
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams.data_args import DataArguments

dataset_dir, names, first = json.loads(sys.argv[1])
args = DataArguments(dataset_dir=dataset_dir, dataset=names)
out = []
for name, attr in zip(names, get_dataset_list(names, dataset_dir)):
    converted = get_dataset_converter(attr.formatting, attr, args)(first[name])
    out.append([name, attr.formatting, converted["_prompt"], converted["_response"]])
print(json.dumps(out))
"""


def test_llamafactory_header_registers_conversations_as_sharegpt(world, tmp_path):
    """For ``messages`` datasets the header's dataset_info.json entries are sharegpt ones, and
    LLaMA-Factory's own parser and converter read each conversation as the user's turn and the
    assistant's answer."""
    pytest.importorskip("llamafactory")

    chat = chat_world(world, tmp_path, "messages")
    text = export(chat, "llamafactory", tmp_path)
    info = {}
    for line in text.splitlines():
        if line.startswith("#   {"):
            info.update(json.loads(line[4:]))
    assert set(info) == set(WEIGHTS) and {e["formatting"] for e in info.values()} == {"sharegpt"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    first = {n: json.loads(p.read_text().splitlines()[0]) for n, p in chat["paths"].items()}
    child = _run_llamafactory(LLAMAFACTORY_SHAREGPT, tmp_path, first)
    assert child.returncode == 0, child.stderr[-2000:]
    for name, formatting, prompt, response in json.loads(child.stdout.strip().splitlines()[-1]):
        user, answer = first[name]["messages"]
        assert formatting == "sharegpt"
        assert prompt == [{"role": "user", "content": user["content"]}]
        assert response == [{"role": "assistant", "content": answer["content"]}]


def test_llamafactory_reads_tool_calls_as_the_records_give_them(world, tmp_path):
    """A dataset of tool-calling conversations (TRL's layout: ``tool_calls`` on an assistant turn
    without text, ``tool`` messages, ``tools``) is registered with the openai formatting and its
    tags: LLaMA-Factory's own converter reads the call as a function turn, the tool's answer as an
    observation and the tools as the record's. As sharegpt (before) it skipped every such record
    ("Invalid role tag"); the other datasets stay sharegpt."""
    pytest.importorskip("llamafactory")

    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    info = header_entries(export(tools, "llamafactory", tmp_path))
    assert {n for n, e in info.items() if e["formatting"] == "openai"} == {name}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    first = {n: json.loads(p.read_text().splitlines()[0]) for n, p in tools["paths"].items()}
    script = LLAMAFACTORY_SHAREGPT.replace(
        'converted["_response"]]', 'converted["_response"], converted["_tools"]]'
    )
    read = _llamafactory_first_records(script, tmp_path, first)
    user, call, answer, final = first[name]["messages"]
    prompt, response, given = read[name]
    assert prompt == [
        {"role": "user", "content": user["content"]},
        {"role": "function", "content": json.dumps([call["tool_calls"][0]["function"]])},
        {"role": "observation", "content": answer["content"]},
    ]
    assert response == [{"role": "assistant", "content": final["content"]}]
    assert json.loads(given) == first[name]["tools"]
    for other in set(WEIGHTS) - {name}:
        assert read[other][1] == [{"role": "assistant", "content": first[other]["messages"][1]["content"]}]


def _run_llamafactory(script: str, root: Path, first: dict) -> subprocess.CompletedProcess:
    """``script`` run in a child process on ``root``'s dataset_info.json and each dataset's first record."""
    return run_llamafactory(script, json.dumps([str(root), list(WEIGHTS), first]))


def _llamafactory_first_records(script: str, root: Path, first: dict) -> dict:
    """{dataset: what LLaMA-Factory's parser and converter read of its first record} (``script``
    run in a child process, ``root`` holding dataset_info.json)."""
    child = _run_llamafactory(script, root, first)
    assert child.returncode == 0, child.stderr[-2000:]
    return {row[0]: row[2:] for row in json.loads(child.stdout.strip().splitlines()[-1])}


def test_llamafactory_reads_tool_answers_under_the_role_the_records_give_them(world, tmp_path):
    """Tools' answers as ``ipython`` messages (Llama 3.1's role) were registered with the
    observation tag ``tool``, and LLaMA-Factory's converter stopped on the role it has no tag for
    (KeyError: 'ipython'); the entry's observation tag is the records' role now. Two roles for the
    answers cannot be one entry: a sentence says what to change."""
    pytest.importorskip("llamafactory")

    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    path = tools["paths"][name]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["messages"][2]["role"] = "ipython"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = header_entries(export(tools, "llamafactory", tmp_path))
    assert info[name]["formatting"] == "openai" and info[name]["tags"]["observation_tag"] == "ipython"
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    first = {n: json.loads(p.read_text().splitlines()[0]) for n, p in tools["paths"].items()}
    read = _llamafactory_first_records(LLAMAFACTORY_SHAREGPT, tmp_path, first)
    assert read[name][0][2] == {"role": "observation", "content": "sunny"}

    rows[0]["messages"][2]["role"] = "tool"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = [
        line
        for line in export(tools, "llamafactory", tmp_path).splitlines()
        if line.startswith(f"#   {name}:")
    ]
    assert len(said) == 1 and "ipython and tool messages" in said[0], said


def test_llamafactory_header_says_what_its_openai_formatting_changes_in_tool_calls(world, tmp_path):
    """A turn with text beside its tool calls loses the text, and a record without tools gets a
    system prompt of LLaMA-Factory's: one header line each, naming the dataset and the fix."""
    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    path = tools["paths"][name]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["messages"][1]["content"] = "Let me look."
    del rows[1]["tools"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = [
        line
        for line in export(tools, "llamafactory", tmp_path).splitlines()
        if line.startswith(f"# {name}: ")
    ]
    assert len(notes) == 2
    assert "1 records have a turn with text and tool calls" in notes[0]
    assert "1 records give no tools" in notes[1] and '"tools": []' in notes[1]


def test_llamafactory_header_says_a_tool_call_without_content_stops_its_converter(world, tmp_path):
    """A turn that only calls tools may leave ``content`` out (mergeopt reads it, as TRL and axolotl
    do), but LLaMA-Factory's openai converter reads ``message["content"]`` of every message and
    stopped on it (KeyError: 'content'; ``datasets`` keeps a JSON message's keys as written), and
    the header said nothing. Now a line names the dataset, the records and the fix, which LLaMA-
    Factory's converter reads."""
    pytest.importorskip("llamafactory")

    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    path = tools["paths"][name]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[:3]:
        del row["messages"][1]["content"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = export(tools, "llamafactory", tmp_path)
    notes = [line for line in text.splitlines() if line.startswith(f"# {name}: ")]
    assert notes == [
        f"# {name}: 3 records have a message without 'content' (a turn that only calls tools), and "
        "LLaMA-Factory's openai converter reads every message's content and stops on it (KeyError: "
        "'content'): give such turns \"content\": null"
    ]
    info = header_entries(text)
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    first = {n: json.loads(p.read_text().splitlines()[0]) for n, p in tools["paths"].items()}
    child = _run_llamafactory(LLAMAFACTORY_SHAREGPT, tmp_path, first)
    assert child.returncode != 0 and "KeyError: 'content'" in child.stderr, child.stderr[-2000:]
    first[name]["messages"][1]["content"] = None  # the fix the line gives
    read = _llamafactory_first_records(LLAMAFACTORY_SHAREGPT, tmp_path, first)
    call = first[name]["messages"][1]["tool_calls"][0]["function"]
    assert read[name][0][1] == {"role": "function", "content": json.dumps([call])}


def test_llamafactory_header_says_its_rebuilt_template_writes_tool_calls_its_own_way(world, tmp_path):
    """With ``template`` left out, LLaMA-Factory rebuilds a template from the tokenizer's and writes
    tool calls in its own default format ('Action:', 'Action Input:'), not the chat template's
    (over Qwen 2.5's template, a third fewer tokens than counted): the header said only that the
    counts came from another template. Now a line names the datasets that call tools and what to
    set; conversations without tools get none. LLaMA-Factory's rebuilt template is checked to
    use the default tool format."""
    pytest.importorskip("llamafactory")

    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    said = [line for line in export(tools, "llamafactory", tmp_path).splitlines() if "call tools:" in line]
    assert len(said) == 1 and said[0].startswith(f"# {name} call tools: with template: left out"), said
    assert "'Action:', 'Action Input:'" in said[0] and "set template:" in said[0]
    (tmp_path / "plain").mkdir()
    plain = export(chat_world(world, tmp_path / "plain", "messages"), "llamafactory", tmp_path / "plain")
    assert "call tools:" not in plain
    script = (
        "import importlib.machinery, inspect, sys, types\n"
        "audio = types.ModuleType('torchaudio')\n"
        "audio.__spec__ = importlib.machinery.ModuleSpec('torchaudio', None)\n"
        "sys.modules['torchaudio'] = audio\n"
        "from llamafactory.data.formatter import FunctionFormatter\n"
        "from llamafactory.data.template import parse_template\n"
        "source = inspect.getsource(parse_template)\n"
        "assert 'FunctionFormatter(slots=[assistant_slot], tool_format=\"default\")' in source\n"
        'call = \'[{"name": "weather", "arguments": {"city": "Oslo"}}]\'\n'
        "print(FunctionFormatter(slots=['{{content}}'], tool_format='default').apply(content=call)[0])\n"
    )
    child = run_llamafactory(script)
    assert child.returncode == 0, child.stderr[-2000:]
    assert 'Action: weather\nAction Input: {"city": "Oslo"}' in child.stdout


def test_llamafactory_header_says_how_to_give_prompt_completion_conversations(world, tmp_path):

    text = export(chat_world(world, tmp_path, "prompt"), "llamafactory", tmp_path)
    notes = [line for line in text.splitlines() if "prompt/completion lists of messages" in line]
    assert len(notes) == len(WEIGHTS) and all('{"messages": prompt + completion}' in n for n in notes)
    assert "formatting" not in text and '"columns"' not in text


LLAMAFACTORY_ALIGN = """
import importlib.machinery, json, os, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
import datasets
from transformers import Seq2SeqTrainingArguments
from llamafactory.data.converter import align_dataset
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams.data_args import DataArguments

dataset_dir, names = json.loads(sys.argv[1])
args = DataArguments(dataset_dir=dataset_dir, dataset=names)
training = Seq2SeqTrainingArguments(output_dir=os.path.join(dataset_dir, "out"))
out = []
for name, attr in zip(names, get_dataset_list(names, dataset_dir)):
    files = os.path.join(dataset_dir, attr.dataset_name)  # how its loader joins file_name
    first = align_dataset(datasets.load_dataset("json", data_files=files, split="train"), attr, args, training)[0]
    out.append([name, first["_prompt"], first["_response"]])
print(json.dumps(out))
"""


def _one_layout_each(world, tmp_path) -> dict:
    """The world with a as text records, b as prompt/completion (as built), c as messages."""

    chat = chat_world(world, tmp_path, "messages")
    text = tmp_path / "a-text.jsonl"
    rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    return {**chat, "paths": {"a": text, "b": world["paths"]["b"], "c": chat["paths"]["c"]}}


def test_llamafactory_header_registers_each_layout_with_its_own_columns(world, tmp_path):
    """Text records beside other layouts are the responses to an empty prompt (one run has one
    stage, and only sft keeps the others' completions), prompt/completion is prompt/response,
    messages sharegpt; LLaMA-Factory's own parser and converter, given the header's entries as
    dataset_info.json, read each first record whole, as records its sft processor keeps."""
    pytest.importorskip("llamafactory")
    mixed = _one_layout_each(world, tmp_path)
    text = export(mixed, "llamafactory", tmp_path)
    info = {}
    for line in text.splitlines():
        if line.startswith("#   {"):
            info.update(json.loads(line[4:]))
    assert info["a"] == {"file_name": str(mixed["paths"]["a"].resolve()), "columns": {"response": "text"}}
    assert info["b"]["columns"] == {"prompt": "prompt", "response": "completion"}
    assert info["c"]["formatting"] == "sharegpt"
    assert "# train with stage: sft; text records are the responses to an empty prompt" in text
    assert "stage: pt\n" not in text
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    child = run_llamafactory(LLAMAFACTORY_ALIGN, json.dumps([str(tmp_path), list(WEIGHTS)]))
    assert child.returncode == 0, child.stderr[-2000:]
    first = {n: json.loads(p.read_text().splitlines()[0]) for n, p in mixed["paths"].items()}
    user, answer = first["c"]["messages"]
    read = json.loads(child.stdout.strip().splitlines()[-1])
    # processor/supervised.py keeps a record whose prompt has odd length and which has one response
    assert all(len(prompt) % 2 == 1 and len(response) == 1 for _, prompt, response in read)
    assert read == [
        ["a", [{"role": "user", "content": ""}], [{"role": "assistant", "content": first["a"]["text"]}]],
        [
            "b",
            [{"role": "user", "content": first["b"]["prompt"]}],
            [{"role": "assistant", "content": first["b"]["completion"]}],
        ],
        [
            "c",
            [{"role": "user", "content": user["content"]}],
            [{"role": "assistant", "content": answer["content"]}],
        ],
    ]


def test_llamafactory_header_without_datasets_claims_no_columns(world, tmp_path):
    """Without --datasets the records' layout is unknown: no name gets an entry of guessed columns,
    and the header gives the entry for each layout instead."""
    from mergeopt.export.formats.llamafactory import ENTRIES

    lines = export(world, "llamafactory", tmp_path, datasets=False).splitlines()
    start = lines.index("# Register each name in dataset_dir/dataset_info.json:")
    assert lines[start + 1] == (
        "#   a, b, c: no --datasets, so the records' layout is unknown; the entry for each layout "
        "(file_name: the file's path):"
    )
    shown = [json.loads(line.split(": ", 1)[1]) for line in lines[start + 2 : start + 5]]
    assert shown == [{"a": {"file_name": "PATH", **entry}} for entry in ENTRIES.values()]
    label, entry = lines[start + 5].split(": {", 1)
    assert label == "#     text records beside prompt/completion or messages (one run, stage: sft)"
    assert json.loads("{" + entry) == {"a": {"file_name": "PATH", "columns": {"response": "text"}}}
    budget = export(world, "llamafactory", tmp_path, "--budget-samples", "100", datasets=False)
    counts = make_plan(WEIGHTS, "tokens", None, budget_samples=100).counts
    assert (
        '#   and in each entry "num_samples": its count under the budget: '
        + ", ".join(f"{n} {c}" for n, c in counts.items())
        in budget.splitlines()
    )
    assert not any(line.startswith("#   {") for line in lines)


OWN_TEMPLATE = {
    "torchtune": "torchtune",
    "llamafactory": "LLaMA-Factory",
    "open-instruct": "open-instruct",
    "nemo-sft": "NeMo's fine-tuning",
}


def _own_template_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "renders conversations with its own template" in line]


def test_a_framework_that_renders_with_its_own_template_says_the_counts_used_another(world, tmp_path):
    """Conversations are counted with the run's data.chat_template (or the tokenizer's), and
    torchtune (its model tokenizer's format), LLaMA-Factory (a registered template, or one rebuilt
    from the tokenizer's), open-instruct (a registered one, or tokenizer_name_or_path's) and NeMo
    (its chat_prompt_tokens) take no Jinja template: the files said nothing, so the sample shares
    read as if the framework rendered what was counted. Now one header line says so, naming the
    template's source; open-instruct, which renders with the tokenizer's own template, only where the
    recipe names another; TRL and axolotl, which take it, and text records, none."""
    chat, template, run = chat_run_with_template(world, tmp_path)
    for fmt, framework in OWN_TEMPLATE.items():
        out = tmp_path / f"{fmt}.yaml"
        assert (
            run_cli(main, [str(run), "--to", fmt, "--tokenizer", chat["tokenizer"], "--out", str(out)]) == 0
        )
        text = out.read_text()
        assert "mean tokens per sample: a 13, b 51, c 21" in text  # BOS + each character twice
        (line,) = _own_template_lines(text)
        assert line.startswith(f"# {framework} renders conversations with its own template (")
        assert line.endswith(
            "so the token counts of a, b, c (and the sample shares derived from them) were measured "
            f"with another: data.chat_template ({template})"
        )
    for fmt in OWN_TEMPLATE:  # the tokenizer's own template: open-instruct takes it
        lines = _own_template_lines(export(chat, fmt, tmp_path / "base"))
        if fmt == "open-instruct":
            assert lines == []
        else:
            (line,) = lines
            assert line.endswith(f"measured with another: the chat template of {chat['tokenizer']}")
    for fmt in ("trl", "axolotl", "hf-datasets"):
        assert _own_template_lines(export(chat, fmt, tmp_path / "take")) == []
    for fmt in OWN_TEMPLATE:  # prompt/completion strings: no template at all
        assert _own_template_lines(export(world, fmt, tmp_path / "text")) == []
