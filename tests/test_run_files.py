"""The typed run files: mixture.json, rank_report.json, calibration.json, transfer_report.json and diagnose.json.

Compared against: what the writers really write (a fresh fit, rank, calibrate, transfer and diagnose run validate with
no extra keys, and read back equal), the schema_version rules (missing means 1, newer is refused in
one line), and the JSON Schemas published in docs/ (equal to the models', so they cannot drift).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeopt.config import load_recipe
from mergeopt.errors import UserError, run_cli
from mergeopt.evaluation.calibrate import main as calibrate_main
from mergeopt.evaluation.diagnose import main as diagnose_main
from mergeopt.evaluation.rank import main as rank_main
from mergeopt.evaluation.transfer import main as transfer_main
from mergeopt.export.command import main as export_main
from mergeopt.fit import fit
from mergeopt.run_files import (
    RUN_FILES,
    SCHEMA_VERSION,
    MixtureConstraints,
    MixtureFile,
    RankReport,
    TransferReport,
    json_schemas,
    read_finished_mixture,
    read_run_file,
)
from tests.conftest import REPO, recipe_tree
from tests.test_transfer import LARGE, SMALL, write_hand_tables

SCHEMAS = REPO / "docs" / "reference" / "schemas"


@pytest.fixture(scope="module")
def written(random_world, tmp_path_factory) -> dict[str, Path]:
    """One fresh file of each kind, as the commands write them."""
    root = tmp_path_factory.mktemp("runs")
    recipe = root / "recipe.yaml"
    tree = recipe_tree(random_world, root / "fit", search={"strategy": "grid", "grid": {"divisions": 2}})
    recipe.write_text(yaml.safe_dump(tree))
    fit(load_recipe(recipe), progress=False, log=lambda _m: None)
    small, large = write_hand_tables(root)
    assert transfer_main([small, large, "--out", str(root / "transfer"), "--bootstrap", "50"]) == 0
    rank = ["--proxy", SMALL, "--truth", LARGE, "--metrics", "metric/the_pile_arxiv_val_loss"]
    assert rank_main([*rank, "--out", str(root / "rank"), "--bootstrap", "50"]) == 0
    assert diagnose_main([str(recipe), "--points", "3", "--out", str(root / "diagnose"), "--quiet"]) == 0
    grid = root / "grid.csv"
    grid.write_text("w_alpha,w_beta,w_gamma,loss_arith,loss_markov\n1,0,0,3.0,3.2\n0.5,0.5,0,2.9,3.0\n")
    calibrate = [str(recipe), "calibrate.candidates=3", "calibrate.samples=50", "--grid", str(grid)]
    assert calibrate_main([*calibrate, "--out", str(root / "calibration"), "--quiet"]) == 0
    return {
        "calibration.json": root / "calibration" / "calibration.json",
        "mixture.json": root / "fit" / "mixture.json",
        "rank_report.json": root / "rank" / "rank_report.json",
        "transfer_report.json": root / "transfer" / "transfer_report.json",
        "diagnose.json": root / "diagnose" / "diagnose.json",
    }


@pytest.mark.parametrize("model", RUN_FILES, ids=lambda m: m.FILE)
def test_what_the_writers_write_is_the_model_with_nothing_extra(written, model):
    raw = json.loads(written[model.FILE].read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and list(raw)[0] == "schema_version"
    parsed = read_run_file(model, written[model.FILE])
    assert parsed.model_extra == {}  # every key the writer wrote is declared in the schema
    assert parsed.to_json() == raw  # and reads back to the same document, key order included


def test_the_fit_answer_is_typed(written):
    mixture = read_finished_mixture(written["mixture.json"].parent)  # a run directory works too
    assert isinstance(mixture, MixtureFile) and mixture.strategy == "grid"
    assert mixture.names == ["alpha", "beta", "gamma"] and abs(sum(mixture.weights.values()) - 1) < 1e-12


@pytest.mark.parametrize("model", RUN_FILES, ids=lambda m: m.FILE)
def test_a_newer_schema_version_is_one_line(written, model, tmp_path):
    raw = json.loads(written[model.FILE].read_text())
    path = tmp_path / model.FILE
    path.write_text(json.dumps({**raw, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError) as err:
        read_run_file(model, path)
    assert str(err.value) == (
        f"{path}: schema_version {SCHEMA_VERSION + 1} is newer than mergeopt 0.1.0 reads "
        f"(up to {SCHEMA_VERSION}); upgrade mergeopt to read it"
    )


def test_a_newer_mixture_is_refused_by_the_commands_that_read_one(written, tmp_path, capsys):
    raw = json.loads(written["mixture.json"].read_text())
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps({**raw, "schema_version": 99}))
    assert run_cli(export_main, [str(path), "--to", "doremi"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mergeopt: error: {path}: schema_version 99 is newer than mergeopt 0.1.0 reads (up to 1); "
        "upgrade mergeopt to read it"
    ]


def test_files_from_before_versioning_are_version_1_and_dropped_keys_are_tolerated(written, tmp_path):
    raw = json.loads(written["mixture.json"].read_text())
    del raw["schema_version"]
    raw["temperature"] = 1.0  # written by 0.1 releases before weights.temperature was removed
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps(raw))
    old = read_finished_mixture(path)
    assert old.schema_version == 1 and old.model_extra == {"temperature": 1.0}
    assert old.weights == json.loads(written["mixture.json"].read_text())["weights"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schema_version": "two"}, "schema_version 'two' is not a positive whole number"),
        ({"weights": {"alpha": 0.5, "beta": 0.6}}, "weights: the weights sum to 1.1, not 1 (within 1e-06)"),
        ({"weights": {"alpha": -0.5, "beta": 1.5}}, "weights: the weight of 'alpha' is negative (-0.5)"),
        ({"seed": "zero"}, "seed: Input should be a valid integer"),
    ],
)
def test_a_wrong_field_names_the_file_and_the_key(written, tmp_path, change, message):
    raw = json.loads(written["mixture.json"].read_text())
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps({**raw, **change}))
    with pytest.raises(UserError, match="^" + str(path).replace(".", r"\.") + ": ") as err:
        read_finished_mixture(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_reports_are_typed(written):
    rank = read_run_file(RankReport, written["rank_report.json"])
    transfer = read_run_file(TransferReport, written["transfer_report.json"])
    metric = "metric/the_pile_arxiv_val_loss"
    assert list(rank.metrics) == [metric, "mean"] and rank.metrics[metric].n > 0
    direct = transfer.comparisons["small_to_large"].metrics["loss"]
    assert direct.n == 4 and direct.choice_rank >= 1 and transfer.skipped_metrics == {"LARGE": ["extra"]}


def test_the_schemas_are_published_in_one_place_only(tmp_path):
    """``python -m mergeopt.run_files`` without DIR wrote the schemas into the working directory, and
    five copies at the repository's root were committed beside docs/reference/schemas, where the
    test above never looks: they would go stale unseen. DIR is now required (exit 2, nothing
    written), and the only schema files in the repository are the published ones."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mergeopt.run_files"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and done.stderr.startswith("usage: python -m mergeopt.run_files DIR")
    assert list(tmp_path.iterdir()) == []
    tracked = subprocess.run(["git", "ls-files", "*.schema.json"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0:  # a git checkout (not an unpacked sdist)
        strays = [p for p in tracked.stdout.split() if Path(p).parent != Path("docs/reference/schemas")]
        assert strays == [], f"schema files outside docs/reference/schemas: {strays}"


def test_the_published_json_schemas_are_the_models():
    """docs/reference/schemas/*.schema.json, regenerated by `python -m mergeopt.run_files docs/reference/schemas`."""
    for name, schema in json_schemas().items():
        published = SCHEMAS / name.replace(".json", ".schema.json")
        assert published.is_file(), f"{published} is missing: regenerate it"
        assert json.loads(published.read_text()) == schema, f"{published} is stale: regenerate it"


def test_a_recorded_cap_counts_one_unit():
    record = {
        "lower": {"a": 0.0, "b": 0.0},
        "upper": {"a": 1.0, "b": 1.0},
        "upper_from": {"a": "", "b": ""},
        "bounds": {},
        "pinned": {},
        "max_epochs": 2.0,
    }
    tokens = MixtureConstraints.model_validate(record | {"token_budget": 10, "tokens": {"a": 5, "b": 5}})
    samples = MixtureConstraints.model_validate(record | {"sample_budget": 4, "samples": {"a": 2, "b": 2}})
    assert (tokens.cap_unit, tokens.source_sizes()) == ("tokens", {"a": 5, "b": 5})
    assert (samples.cap_unit, samples.source_sizes()) == ("samples", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="a repetition cap counts tokens or samples, not both"):
        MixtureConstraints.model_validate(record | {"token_budget": 10, "samples": {"a": 2, "b": 2}})
