"""Property tests and fuzzing (hypothesis): inputs a user can get wrong never crash mergeopt.

For recipes and overrides, JSONL dev sets, grid CSVs, mixture JSON and the exporters: every valid
input is read back exactly (round trips), every invalid one ends in :class:`UserError` (one line,
exit code 2 at the command line), never in another exception.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergeopt.config import load_recipe
from mergeopt.errors import UserError, run_cli
from mergeopt.evaluation.proxy import read_grid
from mergeopt.export import shares
from mergeopt.export.command import main as export_main
from mergeopt.objectives.data import read_jsonl
from mergeopt.run_files import read_finished_mixture

FAST = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
BASE_RECIPE = {
    "model": {"base": "/ckpt/base", "experts": {"math": "/ckpt/math", "code": "/ckpt/code"}},
    "data": {"dev": [{"name": "math", "path": "/dev/math.jsonl"}]},
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _recipe_file(tmp_path: Path, tree) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _simplex(draw_weights: list[float]) -> list[float]:
    total = math.fsum(draw_weights)
    return [w / total for w in draw_weights]


# ----------------------------------------------------------------------------- recipes


@FAST
@given(
    lr=st.floats(min_value=1e-6, max_value=10, allow_nan=False),
    steps=st.integers(min_value=0, max_value=10**6),
    min_delta=st.floats(min_value=0.0, max_value=100),
    exclude=st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), max_size=3),
)
def test_valid_overrides_are_read_back_exactly(tmp_path_factory, lr, steps, min_delta, exclude):
    path = _recipe_file(tmp_path_factory.mktemp("r"), BASE_RECIPE)
    overrides = [
        f"optim.lr={lr!r}",
        f"optim.steps={steps}",
        f"optim.min_delta={min_delta!r}",
        f"model.exclude={json.dumps(exclude)}",
    ]
    recipe = load_recipe(path, overrides)
    assert (recipe.optim.lr, recipe.optim.steps) == (lr, steps)
    assert recipe.optim.min_delta == min_delta and list(recipe.model.exclude) == exclude


@FAST
@given(key=st.text(min_size=0, max_size=20), value=st.text(max_size=20))
def test_any_override_is_applied_or_refused_cleanly(tmp_path_factory, key, value):
    path = _recipe_file(tmp_path_factory.mktemp("r"), BASE_RECIPE)
    try:
        load_recipe(path, [f"{key}={value}"])
    except UserError as err:
        assert "\n" not in str(err)


@FAST
@given(payload=st.binary(max_size=100))
def test_any_bytes_as_a_recipe_are_a_user_error(tmp_path_factory, payload):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_bytes(payload)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


@FAST
@given(tree=JSON_VALUES)
def test_any_yaml_document_is_a_recipe_or_a_user_error(tmp_path_factory, tree):
    path = _recipe_file(tmp_path_factory.mktemp("r"), tree)
    with pytest.raises(UserError):
        load_recipe(path)  # none of these is a complete recipe


@FAST
@given(section=st.sampled_from(["optim", "data", "model", "search", "merge"]), junk=JSON_VALUES)
def test_a_mangled_section_is_a_user_error(tmp_path_factory, section, junk):
    tree = json.loads(json.dumps(BASE_RECIPE))
    tree[section] = junk
    path = _recipe_file(tmp_path_factory.mktemp("r"), tree)
    try:
        load_recipe(path)
    except UserError as err:
        assert "\n" not in str(err)


# ----------------------------------------------------------------------------- JSONL dev sets


@FAST
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8))
def test_jsonl_records_round_trip(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("d") / "dev.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert [r["text"] for r in read_jsonl(path)] == texts


@FAST
@given(payload=st.binary(max_size=200))
def test_any_bytes_are_records_or_a_user_error(tmp_path_factory, payload):
    path = tmp_path_factory.mktemp("d") / "dev.jsonl"
    path.write_bytes(payload)
    try:
        records = read_jsonl(path)
    except UserError as err:
        assert "\n" not in str(err)
    else:
        assert all(isinstance(r, dict) for r in records)


# ----------------------------------------------------------------------------- grid CSVs


@FAST
@given(
    # valid: for calibrate any runs; for a ranking 3 runs at least, of at least two mixtures (rounded
    # to 1e-6; one mixture repeated is refused)
    rows=st.lists(
        st.tuples(st.floats(0, 1), st.floats(0.01, 10, allow_nan=False)),
        min_size=1,
        max_size=10,
        unique_by=lambda r: round(r[0], 6),
    )
)
def test_valid_grid_tables_are_read_back_exactly(tmp_path_factory, rows):
    frame = pd.DataFrame(
        {"w_a": [r[0] for r in rows], "w_b": [1 - r[0] for r in rows], "loss_x": [r[1] for r in rows]}
    )
    path = tmp_path_factory.mktemp("g") / "grid.csv"
    frame.to_csv(path, index=False)
    for ranked in (False, True):
        if ranked and len(rows) < 3:
            with pytest.raises(UserError, match=f"only {len(rows)} mixture"):
                read_grid(path, ["a", "b"], ranked=ranked)
            continue
        table = read_grid(path, ["a", "b"], ranked=ranked)
        np.testing.assert_array_equal(table["loss_x"].to_numpy(), frame["loss_x"].to_numpy())


@FAST
@given(text=st.text(alphabet=st.sampled_from(list("w_ab,loss\n0.51-x")), max_size=120))
def test_any_grid_text_is_a_table_or_a_user_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("g") / "grid.csv"
    path.write_text(text)
    try:
        read_grid(path, ["a", "b"])
    except UserError as err:
        assert "\n" not in str(err)


# ----------------------------------------------------------------------------- mixture JSON


@FAST
@given(data=JSON_VALUES)
def test_any_json_is_a_finished_mixture_or_a_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("m") / "mixture.json"
    path.write_text(json.dumps(data))
    try:
        read_finished_mixture(path)
    except UserError as err:
        assert "\n" not in str(err)
    else:
        raise AssertionError("a random document passed as a finished mixture")


# ----------------------------------------------------------------------------- exporters


def _export(tmp_path: Path, weights: dict, fmt: str, capsys) -> tuple[int, str, str]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    mixture = {
        "status": "complete",
        "weights": weights,
        "method": {"name": "linear", "scale": 1.0},
        "seed": 0,
    }
    (run / "mixture.json").write_text(json.dumps(mixture))
    capsys.readouterr()
    code = run_cli(export_main, [str(run / "mixture.json"), "--to", fmt])
    out = capsys.readouterr()
    return code, out.out, out.err


@FAST
@given(
    names=st.lists(NAMES, min_size=2, max_size=6, unique=True),
    raw=st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6),
)
def test_every_valid_mixture_round_trips_through_the_exports(tmp_path_factory, capsys, names, raw):
    weights = dict(zip(names, _simplex(raw[: len(names)])))
    tmp = tmp_path_factory.mktemp("e")
    code, out, err = _export(tmp, weights, "doremi", capsys)
    assert code == 0, err
    exported = json.loads(out[out.index("{") :])["train_domain_weights"]
    assert exported == pytest.approx(weights, abs=1e-12)
    code, out, err = _export(tmp, weights, "llamafactory", capsys)
    assert code == 0, err
    config = yaml.safe_load(io.StringIO(out))
    probs = [float(p) for p in str(config["interleave_probs"]).split(",")]
    assert config["dataset"].split(",") == names
    assert probs == pytest.approx([weights[n] for n in names], abs=1e-12)


@FAST
@given(
    weights=st.dictionaries(
        NAMES,
        st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=3),
        min_size=1,
        max_size=5,
    )
)
@example(weights={"a": "1"})  # a number written as text: pydantic's lax mode once read it as 1.0
@example(weights={"a": True})
def test_every_invalid_mixture_fails_cleanly(tmp_path_factory, capsys, weights):
    numbers = [v for v in weights.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    valid = (
        len(weights) >= 1
        and len(numbers) == len(weights)
        and all(math.isfinite(v) and v >= 0 for v in numbers)
        and abs(math.fsum(numbers) - 1) <= 1e-6
    )
    code, out, err = _export(tmp_path_factory.mktemp("e"), weights, "doremi", capsys)
    if valid:
        assert code == 0, err
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("mergeopt: error: ")


@FAST
@given(
    raw=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=6),
    lengths=st.lists(st.floats(1.0, 5000.0), min_size=6, max_size=6),
)
def test_token_and_sample_shares_convert_back_and_forth(raw, lengths):
    names = [f"d{i}" for i in range(len(raw))]
    tokens = dict(zip(names, _simplex(raw)))
    mean = dict(zip(names, lengths))
    samples = shares.convert(tokens, mean, "samples")
    assert math.fsum(samples.values()) == pytest.approx(1.0, abs=1e-12)
    assert shares.convert(samples, mean, "tokens") == pytest.approx(tokens, rel=1e-9, abs=1e-12)


@FAST
@given(exact=st.lists(st.floats(0, 1000), min_size=1, max_size=8))
def test_apportioned_counts_add_up_and_stay_within_one(exact):
    values = {f"d{i}": v for i, v in enumerate(exact)}
    total = round(math.fsum(exact))
    counts = shares.apportion(values, total)
    assert sum(counts.values()) == total or total < sum(math.floor(v) for v in exact)
    assert all(math.floor(values[n]) <= c <= math.floor(values[n]) + 1 for n, c in counts.items())
