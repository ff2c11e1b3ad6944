"""export: every format read back by its real library where it installs here, key by key otherwise.

The exported ``datasets`` snippet is executed on synthetic JSONL datasets and its empirical domain
proportions must fall within 4 standard errors of the exported probabilities (exact counts with a
budget); the YAML variant feeds ``interleave_datasets`` the same way; TRL's entries are loaded
with ``datasets.load_dataset`` and concatenated as TRL's ``get_dataset`` does; mergekit's own
``MergeConfiguration`` validates the merge YAML, every parameter is one the method declares, and
mergekit's ``run_merge`` of the linear export equals θ0 + λ Σ w_i τ_i. Token counts equal
:func:`mergeopt.objectives.data.tokenize`'s, and the share conversion, rounding and budgets are checked with
exact numbers (the tokenizer is character-level: a record's length is known by hand).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mergeopt.errors import UserError, run_cli
from mergeopt.export.command import main
from mergeopt.export.formats import FORMATS
from mergeopt.export.formats.open_instruct import fraction_string, fraction_strings
from mergeopt.export.shares import apportion, make_plan
from mergeopt.export.token_stats import DomainStats, measure
from mergeopt.objectives.data import tokenize
from mergeopt.worlds import toy
from tests.conftest import recipe_tree
from tests.export_world import (
    DOUBLED,
    SIZES,
    WEATHER,
    WEIGHTS,
    build_world,
    chat_run_with_template,
    chat_world,
    expected_sample_shares,
    export,
    mean_tokens,
    measured_stats,
    tool_world,
    write_run,
    yaml_body,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


# ---------------------------------------------------------------- numbers


def test_token_counts_equal_data_tokenize(world):
    tokenizer = toy.build_tokenizer()
    for name, path in world["paths"].items():
        stats = measure(path, tokenizer)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        by_data_py = sum(tokenize(r, tokenizer, 10**9).input_ids.numel() for r in records)
        assert stats == DomainStats(samples=SIZES[name], tokens=by_data_py)
        assert stats.mean_tokens == mean_tokens(name)


def test_text_and_choice_records_count_like_data_py(tmp_path):
    tokenizer = toy.build_tokenizer()
    records = [
        {"text": "hello world"},
        {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"prompt": "ab", "completion": "cd"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = measure(path, tokenizer)
    assert stats == DomainStats(samples=3, tokens=(1 + 11) + (1 + 4 + 1) + (1 + 2 + 2))
    assert stats.longest == 1 + 11  # the longest record's tokens: the text's


def test_share_conversion_is_exact_both_ways():
    stats = measured_stats()
    plan = make_plan(WEIGHTS, "tokens", stats)
    assert plan.token_shares == WEIGHTS  # the fitted weights, untouched
    for n, p in expected_sample_shares().items():
        assert plan.sample_shares[n] == pytest.approx(p, abs=1e-15)
    back = make_plan(plan.sample_shares, "samples", stats)
    for n in WEIGHTS:
        assert back.token_shares[n] == pytest.approx(WEIGHTS[n], abs=1e-15)
    equal = make_plan(WEIGHTS, "tokens", None)  # no data: equal lengths assumed
    assert equal.sample_shares == equal.token_shares == WEIGHTS


def test_budgets_counts_and_repetition():
    stats = measured_stats()
    plan = make_plan(WEIGHTS, "tokens", stats, budget_tokens=100_000)
    for n in WEIGHTS:
        assert plan.tokens[n] == pytest.approx(WEIGHTS[n] * 100_000, rel=1e-15)
        assert plan.samples[n] == pytest.approx(WEIGHTS[n] * 100_000 / mean_tokens(n), rel=1e-15)
        assert plan.repetition[n] == pytest.approx(plan.samples[n] / SIZES[n], rel=1e-15)
        assert abs(plan.counts[n] - plan.samples[n]) < 1
    assert sum(plan.counts.values()) == round(sum(plan.samples.values()))
    by_samples = make_plan(WEIGHTS, "tokens", stats, budget_samples=7001)
    assert sum(by_samples.counts.values()) == 7001
    for n in WEIGHTS:
        assert by_samples.samples[n] == pytest.approx(by_samples.sample_shares[n] * 7001, rel=1e-15)


def test_apportion_largest_remainders():
    assert apportion({"x": 1.5, "y": 1.5, "z": 1.0}, 4) == {"x": 2, "y": 1, "z": 1}  # tie: first
    assert apportion({"x": 0.2, "y": 0.7, "z": 2.1}, 3) == {"x": 0, "y": 1, "z": 2}


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_open_instruct_fraction_reads_back_as_the_count(pair):
    count, size = pair
    text = fraction_string(count, size)
    assert "." in text and float(text) <= 1.0
    assert int(float(text) * size) == count  # open-instruct: int(frac * len(dataset))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.integers(1, 10**9).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
        min_size=1,
        max_size=5,
    )
)
def test_open_instruct_fractions_share_one_number_of_decimals(pairs):
    counts = {str(i): count for i, (count, _) in enumerate(pairs)}
    sizes = {str(i): size for i, (_, size) in enumerate(pairs)}
    texts = fraction_strings(counts, sizes)
    assert len({len(t.split(".")[1]) for t in texts.values()}) == 1
    assert all(int(float(texts[n]) * sizes[n]) == counts[n] and float(texts[n]) <= 1.0 for n in counts)


def test_open_instruct_fractions_of_a_walkthrough_read_evenly():
    """190, 233 and 600 of 600 samples: 233/600 has no short decimal that reads back alone at
    its own length (0.388... rounds down), which once gave '0.38916666666666666' beside '0.317'."""
    sizes = dict.fromkeys(("code", "prose", "math"), 600)
    texts = fraction_strings({"code": 190, "prose": 233, "math": 600}, sizes)
    assert texts == {"code": "0.317", "prose": "0.389", "math": "1.000"}


def test_no_repeat_counts_never_exceed_a_dataset():
    stats = measured_stats()
    plan = make_plan(WEIGHTS, "tokens", stats)
    counts = plan.no_repeat_counts()
    assert all(counts[n] <= SIZES[n] for n in WEIGHTS)
    assert any(counts[n] == SIZES[n] for n in WEIGHTS)  # the binding dataset is used whole
    total = sum(counts.values())
    for n in WEIGHTS:
        assert counts[n] / total == pytest.approx(plan.sample_shares[n], abs=2 / total)


@pytest.mark.parametrize("budget", ["--budget-samples", "--budget-tokens"])
def test_sources_left_without_a_sample_are_named_together_with_the_budget_that_gives_each_one(
    world, tmp_path, capsys, budget
):
    """Two sources too small for one whole sample: the line names both and the budget, in the unit
    the user budgets in, from which on each gets one (it named only the first, and always in
    samples); that budget then exports."""
    mixture = write_run(tmp_path / "run", {"a": 0.998, "b": 0.001, "c": 0.001})
    datasets = [f"{n}={p}" for n, p in world["paths"].items()]
    args = [str(mixture), "--to", "trl", "--tokenizer", world["tokenizer"], "--datasets", *datasets]
    assert run_cli(main, [*args, budget, "50", "--out", str(tmp_path / "small")]) == 2
    said = capsys.readouterr().err.strip()
    # TRL trains each prompt/completion sample with an EOS more than counted
    plan = make_plan({"a": 0.998, "b": 0.001, "c": 0.001}, "tokens", measured_stats(1))
    if budget == "--budget-samples":
        needed = max(math.ceil(1 / plan.sample_shares[n]) for n in "bc")
    else:
        needed = max(math.ceil((mean_tokens(n) + 1) / plan.token_shares[n]) for n in "bc")
    assert said.startswith(
        "mergeopt: error: --to trl takes whole samples, and sources 'b' (sample share "
        f"{plan.sample_shares['b']:.3g}), 'c' (sample share {plan.sample_shares['c']:.3g}) get none of the "
    ), said
    assert said.endswith(f" samples; a {budget} of {needed:,} or more gives each at least one"), said
    assert (
        run_cli(main, [*args, budget, str(needed), "--max-epochs", "1000", "--out", str(tmp_path / "ok")])
        == 0
    )


@pytest.mark.parametrize("budget", ["--budget-samples", "--budget-tokens"])
def test_a_source_no_budget_within_max_epochs_gives_a_sample_is_named_to_drop(
    world, tmp_path, capsys, budget
):
    """A weight so small that the budget giving it one sample repeats another dataset thousands of
    times: the refusal suggested that budget, which export then refused for --max-epochs. It says
    now that no budget gives each source a sample within --max-epochs, what that budget repeats,
    the --max-epochs it needs and the source no budget within it reaches (c; b's own sample needs
    far less); that budget exports under that --max-epochs."""
    weights = {"a": 0.9989999, "b": 0.001, "c": 1e-7}
    mixture = write_run(tmp_path / "run", weights)
    datasets = [f"{n}={p}" for n, p in world["paths"].items()]
    args = [str(mixture), "--to", "trl", "--tokenizer", world["tokenizer"], "--datasets", *datasets]
    assert run_cli(main, [*args, budget, "50", "--out", str(tmp_path / "small")]) == 2
    said = capsys.readouterr().err.strip()
    stats = measured_stats(1)  # TRL adds an EOS to each prompt/completion sample
    plan = make_plan(weights, "tokens", stats)
    unit = budget.removeprefix("--budget-")
    per = {
        n: 1 / plan.sample_shares[n] if unit == "samples" else (mean_tokens(n) + 1) / plan.token_shares[n]
        for n in "bc"
    }
    needed = math.ceil(max(per.values()))
    shares = plan.sample_shares if unit == "samples" else plan.token_shares
    repeats = shares["a"] * needed / getattr(stats["a"], unit)  # a: the dataset it repeats most
    assert repeats > 1000 > 4 > shares["a"] * math.ceil(per["b"]) / getattr(stats["a"], unit)
    assert said.startswith("mergeopt: error: --to trl takes whole samples, and sources 'b' "), said
    assert said.split(" samples; ", 1)[1] == (
        "no budget gives each one within --max-epochs 4: the smallest that does, "
        f"a {budget} of {needed:,}, repeats dataset 'a' (1,500 samples) {repeats:,.0f} times; "
        f"raise --max-epochs to {math.ceil(repeats):,}, or drop 'c' from the mixture"
    ), said
    options = [budget, str(needed), "--max-epochs", str(math.ceil(repeats))]
    assert run_cli(main, [*args, *options, "--out", str(tmp_path / "ok")]) == 0


# ---------------------------------------------------------------- Hugging Face datasets (run for real)


def _proportions(dataset) -> tuple[dict[str, float], int]:
    names = dataset["domain"]
    return {n: names.count(n) / len(names) for n in WEIGHTS}, len(names)


def test_hf_snippet_interleaves_in_the_exported_proportions(world, tmp_path):
    code = export(world, "hf-datasets", tmp_path)
    scope: dict = {}
    exec(compile(code, "hf_datasets.py", "exec"), scope)
    expected = expected_sample_shares()
    assert scope["PROBABILITIES"] == pytest.approx(expected, abs=1e-15)
    observed, n = _proportions(scope["mixture"])
    for name, p in expected.items():  # 4 standard errors of a proportion over n draws
        assert abs(observed[name] - p) <= 4 * math.sqrt(p * (1 - p) / n), (name, observed, expected)
    assert len(set(zip(scope["mixture"]["domain"], scope["mixture"]["index"]))) == n  # nothing repeated


def test_hf_snippet_with_a_budget_has_exact_counts(world, tmp_path):
    code = export(world, "hf-datasets", tmp_path, "--budget-samples", "6000")  # repeats b and c
    scope: dict = {}
    exec(compile(code, "hf_datasets.py", "exec"), scope)
    mixture = scope["mixture"]
    assert len(mixture) == 6000
    counts = {n: mixture["domain"].count(n) for n in WEIGHTS}
    assert counts == scope["COUNTS"]
    assert counts == apportion({n: p * 6000 for n, p in expected_sample_shares().items()}, 6000)


def test_hf_yaml_feeds_interleave_datasets(world, tmp_path):
    config = yaml_body(export(world, "hf-datasets-yaml", tmp_path))
    assert set(config) == {"sources", "probabilities", "seed", "stopping_strategy"}
    parts = [
        datasets.load_dataset(s["loader"], data_files=s["data_files"], split="train")
        for s in config["sources"]
    ]
    mixture = datasets.interleave_datasets(
        parts,
        probabilities=config["probabilities"],
        seed=config["seed"],
        stopping_strategy=config["stopping_strategy"],
    )
    expected = expected_sample_shares()
    assert [s["name"] for s in config["sources"]] == list(WEIGHTS)
    assert config["probabilities"] == pytest.approx(list(expected.values()), abs=1e-15)
    observed, n = _proportions(mixture)
    for name, p in expected.items():
        assert abs(observed[name] - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_hf_datasets_says_when_the_datasets_layouts_differ(world, tmp_path):
    """Text records beside prompt/completion ones: the snippet's mixture holds every column, None
    where a record has none (run here), which TRL's SFTTrainer stops on or misreads (``--to trl``
    refuses it). The snippet and the YAML were written without a word; now the header says it.
    One layout for all: no such line."""
    rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
    text = tmp_path / "a-text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    mixed = {**world, "paths": {**world["paths"], "a": text}}
    said = "# the datasets' records differ (a text, b prompt/completion, c prompt/completion): "
    for fmt in ("hf-datasets", "hf-datasets-yaml"):
        assert [line for line in export(world, fmt, tmp_path).splitlines() if "records differ" in line] == []
        (line,) = [line for line in export(mixed, fmt, tmp_path).splitlines() if "records differ" in line]
        assert line.startswith(said) and "TRL's SFTTrainer" in line
    snippet = export(mixed, "hf-datasets", tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "hf_datasets.py", "exec"), namespace)
    mixture = namespace["mixture"]
    assert {"text", "prompt", "completion"} <= set(mixture.column_names)
    assert any(r["text"] is None for r in mixture) and any(r["prompt"] is None for r in mixture)


def test_trl_entries_load_and_concatenate_to_the_counts(world, tmp_path):
    for extra in ((), ("--budget-samples", "6000")):
        config = yaml_body(export(world, "trl", tmp_path, *extra))
        assert set(config) == {"datasets"}
        parts = []
        for entry in config["datasets"]:
            assert set(entry) <= {
                "path",
                "name",
                "data_dir",
                "data_files",
                "split",
                "columns",
            }  # DatasetConfig
            parts.append(
                datasets.load_dataset(entry["path"], data_files=entry["data_files"], split=entry["split"])
            )
        mixture = datasets.concatenate_datasets(parts)  # what TRL's get_dataset does
        counts = {n: mixture["domain"].count(n) for n in WEIGHTS}
        stats = measured_stats(1)  # TRL adds an EOS to each prompt/completion sample
        if extra:
            assert counts == make_plan(WEIGHTS, "tokens", stats, budget_samples=6000).counts
        else:
            assert counts == make_plan(WEIGHTS, "tokens", stats).no_repeat_counts()


def test_trl_own_parser_and_loader_read_the_export_as_the_counts(world, tmp_path):
    """The file goes through TRL itself: ``TrlParser`` reads it as a ``DatasetMixtureConfig`` (what
    ``trl sft --config FILE`` does) and ``get_dataset`` builds the mixture the trainer sees."""
    utils = pytest.importorskip("trl.scripts.utils")
    stats = measured_stats(1)  # TRL adds an EOS to each prompt/completion sample
    for extra, expected in (
        ((), make_plan(WEIGHTS, "tokens", stats).no_repeat_counts()),
        (("--budget-samples", "6000"), make_plan(WEIGHTS, "tokens", stats, budget_samples=6000).counts),
    ):
        path = tmp_path / f"trl-{len(extra)}.yaml"
        path.write_text(export(world, "trl", tmp_path, *extra))
        (mixture_config,) = utils.TrlParser((utils.DatasetMixtureConfig,)).parse_args_and_config(
            ["--config", str(path)]
        )
        train = utils.get_dataset(mixture_config)["train"]
        assert {n: train["domain"].count(n) for n in WEIGHTS} == expected


def test_trl_refuses_datasets_of_different_layouts(world, tmp_path, capsys):
    """TRL's ``get_dataset`` concatenates datasets of different columns (the missing ones None), but
    its SFTTrainer reads the whole as one layout and stops (``'NoneType' object has no attribute
    'endswith'``) on messages beside prompt/completion conversations: the export said nothing and
    wrote it. Now it is one line naming each dataset's layout; one layout throughout exports, as
    TRL's own loader reads it (the prompt/completion lists of messages kept as conversations)."""
    utils = pytest.importorskip("trl.scripts.utils")
    messages = chat_world(world, tmp_path / "m", "messages")
    lists = chat_world(world, tmp_path / "p", "prompt")
    mixed = {"a": messages["paths"]["a"], "b": lists["paths"]["b"], "c": world["paths"]["c"]}
    argv = [str(world["mixture"]), "--to", "trl", "--tokenizer", messages["tokenizer"], "--datasets"]
    argv += [f"{n}={p}" for n, p in mixed.items()]
    assert run_cli(main, [*argv, "--out", str(tmp_path / "mixed.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "mergeopt: error: --to trl: the datasets' records differ ('a' messages, 'b' prompt/completion "
        "lists of messages, 'c' prompt/completion), and TRL's SFTTrainer reads one layout"
    ), line
    assert not (tmp_path / "mixed.yaml").exists()
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"prompt": "q", "choices": ["x", "y"], "answer": 1}) + "\n")
    bad = [f"{n}={choice if n == 'a' else p}" for n, p in world["paths"].items()]
    assert run_cli(main, [*argv[: argv.index("--datasets") + 1], *bad]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mergeopt: error: --to trl: dataset 'a' ({choice}) holds multiple-choice"), line
    path = tmp_path / "lists.yaml"
    path.write_text(export(lists, "trl", tmp_path, "--budget-samples", "6000"))
    (mixture_config,) = utils.TrlParser((utils.DatasetMixtureConfig,)).parse_args_and_config(
        ["--config", str(path)]
    )
    train = utils.get_dataset(mixture_config)["train"]
    assert set(train.column_names) == {"prompt", "completion", "domain"}
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["completion"][0]["role"] == "assistant"
    stats = measured_stats()
    assert {n: train["domain"].count(n) for n in WEIGHTS} == (
        make_plan(WEIGHTS, "tokens", stats, budget_samples=6000).counts
    )


def test_formats_that_concatenate_loaded_datasets_refuse_tool_calls_beside_plain_conversations(
    world, tmp_path, capsys
):
    """A dataset of tool-calling conversations (a turn's ``tool_calls``, ``tool`` answers: its
    messages' fields vary, and ``datasets`` reads them as JSON objects) beside plain ones (structs
    of role and content): TRL's ``get_dataset`` and the hf-datasets snippet join the loaded datasets
    with ``concatenate_datasets`` / ``interleave_datasets``, which stop on them ("The features
    can't be aligned"). The export wrote both files without a word; now each is one line naming
    the datasets, and datasets of tool calls alone still export and load."""
    utils = pytest.importorskip("trl.scripts.utils")
    tools = tool_world(world, tmp_path)
    name = tools["tool_domain"]
    loaded = [
        datasets.load_dataset("json", data_files=str(p), split="train") for p in tools["paths"].values()
    ]
    with pytest.raises(ValueError, match="features can't be aligned"):  # what the files would meet
        datasets.concatenate_datasets(loaded)
    capsys.readouterr()  # the datasets library's progress bars
    for fmt in ("trl", "hf-datasets", "hf-datasets-yaml"):
        out = tmp_path / f"{fmt}.out"
        argv = [str(world["mixture"]), "--to", fmt, "--tokenizer", tools["tokenizer"], "--out", str(out)]
        argv += ["--datasets", *(f"{n}={p}" for n, p in tools["paths"].items())]
        assert run_cli(main, argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(
            f"mergeopt: error: --to {fmt}: the datasets' messages differ ('{name}' fields varying by "
            "message (content, role, tool_calls); "
        ), line
        assert "--to axolotl or --to llamafactory" in line and not out.exists()
    alone = {n: tools["paths"][name] for n in WEIGHTS}  # every dataset calls tools: one type
    path = tmp_path / "tools.yaml"
    argv = [str(world["mixture"]), "--to", "trl", "--tokenizer", tools["tokenizer"], "--out", str(path)]
    assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in alone.items())]) == 0
    (mixture_config,) = utils.TrlParser((utils.DatasetMixtureConfig,)).parse_args_and_config(
        ["--config", str(path)]
    )
    train = utils.get_dataset(mixture_config)["train"]
    assert train[0]["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"


def _retyped(path: Path, out: Path, change) -> Path:
    """``path``'s records, each passed through ``change``, written to ``out``."""
    rows = [change(json.loads(line)) for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_formats_that_concatenate_loaded_datasets_refuse_any_column_they_cannot_align(
    world, tmp_path, capsys
):
    """The messages were compared, but not the other columns ``datasets`` types by their contents:
    a prompt/completion conversation whose completion calls tools (its completion's messages vary,
    read as JSON objects) beside plain ones (structs of role and content), and tool-calling
    conversations with different tools (their ``tools`` structs differ), were exported --to trl and
    --to hf-datasets without a word, and TRL's get_dataset and interleave_datasets stopped on them
    ("The features can't be aligned"). Now each is one line naming the column and the datasets;
    datasets of one form still export, and TRL loads the tool calls."""
    utils = pytest.importorskip("trl.scripts.utils")
    (tmp_path / "pc").mkdir()
    chat = chat_world(world, tmp_path / "pc", "prompt_completion")

    def calling(record):
        call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "paris"}}}
        turns = [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
        ]
        return {**record, "completion": turns + record["completion"], "tools": [WEATHER]}

    completions = {**chat["paths"], "a": _retyped(chat["paths"]["a"], tmp_path / "a-calls.jsonl", calling)}
    search = json.loads(json.dumps(WEATHER).replace("weather", "search").replace("city", "query"))
    tools = tool_world(world, tmp_path)
    other = _retyped(tools["paths"]["a"], tmp_path / "a-search.jsonl", lambda r: {**r, "tools": [search]})
    cases = {  # the datasets, the column they differ in, the datasets named
        "completion": (completions, "'completion' differs between datasets 'a' and 'b' (at completion[]: "),
        "tools": (
            {"a": tools["paths"]["a"], "b": other, "c": tools["paths"]["a"]},
            "'tools' differs between datasets 'a' and 'b' (at tools[].function.parameters.properties: ",
        ),
    }
    for paths, said in cases.values():
        loaded = [datasets.load_dataset("json", data_files=str(p), split="train") for p in paths.values()]
        with pytest.raises(ValueError, match="features can't be aligned"):  # what the files would meet
            datasets.concatenate_datasets(loaded)
        capsys.readouterr()
        for fmt in ("trl", "hf-datasets", "hf-datasets-yaml"):
            out = tmp_path / f"{fmt}.out"
            argv = [str(world["mixture"]), "--to", fmt, "--tokenizer", chat["tokenizer"], "--out", str(out)]
            assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in paths.items())]) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"mergeopt: error: --to {fmt}: column {said}"), line
            assert "The features can't be aligned" in line and not out.exists()
    strings = {**chat["paths"], "a": world["paths"]["a"]}  # prompt strings beside lists of messages
    for fmt in ("hf-datasets", "hf-datasets-yaml"):  # (trl refuses the layouts first)
        argv = [
            str(world["mixture"]),
            "--to",
            fmt,
            "--tokenizer",
            chat["tokenizer"],
            "--out",
            str(tmp_path / "x"),
        ]
        assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in strings.items())]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(
            f"mergeopt: error: --to {fmt}: column 'prompt' differs between datasets 'a' and 'b'"
        )
    alone = {n: completions["a"] for n in WEIGHTS}  # every dataset calls tools alike: one type
    path = tmp_path / "calls.yaml"
    argv = [str(world["mixture"]), "--to", "trl", "--tokenizer", chat["tokenizer"], "--out", str(path)]
    assert run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in alone.items())]) == 0
    (mixture_config,) = utils.TrlParser((utils.DatasetMixtureConfig,)).parse_args_and_config(
        ["--config", str(path)]
    )
    train = utils.get_dataset(mixture_config)["train"]
    assert train[0]["completion"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "paris"}
    assert train[0]["completion"][1] == {"role": "tool", "content": "sunny"}


# ---------------------------------------------------------------- the other formats, key by key


def test_llamafactory_keys(world, tmp_path):
    config = yaml_body(export(world, "llamafactory", tmp_path))
    assert set(config) == {"dataset", "mix_strategy", "interleave_probs"}
    assert config["dataset"].split(",") == list(WEIGHTS)
    assert config["mix_strategy"] in ("interleave_under", "interleave_over")  # DataArguments' Literal
    assert config["mix_strategy"] == "interleave_under"
    probs = [float(p) for p in config["interleave_probs"].split(",")]  # DataArguments splits on ','
    # stage: sft without a chat_template: the empty template trains each record without its BOS
    assert probs == pytest.approx(list(expected_sample_shares(-1).values()), abs=1e-15)
    budgeted = yaml_body(export(world, "llamafactory", tmp_path, "--budget-samples", "6000"))
    assert budgeted == {"dataset": ",".join(WEIGHTS), "mix_strategy": "concat"}  # counts: num_samples


def test_llamafactory_without_datasets_notes_equal_lengths(world, tmp_path, capsys):
    config = yaml_body(export(world, "llamafactory", tmp_path, datasets=False))
    assert [float(p) for p in config["interleave_probs"].split(",")] == list(WEIGHTS.values())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "equal sample lengths assumed" in err[0]


def test_megatron_data_path_pairs(world, tmp_path):
    lines = [ln for ln in export(world, "megatron", tmp_path).splitlines() if not ln.startswith("#")]
    assert len(lines) == 1
    words = lines[0].split()
    assert words[0] == "--data-path"
    blend = words[1:]
    assert len(blend) == 2 * len(WEIGHTS)  # weight1 prefix1 weight2 prefix2 ...
    weights = [float(w) for w in blend[0::2]]
    assert weights == list(WEIGHTS.values())  # token shares, exactly as fitted
    assert blend[1::2] == [str(world["paths"][n]) for n in WEIGHTS]


def test_megatron_prefix_from_bin_file(world, tmp_path):
    prefix = tmp_path / "corpus_text_document"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "megatron.txt"
    args = ["--datasets", f"a={prefix}.bin", f"b={prefix}", f"c={prefix}.idx"]
    assert run_cli(main, [str(run), "--to", "megatron", "--out", str(out), *args]) == 0
    text = out.read_text()
    assert f"--data-path 0.2 {prefix} 0.5 {prefix} 0.3 {prefix}" in text
    assert "has no .bin/.idx" not in text


MEGATRON_BLEND = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch, torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

words, prefixes, root, samples = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
for prefix in prefixes:  # tiny indexed datasets, as tools/preprocess_data.py writes them
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(200):
        builder.add_item(torch.tensor(rng.integers(1, 50, size=int(rng.integers(5, 30))), dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
dist.init_process_group("gloo", init_method="file://" + root + "/pg", rank=0, world_size=1)


class Tokenizer:  # what GPTDataset reads of a tokenizer
    eod = 0
    pad = 0
    vocab_size = 64
    unique_identifiers = {"class": "Tokenizer"}


config = GPTDatasetConfig(
    random_seed=0, sequence_length=16, blend=get_blend_from_list(words), split="100,0,0",
    tokenizer=Tokenizer(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    path_to_cache=root + "/cache",
)
train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
index = np.asarray(train.dataset_index[:samples])
print(json.dumps(np.bincount(index, minlength=len(prefixes)).tolist()))
"""


def test_megatron_core_blends_the_export_in_its_token_shares(world, tmp_path):
    """The ``--data-path`` words go through Megatron-core itself: ``get_blend_from_list`` parses
    them, ``BlendedMegatronDatasetBuilder`` builds the blend over tiny indexed datasets, and the
    share of sequences drawn from each equals the fitted token shares (Megatron draws fixed-length
    sequences, so sequences are tokens). Run in a child process: Megatron needs a process group."""
    pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    import subprocess
    import sys

    prefixes = [str(tmp_path / f"{n}_text_document") for n in WEIGHTS]
    run = write_run(tmp_path / "run", WEIGHTS)
    out = tmp_path / "megatron.txt"
    args = ["--datasets", *(f"{n}={p}.bin" for n, p in zip(WEIGHTS, prefixes))]
    for prefix in prefixes:  # the export checks that the prefix names an indexed dataset
        for suffix in (".bin", ".idx"):
            Path(f"{prefix}{suffix}").write_bytes(b"")
    assert run_cli(main, [str(run), "--to", "megatron", "--out", str(out), *args]) == 0
    line = next(ln for ln in out.read_text().splitlines() if ln.startswith("--data-path"))
    words = line.split()[1:]
    samples = 4000
    child = subprocess.run(
        [sys.executable, "-c", MEGATRON_BLEND, json.dumps([words, prefixes, str(tmp_path), samples])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    counts = json.loads(child.stdout.strip().splitlines()[-1])
    for name, count in zip(WEIGHTS, counts):
        # Megatron's blending index is deterministic: each share within one sample of the weight
        assert abs(count - WEIGHTS[name] * samples) <= 1, (name, count)


def test_nemo_data_prefix(world, tmp_path):
    config = yaml_body(export(world, "nemo", tmp_path))
    assert set(config["model"]["data"]) == {"data_prefix"}  # pretraining; fine-tuning is nemo-sft
    flat = config["model"]["data"]["data_prefix"]
    assert flat[0::2] == list(WEIGHTS.values())
    assert flat[1::2] == [str(world["paths"][n]) for n in WEIGHTS]


def test_nemo_sft_train_ds(world, tmp_path):
    config = yaml_body(export(world, "nemo-sft", tmp_path))
    assert set(config["model"]["data"]) == {"train_ds"}
    train_ds = config["model"]["data"]["train_ds"]
    assert set(train_ds) == {"file_names", "concat_sampling_probabilities"}
    assert train_ds["file_names"] == [str(world["paths"][n]) for n in WEIGHTS]


@pytest.mark.parametrize("other", ["text", "messages"])
def test_nemo_sft_refuses_datasets_of_different_layouts(world, tmp_path, capsys, other):
    """NeMo 1's fine-tuning builds every file of ``train_ds`` with one dataset class, one
    ``prompt_template`` and one ``label_key``: text records beside prompt/completion ones, or
    conversations beside them, have no config that reads them all. The export wrote one anyway,
    with a header that told the conversation dataset to set ``model.data.chat: true`` (for every
    file) and said nothing of the text; now it is refused in one line naming each dataset's layout,
    and nothing is written."""
    from tests.export_world import chat_world

    if other == "messages":
        odd = chat_world(world, tmp_path, "messages")["paths"]["a"]
        tokenizer = str(tmp_path / "chat-tokenizer")
    else:
        rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
        odd = tmp_path / "a-text.jsonl"
        odd.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
        tokenizer = world["tokenizer"]
    paths = {**world["paths"], "a": odd}
    out = tmp_path / "nemo_sft.yaml"
    argv = [str(world["mixture"]), "--to", "nemo-sft", "--tokenizer", tokenizer, "--out", str(out)]
    argv += ["--datasets", *(f"{n}={p}" for n, p in paths.items())]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = "conversations" if other == "messages" else "text"
    assert len(err) == 1 and err[0].startswith("mergeopt: error: --to nemo-sft: the datasets' records differ")
    assert f"'a' {said}, 'b' prompt/completion, 'c' prompt/completion" in err[0]
    assert not out.exists()
    assert run_cli(main, [*argv[:-4], "--datasets", *(f"{n}={odd}" for n in paths)]) == 0  # one layout


def test_llm_foundry_streams(world, tmp_path):
    stream_args = {"remote", "local", "split", "proportion", "repeat", "choose"}  # streaming.Stream
    streams = yaml_body(export(world, "llm-foundry", tmp_path))["train_loader"]["dataset"]["streams"]
    assert list(streams) == list(WEIGHTS)
    for name, stream in streams.items():
        assert set(stream) <= stream_args and stream["local"] == str(world["paths"][name])
        assert stream["proportion"] == pytest.approx(expected_sample_shares()[name], abs=1e-15)
    streams = yaml_body(export(world, "llm-foundry", tmp_path, "--budget-samples", "6000"))["train_loader"]
    chosen = {n: s["choose"] for n, s in streams["dataset"]["streams"].items()}
    assert all("proportion" not in s for s in streams["dataset"]["streams"].values())  # never both kinds
    assert sum(chosen.values()) == 6000


def _open_instruct_counts(mixer: list[str], sizes: dict[str, int]) -> dict[str, int]:
    """open-instruct's reading: a value with '.' is a fraction of the dataset, else a count."""
    out = {}
    for path, value in zip(mixer[0::2], mixer[1::2]):
        name = Path(path).stem
        number = float(value) if "." in value else int(value)
        out[name] = int(number * sizes[name]) if isinstance(number, float) and number <= 1.0 else int(number)
    return out


def test_open_instruct_fractions_and_counts(world, tmp_path):
    stats = measured_stats()
    config = yaml_body(export(world, "open-instruct", tmp_path))
    assert set(config) == {"dataset_mixer_list", "dataset_mixer_list_splits"}
    mixer = config["dataset_mixer_list"]
    assert all(isinstance(v, str) and "." in v and float(v) <= 1.0 for v in mixer[1::2])
    assert mixer[1::2] == ["1.000", "0.841", "0.597"]  # one number of decimals for every dataset
    assert _open_instruct_counts(mixer, SIZES) == make_plan(WEIGHTS, "tokens", stats).no_repeat_counts()
    mixer = yaml_body(export(world, "open-instruct", tmp_path, "--budget-tokens", "50000"))[
        "dataset_mixer_list"
    ]
    assert all(v.isdigit() for v in mixer[1::2])
    assert (
        _open_instruct_counts(mixer, SIZES) == make_plan(WEIGHTS, "tokens", stats, budget_tokens=50000).counts
    )


def test_open_instruct_says_which_local_datasets_it_cannot_load(world, tmp_path):
    """open-instruct loads a local dataset only from a .jsonl or .parquet file and looks any other
    path up on the Hub: a save_to_disk directory, an arrow or a CSV file was written into
    ``dataset_mixer_list`` without a word, and open-instruct stopped on it. The header now names each."""
    from tests.export_world import chat_world

    messages = chat_world(world, tmp_path, "messages")
    rows = datasets.load_dataset("json", data_files=str(messages["paths"]["a"]), split="train")
    rows.save_to_disk(str(tmp_path / "a_saved"))
    rows.to_parquet(str(tmp_path / "b.parquet"))
    paths = {"a": tmp_path / "a_saved", "b": tmp_path / "b.parquet", "c": messages["paths"]["c"]}
    text = export({**messages, "paths": paths}, "open-instruct", tmp_path)
    notes = [line for line in text.splitlines() if "the only local datasets open-instruct loads" in line]
    assert notes == [
        f"# a: {paths['a']} is not a .jsonl or .parquet file, the only local datasets open-instruct "
        "loads (any other name is looked up on the Hugging Face Hub): write it as JSON Lines"
    ]


def test_olmo_core_source_mixture(world, tmp_path):
    config = yaml_body(export(world, "olmo-core", tmp_path, "--budget-tokens", "120000"))
    assert set(config) == {"source_list", "requested_tokens"}
    sources = config["source_list"]["sources"]
    fields = {"source_name", "target_ratio", "paths", "max_repetition_ratio", "max_source_fraction"}
    assert all(set(s) <= fields for s in sources)
    assert [s["target_ratio"] for s in sources] == list(WEIGHTS.values())
    assert np.allclose(sum(s["target_ratio"] for s in sources), 1.0)  # SourceMixtureList.validate
    assert config["requested_tokens"] == 120000
    for s in sources:  # SourceMixtureDatasetConfig.build's check, with the tokens mergeopt counted
        available = int(SIZES[s["source_name"]] * mean_tokens(s["source_name"]))
        assert 0 < s["target_ratio"] <= 1 and s["max_repetition_ratio"] >= 1
        assert int(available * s["max_repetition_ratio"]) >= int(120000 * s["target_ratio"])
    assert any(s["max_repetition_ratio"] > 1 for s in sources)


def test_doremi_domain_weights(world, tmp_path):
    document = json.loads(export(world, "doremi", tmp_path, datasets=False))
    assert document["train_domain_weights"] == WEIGHTS == document["eval_domain_weights"]


def test_zero_weight_domain_needs_no_dataset(tmp_path, world):
    run = write_run(tmp_path / "run", {"a": 0.4, "b": 0.6, "c": 0.0})
    out = tmp_path / "megatron.txt"
    argv = [str(run), "--to", "megatron", "--out", str(out), "--datasets"]
    argv += [f"a={world['paths']['a']}", f"b={world['paths']['b']}"]
    assert run_cli(main, argv) == 0
    line = out.read_text().splitlines()[-1]
    assert line == f"--data-path 0.4 {world['paths']['a']} 0.6 {world['paths']['b']}"


def test_datasets_default_to_the_recipe_train_data(world, tmp_path):
    fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in WEIGHTS}, "dev": {"d": "/x/d.jsonl"}}
    train = {"data": {n: str(p) for n, p in world["paths"].items()}}
    run = write_run(tmp_path / "run", WEIGHTS, recipe=recipe_tree(fake, tmp_path / "run", train=train))
    out = tmp_path / "megatron.txt"  # token shares: nothing to measure, so no tokenizer is needed
    assert run_cli(main, [str(run), "--to", "megatron", "--out", str(out)]) == 0
    words = out.read_text().splitlines()[-1].split()
    assert words[2::2] == [str(world["paths"][n]) for n in WEIGHTS]


def test_weights_given_as_sample_shares(world, tmp_path):
    config = yaml_body(export(world, "llamafactory", tmp_path, "--weights-are", "samples"))
    assert [float(p) for p in config["interleave_probs"].split(",")] == list(WEIGHTS.values())
    flat = yaml_body(export(world, "nemo", tmp_path, "--weights-are", "samples"))["model"]["data"][
        "data_prefix"
    ]
    raw = {n: WEIGHTS[n] * mean_tokens(n) for n in WEIGHTS}  # t_i = p_i m_i / sum_j p_j m_j
    assert flat[0::2] == pytest.approx([raw[n] / sum(raw.values()) for n in WEIGHTS], abs=1e-15)


def _export_run(run, fmt: str, world: dict, out, *extra: str) -> int:
    argv = [str(run), "--to", fmt, "--tokenizer", world["tokenizer"], "--out", str(out)]
    return run_cli(main, [*argv, "--datasets", *(f"{n}={p}" for n, p in world["paths"].items()), *extra])


def test_the_unit_mixture_json_records_is_read_without_a_flag(world, tmp_path):
    """A fit with weights.unit: samples records it; the export reads the weights as sample shares,
    exactly as --weights-are samples does on a file that records no unit."""
    flagged = yaml_body(export(world, "nemo", tmp_path, "--weights-are", "samples"))
    recorded = write_run(tmp_path / "samples-run", WEIGHTS, unit="samples")
    for extra in ((), ("--weights-are", "samples")):  # the flag may repeat the recorded unit
        out = tmp_path / f"recorded{len(extra)}.yaml"
        assert _export_run(recorded, "nemo", world, out, *extra) == 0
        assert yaml_body(out.read_text()) == flagged
    tokens = write_run(tmp_path / "tokens-run", WEIGHTS, unit="tokens")
    assert _export_run(tokens, "nemo", world, tmp_path / "tokens.yaml") == 0
    assert yaml_body((tmp_path / "tokens.yaml").read_text()) == yaml_body(export(world, "nemo", tmp_path))
    assert yaml_body((tmp_path / "tokens.yaml").read_text()) != flagged


def test_a_flag_that_contradicts_the_recorded_unit_is_refused(world, tmp_path, capsys):
    recorded = write_run(tmp_path / "samples-run", WEIGHTS, unit="samples")
    out = tmp_path / "nemo.yaml"
    assert _export_run(recorded, "nemo", world, out, "--weights-are", "tokens") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"mergeopt: error: {recorded} records its weights as sample shares (weights.unit: samples), so "
        "--weights-are tokens would misread them: drop --weights-are"
    ]
    assert not out.exists()


def test_to_all_writes_one_file_per_format(world, tmp_path):
    run = write_run(tmp_path / "run", WEIGHTS)
    fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in WEIGHTS}, "dev": {"d": "/x/d.jsonl"}}
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe_tree(fake, tmp_path / "run")))
    out = tmp_path / "all"
    argv = [str(run), "--to", "all", "--out", str(out), "--tokenizer", world["tokenizer"], "--datasets"]
    argv += [f"{n}={p}" for n, p in world["paths"].items()]
    assert run_cli(main, argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f.filename for f in FORMATS.values())


def test_to_all_says_that_one_formats_refusal_stops_every_format(world, tmp_path, capsys):
    """Text records beside prompt/completion ones: ``--to trl`` refuses them, so ``--to all`` writes
    nothing. Its one line was the format's alone, which left a user who asked for every format wondering
    why none came; it now says that ``--to all`` writes all or none, and how to get the others."""
    run = write_run(tmp_path / "run", WEIGHTS)
    rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
    text = tmp_path / "a-text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    out = tmp_path / "all"
    argv = [str(run), "--to", "all", "--out", str(out), "--tokenizer", world["tokenizer"], "--datasets"]
    argv += [f"{n}={p}" for n, p in {**world["paths"], "a": text}.items()]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: error: --to ")  # trl (or nemo-sft) refuses
    assert "the datasets' records differ ('a' text, 'b' prompt/completion" in err[0]
    assert err[0].endswith(
        "(--to all writes every format or none, so nothing was written: export the other formats "
        "one at a time with --to)"
    )
    assert not out.exists() or not any(out.iterdir())
    one = [str(run), "--to", "trl", "--tokenizer", world["tokenizer"], *argv[7:]]
    assert run_cli(main, one) == 2  # one format asked for: its own line alone
    assert "--to all" not in capsys.readouterr().err


# ---------------------------------------------------------------- mergekit (its own config model)


def _merge_configuration():
    """mergekit's own config model; the test skips where mergekit (a dev dependency, not one of
    mergeopt's) is absent, so the rest of this module still runs there, e.g. on the GPU machine."""
    return pytest.importorskip("mergekit.config").MergeConfiguration


def _mergekit_yaml(tmp_path: Path, random_world: dict, method: dict, **model) -> dict:
    names = list(random_world["experts"])
    weights = dict(zip(names, (0.2, 0.5, 0.3)))
    tree = recipe_tree(random_world, tmp_path / "run")
    tree["model"].update(model)
    run = write_run(tmp_path / "run", weights, method=method, recipe=tree)
    out = tmp_path / "mergekit.yaml"
    assert run_cli(main, [str(run), "--to", "mergekit", "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text())


@pytest.mark.parametrize(
    "method,mergekit_name",
    [
        ({"name": "linear", "scale": 1.3}, "task_arithmetic"),
        ({"name": "ties", "scale": 2.0, "density": 0.4, "majority_sign": "total"}, "ties"),
        ({"name": "dare_linear", "scale": 1.0, "density": 0.7, "seed": 3}, "dare_linear"),
        (
            {"name": "dare_ties", "scale": 1.5, "density": 0.6, "majority_sign": "total", "seed": 3},
            "dare_ties",
        ),
    ],
)
def test_mergekit_yaml_validates_with_mergekit(tmp_path, random_world, method, mergekit_name):
    MergeConfiguration = _merge_configuration()
    registry = pytest.importorskip("mergekit.merge_methods").registry
    tree = _mergekit_yaml(tmp_path, random_world, method)
    config = MergeConfiguration.model_validate(tree)
    assert config.merge_method == mergekit_name
    assert str(config.base_model.model.path) == random_world["base"]
    spec = {p.name: p for p in registry.get(config.merge_method).spec.parameters}
    for key, value in config.parameters.items():
        assert spec[key].scope.name == "SHARED"
        spec[key].validate(value)
    assert config.parameters["lambda"] == method["scale"] and config.parameters["normalize"] is False
    for entry, (name, path) in zip(config.models, random_world["experts"].items()):
        assert str(entry.model.model.path) == path
        for key, value in entry.parameters.items():
            assert spec[key].scope.name == "NON_BASE"
            spec[key].validate(value)
        assert entry.parameters["weight"] == {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}[name]
        if "density" in method:
            assert entry.parameters["density"] == method["density"]


def test_mergekit_linear_merge_equals_mergeopts(tmp_path, random_world):
    """mergekit's own run_merge of the export = θ0 + λ Σ w_i τ_i (merge.scale λ = 1.3)."""
    MergeConfiguration = _merge_configuration()
    merge = pytest.importorskip("mergekit.merge")
    tree = _mergekit_yaml(tmp_path, random_world, {"name": "linear", "scale": 1.3})
    out = tmp_path / "merged"
    merge.run_merge(
        MergeConfiguration.model_validate(tree),
        str(out),
        merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    merged = load_file(out / "model.safetensors")
    base = load_file(Path(random_world["base"]) / "model.safetensors")
    experts = [load_file(Path(p) / "model.safetensors") for p in random_world["experts"].values()]
    for name, theta0 in base.items():
        expected = theta0 + 1.3 * sum(w * (e[name] - theta0) for w, e in zip((0.2, 0.5, 0.3), experts))
        assert (merged[name] - expected).abs().max().item() <= 1e-6, name


def test_mergekit_exclusions_and_mixup(tmp_path, random_world):
    lam = [0.5, 0.25, 0.25]
    method = {"name": "linear", "scale": 1.0, "mixup_alpha": 1.0, "mixup_lambda": lam, "seed": 0}
    tree = _mergekit_yaml(tmp_path, random_world, method, exclude=["embed_tokens", "model.norm"])
    _merge_configuration().model_validate(tree)
    scaled = [w * x for w, x in zip((0.2, 0.5, 0.3), lam)]
    for entry, s in zip(tree["models"], scaled):
        weight = entry["parameters"]["weight"]
        assert weight[:2] == [
            {"filter": "embed_tokens", "value": 0.0},
            {"filter": "model.norm", "value": 0.0},
        ]
        assert weight[2]["value"] == pytest.approx(s / sum(scaled), abs=1e-15)


@pytest.mark.parametrize(
    "method,model,culprit",
    [
        ({"name": "ties", "scale": 1.0, "density": 0.5, "majority_sign": "frequency"}, {}, "'frequency'"),
        ({"name": "linear", "scale": 1.0}, {"exclude": ["layers\\.[01]\\."]}, "layers"),
    ],
)
def test_mergekit_refuses_what_it_cannot_say(tmp_path, random_world, capsys, method, model, culprit):
    names = list(random_world["experts"])
    tree = recipe_tree(random_world, tmp_path / "run")
    tree["model"].update(model)
    run = write_run(tmp_path / "run", dict(zip(names, (0.2, 0.5, 0.3))), method=method, recipe=tree)
    out = tmp_path / "mergekit.yaml"
    assert run_cli(main, [str(run), "--to", "mergekit", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0] and "mergekit" in err[0]
    assert not out.exists()


def test_mergekit_refuses_a_mixture_naming_an_expert_its_recipe_lacks(tmp_path, random_world, capsys):
    """A mixture.json beside another run's recipe.yaml: one line naming the expert, not a KeyError."""
    names = list(random_world["experts"])
    tree = recipe_tree(random_world, tmp_path / "run")
    weights = dict(zip([*names[:2], "delta"], (0.2, 0.5, 0.3)))
    run = write_run(tmp_path / "run", weights, recipe=tree)
    out = tmp_path / "mergekit.yaml"
    assert run_cli(main, [str(run), "--to", "mergekit", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: error: ") and "'delta'" in err[0]
    assert "mergekit" in err[0] and not out.exists()


def test_a_recipe_beside_naming_other_experts_is_a_warning(tmp_path, random_world, capsys):
    """A data format needs no checkpoint, so a mixture.json beside another run's recipe.yaml is
    exported; but the recipe's tokenizer, chat template and train.data would be read as this fit's,
    which the user hears in one warning (it was silent). The same experts in another order: none."""
    names = list(random_world["experts"])
    tree = recipe_tree(random_world, tmp_path / "run")
    weights = dict(zip([*names[:2], "delta"], (0.2, 0.5, 0.3)))
    run = write_run(tmp_path / "run", weights, recipe=tree)
    assert run_cli(main, [str(run), "--to", "doremi"]) == 0
    out = capsys.readouterr()
    assert "train_domain_weights" in out.out
    (line,) = [x for x in out.err.splitlines() if "warning" in x]
    assert f"names experts {', '.join(names)}, and mixture.json weighs {', '.join(weights)}" in line
    same = write_run(tmp_path / "same", dict(zip(reversed(names), (0.2, 0.5, 0.3))), recipe=tree)
    assert run_cli(main, [str(same), "--to", "doremi"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_mergekit_lora_expert_is_base_plus_adapter(tmp_path, random_world):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    world = {**random_world, "experts": {**random_world["experts"], "gamma": str(adapter)}}
    tree = _mergekit_yaml(tmp_path, world, {"name": "linear", "scale": 1.0})
    config = _merge_configuration().model_validate(tree)
    lora = config.models[2].model
    assert str(lora.model.path) == random_world["base"] and str(lora.lora.path) == str(adapter)


def test_mergekit_lora_experts_merge_with_the_headers_command(tmp_path, random_world):
    """For LoRA experts the header's ``mergekit-yaml`` command passes ``--lora-merge-cache``, and run
    as written (mergekit's own console script, placeholders filled in) it merges θ0 + Σ w_i τ_i, each
    adapter's τ its PEFT merge; the same command without the cache fails as the header says."""
    pytest.importorskip("peft")
    pytest.importorskip("mergekit.scripts.run_yaml")
    from tests.test_lora_experts import save_experts

    adapters, dense = save_experts(random_world, tmp_path, ["q_proj", "v_proj"])
    _mergekit_yaml(tmp_path, {**random_world, "experts": adapters}, {"name": "linear", "scale": 1.0})
    text = (tmp_path / "mergekit.yaml").read_text()
    assert f"# {', '.join(adapters)}: PEFT LoRA adapters, written BASE+ADAPTER;" in text
    (command,) = [
        line[len("# merge with: ") :] for line in text.splitlines() if line.startswith("# merge with: ")
    ]
    assert (
        command == f"mergekit-yaml {tmp_path / 'mergekit.yaml'} OUTPUT_DIR --lora-merge-cache LORA_CACHE_DIR"
    )
    script = str(Path(sys.executable).parent / "mergekit-yaml")
    filled = command.replace("OUTPUT_DIR", str(tmp_path / "merged")).replace(
        "LORA_CACHE_DIR", str(tmp_path / "cache")
    )
    done = subprocess.run([script, *filled.split()[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(Path(random_world["base"]) / "model.safetensors")
    experts = [load_file(Path(dense[n]) / "model.safetensors") for n in adapters]
    for name, theta0 in base.items():
        expected = theta0 + sum(w * (e[name] - theta0) for w, e in zip((0.2, 0.5, 0.3), experts))
        assert (merged[name] - expected).abs().max().item() <= 1e-5, name
    uncached = [script, str(tmp_path / "mergekit.yaml"), str(tmp_path / "merged2")]
    failed = subprocess.run(uncached, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "Need to specify cache dir to merge adapters" in failed.stderr


def test_a_save_to_disk_directory_counts_as_its_jsonl(tmp_path):
    """A dataset written by ``datasets.save_to_disk``, alone or as a DatasetDict's 'train' split,
    is counted as the same records in JSONL are; a DatasetDict without 'train' is a one-line error."""
    import datasets

    tokenizer = toy.build_tokenizer()
    records = [{"text": "hello world"}, {"text": "ab"}, {"prompt": "2+2=", "completion": "4"}]
    records = [
        {"text": r.get("text"), "prompt": r.get("prompt"), "completion": r.get("completion")} for r in records
    ]
    path = tmp_path / "records.jsonl"
    path.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in records)
    )
    expected = measure(path, tokenizer)
    assert expected.samples == 3
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "no_train"))
    assert measure(tmp_path / "saved", tokenizer) == expected
    assert measure(tmp_path / "saved_dict", tokenizer) == expected
    with pytest.raises(UserError, match=r"no_train: a saved DatasetDict without a 'train' split$"):
        measure(tmp_path / "no_train", tokenizer)


def test_a_save_to_disk_directory_is_given_as_its_own_shards_not_its_caches(world, tmp_path):
    """A dataset loaded with ``load_from_disk`` and shuffled, mapped or filtered writes its caches
    (``cache-<fingerprint>.arrow``) into its own directory, beside the shards: running the
    hf-datasets budget snippet (its ``shuffle``) did. Every ``*.arrow`` there was exported as the
    dataset's ``data_files``, so TRL, axolotl and torchtune read an ``indices`` table or the
    mapped rows as data. Now the shards are the ones its state.json lists."""
    rows = [json.loads(line) for line in world["paths"]["a"].read_text().splitlines()]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    reloaded = datasets.load_from_disk(str(saved))
    reloaded.shuffle(seed=0)
    reloaded.map(lambda r: {"prompt": r["prompt"] + "!"})
    assert len(list(saved.glob("cache-*.arrow"))) == 2  # what datasets writes beside the shards
    config = yaml_body(export({**world, "paths": {**world["paths"], "a": saved}}, "trl", tmp_path))
    entries = [e for e in config["datasets"] if e["path"] == "arrow"]
    assert entries and all(e["data_files"] == str(saved / "data-00000-of-00001.arrow") for e in entries)
    for entry in entries:  # the rows TRL reads: the dataset's own, in its order
        read = datasets.load_dataset("arrow", data_files=entry["data_files"], split=entry["split"])
        assert read.to_list() == rows[: len(read)]


def test_sft_formats_say_which_datasets_their_readers_cannot_take(world, tmp_path):
    """open-instruct's SFT transforms read only a ``messages`` column and NeMo 1's GPTSFTDataset only
    strings through its prompt_template: a prompt/completion dataset to the one, a conversation to
    the other, was written without a word, and the trainer stopped on every record. Now the header
    says, per such dataset, what its reader wants; a dataset it reads gets no line."""

    def notes(text: str, what: str) -> list[str]:
        return [line for line in text.splitlines() if what in line]

    from tests.export_world import chat_world

    messages = chat_world(world, tmp_path / "m", "messages")
    lists = chat_world(world, tmp_path / "p", "prompt")
    opened = "reads the conversation of each record from its messages column"
    assert len(notes(export(world, "open-instruct", tmp_path), opened)) == len(WEIGHTS)
    assert notes(export(messages, "open-instruct", tmp_path), "# a: ") == []
    said = notes(export(lists, "open-instruct", tmp_path), "prompt/completion lists of messages")
    assert len(said) == len(WEIGHTS) and all('{"messages": prompt + completion}' in n for n in said)
    chat = "set model.data.chat: true (GPTSFTChatDataset)"
    assert notes(export(world, "nemo-sft", tmp_path), chat) == []
    for conversations in (messages, lists):
        said = notes(export(conversations, "nemo-sft", tmp_path), chat)
        assert [n.split(":")[0] for n in said] == [f"# {n}" for n in WEIGHTS]


def test_open_instruct_says_to_write_multiple_choice_records_as_messages(world, tmp_path, capsys):
    """A multiple-choice dataset's note told open-instruct users to "write them as prompt/completion"
    (the advice for axolotl and torchtune), a layout whose note then says open-instruct cannot read it
    either: the note now says messages, with the right choice as the assistant's turn."""
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"prompt": "q", "choices": ["x", "y"], "answer": 1}) + "\n")
    paths = {**world["paths"], "a": choice}
    argv = [str(world["mixture"]), "--to", "open-instruct", "--tokenizer", world["tokenizer"]]
    argv += ["--budget-samples", "600", "--max-epochs", "1000"]
    argv += ["--datasets", *[f"{n}={p}" for n, p in paths.items()], "--out", str(tmp_path / "oi.yaml")]
    assert run_cli(main, argv) == 0, capsys.readouterr().err
    (note,) = [line for line in (tmp_path / "oi.yaml").read_text().splitlines() if line.startswith("# a: ")]
    assert "write them as prompt/completion" not in note
    assert note.endswith('{"role": "assistant", "content": choices[answer]}]}'), note


def test_trl_renders_conversations_with_the_template_they_were_counted_with(world, tmp_path):
    """A run whose recipe names data.chat_template counts its conversations with it, and TRL's
    SFTTrainer renders them with the model's tokenizer's template unless SFTConfig's
    chat_template_path names another: the file named none, so TRL trained on other tokens than the
    mixture's sample shares were derived from. Now it names the template; TRL's own parser, loader
    and SFTTrainer read the file and tokenize every sample as mergeopt counted it."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl.scripts import utils

    from mergeopt.objectives.chat import render

    chat, template, run = chat_run_with_template(world, tmp_path)
    out = tmp_path / "trl.yaml"
    argv = [str(run), "--to", "trl", "--tokenizer", chat["tokenizer"], "--budget-samples", "120"]
    assert run_cli(main, [*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "mean tokens per sample: a 13, b 51, c 21" in text  # BOS + each character twice
    assert yaml_body(text)["chat_template_path"] == str(template)

    with warnings.catch_warnings():  # transformers' own deprecations inside TrainingArguments
        warnings.simplefilter("ignore")
        args, mixture = utils.TrlParser((trl.SFTConfig, utils.DatasetMixtureConfig)).parse_args_and_config(
            ["--config", str(out), "--output_dir", str(tmp_path / "trl"), "--report_to", "none"]
            + ["--use_cpu", "true", "--bf16", "false", "--max_length", "100000"]
        )
    train = utils.get_dataset(mixture)["train"]
    tokenizer = AutoTokenizer.from_pretrained(chat["tokenizer"])
    sizes = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **sizes))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    counted = AutoTokenizer.from_pretrained(chat["tokenizer"])
    counted.chat_template = DOUBLED
    assert trainer.train_dataset["input_ids"] == [render(counted, r["messages"])["input_ids"] for r in train]


def test_trl_says_when_it_cannot_take_the_runs_chat_template(world, tmp_path):
    """TRL reads chat_template_path as a template only from a .jinja or .j2 file (any other path is
    a whole tokenizer to load): a template kept under another name gets a line saying so."""
    chat, template, run = chat_run_with_template(world, tmp_path, "doubled.txt")
    out = tmp_path / "trl.yaml"
    assert run_cli(main, [str(run), "--to", "trl", "--tokenizer", chat["tokenizer"], "--out", str(out)]) == 0
    text = out.read_text()
    assert "chat_template_path" not in yaml_body(text)
    assert (
        f"# the conversations were counted with data.chat_template ({template}); TRL's SFTTrainer reads"
        in text
    )
