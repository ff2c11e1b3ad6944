"""export: one mixture, every format, the same numbers (issue 17, point 4).

``--to all`` writes one file per framework. Each file is read back here the way its framework reads
it (a share, a probability, a count, a slice), and what it implies is compared across formats:
the token shares within rounding to whole samples, the budget's sample counts exactly, and the
epochs over each source that every data format states under a budget. A format without a reader
here fails the test, so a new format cannot join ``--to all`` without joining this table.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.formats import FORMATS
from mergeopt.export.formats.base import Specials
from mergeopt.export.shares import make_plan
from tests.conftest import recipe_tree
from tests.export_world import SIZES, WEIGHTS, build_world, mean_tokens, measured_stats, write_run

BUDGET = 60_000  # tokens: a 12,000 of 10,500 (1.14 epochs), b 30,000 of 31,200, c 18,000 of 26,400


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("export"))


def _body(text: str):
    return yaml.safe_load(text)


def _python_literal(code: str, name: str):
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not assigned in the snippet")


def _sliced_counts(entries: list[dict], path_key: str) -> dict[str, int]:
    """Counts of a list of entries cut by ``split: train[:N]`` (TRL, axolotl, torchtune)."""
    counts: dict[str, int] = {}
    for entry in entries:
        name = Path(entry[path_key]).stem
        cut = re.fullmatch(r"train(?:\[:(\d+)\])?", entry["split"])
        counts[name] = counts.get(name, 0) + (int(cut.group(1)) if cut.group(1) else SIZES[name])
    return counts


def _open_instruct_counts(text: str) -> dict[str, int]:
    mixer = _body(text)["dataset_mixer_list"]
    out = {}
    for path, value in zip(mixer[0::2], mixer[1::2]):
        name = Path(path).stem
        out[name] = int(float(value) * SIZES[name]) if "." in value else int(value)
    return out


def _olmo_tokens(text: str) -> dict[str, float]:
    config = _body(text)
    total = config["requested_tokens"]
    return {s["source_name"]: s["target_ratio"] * total for s in config["source_list"]["sources"]}


def _pairs(flat: list) -> dict[str, float]:
    return {Path(str(p)).stem: float(w) for w, p in zip(flat[0::2], flat[1::2])}


def _nemo_sft(train_ds: dict) -> dict[str, float]:
    names = [Path(p).stem for p in train_ds["file_names"]]
    return dict(zip(names, train_ds["concat_sampling_probabilities"]))


def _llamafactory_counts(text: str) -> dict[str, int]:
    assert _body(text)["mix_strategy"] == "concat"
    entries = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("#   {")]
    return {name: entry["num_samples"] for one in entries for name, entry in one.items()}


# format -> (what its numbers are, how its framework reads them out of the file)
READERS = {
    # under a budget: each dataset_info.json entry's num_samples (the header's entries), concatenated
    "llamafactory": ("counts", _llamafactory_counts),
    "hf-datasets": ("counts", lambda t: _python_literal(t, "COUNTS")),
    "hf-datasets-yaml": ("counts", lambda t: _body(t)["counts"]),
    "megatron": (
        "token shares",
        lambda t: _pairs(next(ln for ln in t.splitlines() if ln[0] != "#").split()[1:]),
    ),
    "nemo": ("token shares", lambda t: _pairs(_body(t)["model"]["data"]["data_prefix"])),
    "nemo-sft": ("sample shares", lambda t: _nemo_sft(_body(t)["model"]["data"]["train_ds"])),
    "llm-foundry": (
        "counts",
        lambda t: {n: s["choose"] for n, s in _body(t)["train_loader"]["dataset"]["streams"].items()},
    ),
    "open-instruct": ("counts", _open_instruct_counts),
    "olmo-core": ("tokens", _olmo_tokens),
    "trl": ("counts", lambda t: _sliced_counts(_body(t)["datasets"], "data_files")),
    "axolotl": ("counts", lambda t: _sliced_counts(_body(t)["datasets"], "path")),
    "torchtune": ("counts", lambda t: _sliced_counts(_body(t)["dataset"], "data_files")),
    "doremi": ("token shares", lambda t: json.loads(t)["train_domain_weights"]),
}


def _added(fmt: str) -> int:
    """The special tokens ``fmt``'s trainer adds to each of this world's samples (prompt/completion
    records; the tokenizer writes a BOS, no EOS, and has no chat template): TRL, axolotl and
    torchtune an EOS, LLaMA-Factory's empty template leaves out the BOS (-1), proven against the
    frameworks' own tokenizing in tests/test_export_trained_tokens.py."""
    hook = FORMATS[fmt].added_tokens
    return (
        0
        if hook is None
        else hook("prompt_completion", Specials(bos=True, eos=False), frozenset({"prompt_completion"}))
    )


def _token_shares(kind: str, values: dict[str, float], added: int = 0) -> dict[str, float]:
    """What a file's numbers imply as each source's share of the tokens its trainer trains on."""
    if kind in ("counts", "sample shares"):
        values = {n: v * (mean_tokens(n) + added) for n, v in values.items()}
    total = sum(values.values())
    return {n: v / total for n, v in values.items()}


def _epochs_said(fmt: str, text: str) -> dict[str, float]:
    if fmt == "doremi":
        return json.loads(text)["mergeopt"]["epochs"]["per_source"]
    (line,) = [ln for ln in text.splitlines() if "epochs over each source under the budget" in ln]
    return {n: float(e) for n, e in re.findall(r"(\w+) ([0-9.e+-]+)(?:,|$)", line.split(": ", 1)[1])}


def test_every_format_carries_the_same_shares_counts_and_epochs(world, tmp_path):
    run = write_run(tmp_path / "run", WEIGHTS)  # with the recipe --to all also writes mergekit's merge
    fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in WEIGHTS}, "dev": {"d": "/x/d.jsonl"}}
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe_tree(fake, tmp_path / "run")))
    out = tmp_path / "all"
    args = [str(run), "--to", "all", "--tokenizer", world["tokenizer"], "--out", str(out)]
    args += ["--budget-tokens", str(BUDGET), "--datasets", *(f"{n}={p}" for n, p in world["paths"].items())]
    assert run_cli(main, args) == 0
    data_formats = [f for f in FORMATS.values() if f.unit is not None]
    assert {f.name for f in data_formats} == set(READERS), "a data format without a reader in this table"

    assert {f.name for f in data_formats if _added(f.name)} == {"trl", "axolotl", "torchtune", "llamafactory"}
    repeats = make_plan(WEIGHTS, "tokens", measured_stats(), budget_tokens=BUDGET).repetition
    assert repeats["a"] > 1 > repeats["b"]  # the budget repeats one source: the epochs matter
    # one sample more or less of a source moves its token share by at most its length over the budget
    rounding = max(mean_tokens(n) + 1 for n in WEIGHTS) / BUDGET
    for fmt in data_formats:
        # the budget's samples, of the tokens the format's trainer trains on per sample
        plan = make_plan(WEIGHTS, "tokens", measured_stats(_added(fmt.name)), budget_tokens=BUDGET)
        epochs = {n: plan.samples[n] / SIZES[n] for n in WEIGHTS}
        text = (out / fmt.filename).read_text()
        kind, read = READERS[fmt.name]
        values = read(text)
        assert list(values) == list(WEIGHTS), fmt.name
        if kind == "counts":
            assert values == plan.counts, fmt.name  # the budget's integer counts, exactly
        shares = _token_shares(kind, values, _added(fmt.name))
        tolerance = rounding if kind in ("counts", "tokens") else 1e-12
        assert shares == pytest.approx(WEIGHTS, abs=tolerance), (fmt.name, shares)
        assert _epochs_said(fmt.name, text) == pytest.approx(epochs, rel=1e-3), fmt.name


def _capped(budget_key: str, budget: int, sizes_key: str, sizes: dict[str, int]) -> dict:
    """mixture.json's constraints for a cap R = 10 that binds nowhere (R·size/budget >= 1.67)."""
    return {
        "lower": dict.fromkeys(WEIGHTS, 0.0),
        "upper": dict.fromkeys(WEIGHTS, 1.0),
        "upper_from": dict.fromkeys(WEIGHTS, ""),
        "bounds": {},
        "pinned": {},
        "max_epochs": 10.0,
        budget_key: budget,
        sizes_key: sizes,
    }


def test_without_datasets_the_epochs_come_from_the_fits_recorded_tokens(tmp_path, capsys):
    """A fit with a repetition cap records each source's tokens: a token budget alone then states
    the epochs in every data format, and refuses one above --max-epochs, naming the source."""
    tokens = {"a": 10_000, "b": 40_000, "c": 30_000}
    run = write_run(tmp_path / "run", WEIGHTS, constraints=_capped("token_budget", 60_000, "tokens", tokens))
    out = tmp_path / "doremi.json"
    assert run_cli(main, [str(run), "--to", "doremi", "--budget-tokens", "60000", "--out", str(out)]) == 0
    said = json.loads(out.read_text())["mergeopt"]["epochs"]
    assert said["from"] == "token counts recorded in mixture.json"
    assert said["per_source"] == pytest.approx({n: WEIGHTS[n] * 60_000 / tokens[n] for n in WEIGHTS})
    assert "the budget repeats datasets beyond one epoch: a 1.2x" in capsys.readouterr().err

    refused = tmp_path / "refused.json"
    argv = [str(run), "--to", "doremi", "--budget-tokens", "250000", "--out", str(refused)]
    assert run_cli(main, argv) == 2  # a: 50,000 of 10,000 tokens recorded, 5 epochs > --max-epochs 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mergeopt: error: the budget repeats dataset 'a' (10,000 tokens recorded in mixture.json) 5 times, "
        "above --max-epochs 4; lower the budget, add data, or raise --max-epochs"
    ]
    assert not refused.exists()


def test_a_cap_in_samples_gives_the_epochs_from_the_recorded_samples(tmp_path, capsys):
    """Under weights.unit: samples the fit records each source's samples: a sample budget alone
    states the epochs from them, and one that breaks the fit's cap is refused, naming the source."""
    samples = {"a": 1_000, "b": 4_000, "c": 3_000}
    constraints = _capped("sample_budget", 6_000, "samples", samples)
    run = write_run(tmp_path / "run", WEIGHTS, constraints=constraints, unit="samples")
    out = tmp_path / "doremi.json"
    assert run_cli(main, [str(run), "--to", "doremi", "--budget-samples", "6000", "--out", str(out)]) == 0
    said = json.loads(out.read_text())["mergeopt"]["epochs"]
    assert said["from"] == "sample counts recorded in mixture.json"
    assert said["per_source"] == pytest.approx({n: WEIGHTS[n] * 6_000 / samples[n] for n in WEIGHTS})
    assert "the budget repeats datasets beyond one epoch: a 1.2x" in capsys.readouterr().err

    refused = tmp_path / "refused.json"
    argv = [
        str(run),
        "--to",
        "doremi",
        "--budget-samples",
        "60000",
        "--max-epochs",
        "20",
        "--out",
        str(refused),
    ]
    assert run_cli(main, argv) == 2  # a: 12,000 of 1,000 samples, 12 epochs > the fit's cap of 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mergeopt: error: the budget repeats source 'a' (1,000 samples recorded in mixture.json) 12 times, "
        "above the fit's weights.max_epochs 10; lower the budget or refit with this one"
    ]
    assert not refused.exists()
