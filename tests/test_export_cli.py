"""export CLI: each bad input is one line on stderr naming the culprit, exit code 2, nothing written.

Most cases run ``main`` in process through :func:`mergeopt.errors.run_cli` (what ``python -m``
runs); two go through a real subprocess to show there is no traceback, and one that ``--debug``
brings it back. A repeated-but-allowed budget exits 0 and warns with each dataset's factor.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.worlds import toy
from tests.conftest import run_module

WEIGHTS = {"a": 0.25, "b": 0.5, "c": 0.25}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export_cli")
    tokenizer = root / "tokenizer"
    toy.build_tokenizer().save_pretrained(tokenizer)
    paths = {}
    for name in WEIGHTS:
        paths[name] = root / f"{name}.jsonl"
        records = [{"prompt": f"{name}{i}", "completion": "xy"} for i in range(10)]
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "tokenizer": str(tokenizer), "paths": paths}


def run(tmp_path: Path, weights=WEIGHTS, *args: str, status="complete") -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    mixture = {"status": status, "weights": weights, "method": {"name": "linear", "scale": 1.0}, "seed": 0}
    (run_dir / "mixture.json").write_text(json.dumps(mixture))
    return run_dir / "mixture.json"


def datasets_args(files: dict, **override: str) -> list[str]:
    paths = {n: str(p) for n, p in files["paths"].items()} | override
    return ["--datasets", *(f"{n}={p}" for n, p in paths.items() if p)]


def fails(capsys, tmp_path: Path, argv: list[str], culprit: str, to_file: bool = True) -> str:
    out = tmp_path / "out.txt"
    code = run_cli(main, [*argv, "--out", str(out)] if to_file else argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), lines
    assert culprit in lines[0], lines[0]
    assert not out.exists() and captured.out == ""
    return lines[0]


def test_negative_weight(tmp_path, capsys):
    mixture = run(tmp_path, {"a": -0.25, "b": 0.75, "c": 0.5})
    fails(capsys, tmp_path, [str(mixture), "--to", "doremi"], "'a' is negative")


def test_weights_not_summing_to_one(tmp_path, capsys):
    mixture = run(tmp_path, {"a": 0.25, "b": 0.5, "c": 0.2})
    fails(capsys, tmp_path, [str(mixture), "--to", "doremi"], "sum to 0.95, not 1")


def test_unfinished_fit(tmp_path, capsys):
    mixture = run(tmp_path, status="running")
    fails(capsys, tmp_path, [str(mixture), "--to", "doremi"], "status 'running'")


def test_missing_mixture(tmp_path, capsys):
    fails(capsys, tmp_path, [str(tmp_path / "nope.json"), "--to", "doremi"], "nope.json does not exist")


def test_unknown_format(tmp_path, capsys):
    fails(capsys, tmp_path, [str(run(tmp_path)), "--to", "fairseq"], "unknown --to format 'fairseq'")


def test_unknown_dataset_name(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "megatron", *datasets_args(files, zeta=str(files["paths"]["a"]))]
    fails(capsys, tmp_path, argv, "'zeta', which is not an expert")


def test_format_with_paths_needs_every_dataset(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "megatron", *datasets_args(files, c="")]
    fails(capsys, tmp_path, argv, "none for expert 'c'")
    fails(capsys, tmp_path, [str(run(tmp_path)), "--to", "hf-datasets"], "--to hf-datasets")


def test_partial_datasets_are_refused(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "llamafactory", *datasets_args(files, b="", c="")]
    fails(capsys, tmp_path, argv, "no dataset for expert 'b'")


def test_missing_dataset_file(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "nemo", *datasets_args(files, b=str(tmp_path / "gone.jsonl"))]
    fails(capsys, tmp_path, argv, "--datasets b: " + str(tmp_path / "gone.jsonl") + " does not exist")


def test_unreadable_and_malformed_datasets(tmp_path, capsys, files):
    text = tmp_path / "b.txt"
    text.write_text("plain text\n")
    argv = [str(run(tmp_path)), "--to", "hf-datasets", "--tokenizer", files["tokenizer"]]
    fails(capsys, tmp_path, [*argv, *datasets_args(files, b=str(text))], "b.txt: cannot read .txt data")
    bad = tmp_path / "bad.jsonl"  # the second record, on the third line: named by its line
    bad.write_text(
        json.dumps({"prompt": "p", "completion": "c"}) + "\n\n" + json.dumps({"prompt": "q"}) + "\n"
    )
    line = fails(capsys, tmp_path, [*argv, *datasets_args(files, b=str(bad))], f"{bad.resolve()}:3: ")
    assert line == f"mergeopt: error: {_dev_set_error(bad.resolve())}"  # fit's words for the same file


def _dev_set_error(path: Path) -> str:
    """What fit says of ``path`` as a dev set (FILE:LINE: ...), the wording an export must share."""
    from mergeopt.errors import UserError
    from mergeopt.objectives.data import read_jsonl

    with pytest.raises(UserError) as err:
        read_jsonl(path)
    return str(err.value)


def test_budget_above_max_epochs(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "trl", "--tokenizer", files["tokenizer"], *datasets_args(files)]
    line = fails(capsys, tmp_path, [*argv, "--budget-samples", "100"], "repeats dataset 'b'")
    assert "--max-epochs 4" in line and "5 times" in line  # b gets 50 of 100 samples: 5 epochs of 10
    fails(capsys, tmp_path, [*argv, "--budget-samples", "40", "--max-epochs", "1.5"], "--max-epochs 1.5")


def test_budget_within_max_epochs_warns_per_dataset(tmp_path, capsys, files):
    out = tmp_path / "trl.yaml"
    argv = [str(run(tmp_path)), "--to", "trl", "--tokenizer", files["tokenizer"], *datasets_args(files)]
    assert run_cli(main, [*argv, "--budget-samples", "60", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mergeopt: warning: the budget repeats datasets beyond one epoch: a 1.5x, b 3x, c 1.5x"]
    assert out.is_file()


def test_to_all_needs_an_output_directory(tmp_path, capsys, files):
    argv = [str(run(tmp_path)), "--to", "all", *datasets_args(files)]
    fails(capsys, tmp_path, argv, "--out DIR", to_file=False)


def test_to_all_without_datasets_is_one_line_naming_the_formats_that_need_them(tmp_path, capsys):
    """``--to all`` asks for every format, so the refusal says which of them need --datasets (and
    which do not), alone on stderr: no note about unmeasured datasets before it."""
    line = fails(capsys, tmp_path, [str(run(tmp_path)), "--to", "all"], "--to all")  # --out DIR: fails' own
    assert line == (
        "mergeopt: error: --to all includes formats that name each domain's data (hf-datasets, "
        "hf-datasets-yaml, megatron, nemo, nemo-sft, llm-foundry, open-instruct, olmo-core, trl, axolotl, "
        "torchtune), but --datasets gives none for expert 'a': pass --datasets a=PATH (every expert with "
        "a positive weight), or --to one of llamafactory, doremi, mergekit (they need none)"
    )


def test_a_recipe_given_for_the_mixture_says_what_export_reads(tmp_path, capsys):
    mixture = run(tmp_path)
    recipe = mixture.parent / "recipe.yaml"
    recipe.write_text("model:\n  base: /x/base\n")
    line = fails(capsys, tmp_path, [str(recipe), "--to", "doremi"], str(recipe))
    assert line == (
        f"mergeopt: error: {recipe} is not a mixture.json; mergeopt export takes a fit's run directory "
        f"or its mixture.json: give {mixture.parent} or {mixture}"
    )
    broken = tmp_path / "broken.json"  # a .json file is read as one, and its own fault named
    broken.write_text("{")
    fails(capsys, tmp_path, [str(broken), "--to", "doremi"], "broken.json: not valid JSON (line 1")


def test_the_header_is_the_command_that_writes_the_file_again(tmp_path, capsys, files):
    """Each file names the ``mergeopt export`` command and the options that shaped it; run as
    written (to stdout), that command gives the same file."""
    mixture = run(tmp_path)
    out = tmp_path / "trl.yaml"
    shaping = [
        "--tokenizer",
        files["tokenizer"],
        *datasets_args(files),
        "--budget-samples",
        "30",
        "--seed",
        "5",
    ]
    assert run_cli(main, [str(mixture), "--to", "trl", *shaping, "--out", str(out)]) == 0
    capsys.readouterr()
    header = out.read_text().splitlines()[0]
    paths = " ".join(f"{n}={p}" for n, p in files["paths"].items())
    command = (
        f"mergeopt export {mixture} --to trl --datasets {paths} --budget-samples 30 "
        f"--tokenizer {files['tokenizer']} --seed 5"
    )
    assert header == f"# Written by `{command}`."
    words = shlex.split(command)
    assert words[:2] == ["mergeopt", "export"] and run_cli(main, words[2:]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_doremi_records_the_command_in_its_metadata(tmp_path, capsys):
    mixture = run(tmp_path)
    assert run_cli(main, [str(mixture), "--to", "doremi", "--weights-are", "tokens"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["mergeopt"]["written_by"] == f"mergeopt export {mixture} --to doremi --weights-are tokens"


def test_mergekit_needs_the_run_recipe(tmp_path, capsys):
    fails(capsys, tmp_path, [str(run(tmp_path)), "--to", "mergekit"], "recipe.yaml")


@pytest.mark.parametrize("victim", ["mixture", "recipe", "dataset"])
def test_out_that_is_an_input_is_refused_and_left_as_it_was(tmp_path, capsys, files, victim):
    """``--out runs/x/mixture.json`` (or its recipe.yaml, or a training set) would replace the
    fit's result with a config: refused in one line, the file unchanged."""
    mixture = run(tmp_path)
    recipe = mixture.parent / "recipe.yaml"
    recipe.write_text("seed: 0\n")
    target = {"mixture": mixture, "recipe": recipe, "dataset": files["paths"]["a"]}[victim]
    before = target.read_bytes()
    argv = [str(mixture.parent), "--to", "doremi", *datasets_args(files), "--out", str(target)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: error: --out ") and "input" in err[0]
    assert target.read_bytes() == before


def test_stdout_by_default_and_no_traceback_in_a_real_process(tmp_path):
    mixture = run(tmp_path)
    done = run_module("export", str(mixture), "--to", "doremi")
    assert done.returncode == 0 and json.loads(done.stdout)["train_domain_weights"] == WEIGHTS
    bad = run_module("export", str(mixture), "--to", "nope")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "mergeopt: error: unknown --to format 'nope'; known: llamafactory, hf-datasets, hf-datasets-yaml, "
        "megatron, nemo, nemo-sft, llm-foundry, open-instruct, olmo-core, trl, axolotl, torchtune, doremi, "
        "mergekit, all"
    ]
    debug = run_module("export", str(mixture), "--to", "nope", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_malformed_jsonl_line_is_named_by_file_and_line_and_nothing_else(tmp_path, files):
    """A dataset line that is not JSON: one line naming the file and its 1-based line, the words a
    dev set's gets (read_jsonl), and no log line of the datasets library (which numbers rows from 0)."""
    from mergeopt.errors import UserError
    from mergeopt.objectives.data import read_jsonl

    bad = tmp_path / "broken.jsonl"
    records = [json.dumps({"prompt": f"b{i}", "completion": "xy"}) for i in range(20)]
    records[16] = '{"prompt": "b16", "completion" "xy"}'
    bad.write_text("\n".join(records) + "\n")
    expected = f"{bad.resolve()}:17: not valid JSON (Expecting ':' delimiter)"
    out = tmp_path / "exports"
    argv = [str(run(tmp_path)), "--to", "all", "--out", str(out), "--tokenizer", files["tokenizer"]]
    done = run_module("export", *argv, *datasets_args(files, b=str(bad)))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"mergeopt: error: {expected}"]
    assert not out.exists()
    with pytest.raises(UserError) as err:  # a dev set's words, for the same file
        read_jsonl(bad.resolve())
    assert str(err.value) == expected


def test_out_with_a_trailing_slash_is_a_directory_created_for_the_file(tmp_path, capsys, files):
    """``--out exports/`` names a directory even before it exists: the format's own file goes in
    it (created), as with an existing directory, not a file named ``exports``."""
    argv = [str(run(tmp_path)), "--to", "trl", "--tokenizer", files["tokenizer"], *datasets_args(files)]
    out = tmp_path / "exports"
    assert run_cli(main, [*argv, "--out", f"{out}/"]) == 0
    assert out.is_dir() and (out / "trl_datasets.yaml").is_file()
    assert capsys.readouterr().out.strip() == f"Wrote {out / 'trl_datasets.yaml'}"
    assert run_cli(main, [*argv, "--to", "llamafactory", "--out", f"{out}/"]) == 0  # beside it
    assert sorted(p.name for p in out.iterdir()) == ["llamafactory.yaml", "trl_datasets.yaml"]


def test_datasets_may_name_world_paths_as_the_recipe_does(tmp_path, capsys, files):
    """``--datasets code=smollm2://train/code.jsonl`` (how a recipe's train.data names a world's
    sets) is read from the world the fit used, as the recipe's own train.data is, not refused as a
    missing file ``smollm2:/train/code.jsonl``."""
    world = tmp_path / "world"
    (world / "train").mkdir(parents=True)
    for path in files["paths"].values():
        (world / "train" / path.name).write_text(path.read_text())
    mixture = run(tmp_path)
    data = json.loads(mixture.read_text()) | {"worlds": {"tiny": str(world)}}
    mixture.write_text(json.dumps(data))
    by_path = ["--datasets", *(f"{n}={p}" for n, p in files["paths"].items())]
    by_world = ["--datasets", *(f"{n}=tiny://train/{p.name}" for n, p in files["paths"].items())]
    common = [str(mixture), "--to", "llamafactory", "--tokenizer", files["tokenizer"]]
    assert run_cli(main, [*common, *by_world, "--out", str(tmp_path / "w.yaml")]) == 0, capsys.readouterr()
    assert run_cli(main, [*common, *by_path, "--out", str(tmp_path / "p.yaml")]) == 0
    written = (tmp_path / "w.yaml").read_text()
    assert str(world / "train" / "a.jsonl") in written
    body = [line for line in written.splitlines() if not line.startswith("#")]
    assert body == [
        line for line in (tmp_path / "p.yaml").read_text().splitlines() if not line.startswith("#")
    ]


def test_the_runs_training_data_not_on_this_disk_is_named(tmp_path, capsys, files):
    """A fit's run copied to another cluster: its recipe.yaml names train.data at the old paths,
    gone there. The refusal said '--datasets gives none for expert', of an option never passed;
    it names the recipe's missing path and the remedy."""
    import shutil

    mixture = run(tmp_path)
    moved = {n: tmp_path / "data" / p.name for n, p in files["paths"].items()}
    for name, path in moved.items():
        path.parent.mkdir(exist_ok=True)
        shutil.copy(files["paths"][name], path)
    data = "".join(f"    {n}: {p}\n" for n, p in moved.items())
    dev = f"data:\n  dev: [{{name: a, path: {moved['a']}}}]\n"
    recipe = (
        f"model:\n  base: {files['tokenizer']}\n  experts: {{a: x, b: y, c: z}}\n{dev}train:\n  data:\n{data}"
    )
    (mixture.parent / "recipe.yaml").write_text(recipe)
    moved["b"].unlink()  # the old path is gone
    line = fails(capsys, tmp_path, [str(mixture), "--to", "trl"], "train.data.b")
    assert line == (
        f"mergeopt: error: --to trl names each domain's data, and the run's {mixture.parent / 'recipe.yaml'} "
        f"names train.data.b {moved['b']}, which is not on this disk (moved since the fit?): pass "
        "--datasets b=PATH (every expert with a positive weight)"
    )
