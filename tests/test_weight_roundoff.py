"""A weight a hair below 0 (1 − 0.01 − 0.06 − 0.93 = −1.1e-16) is round-off of 0 everywhere a mixture is read.

Why: a script that writes its last weight as 1 − Σ others gets such a value; refusing it as
"negative" sent users hunting for a bug that was float arithmetic. Beyond round-off (−1e-6) a
negative weight is still refused, with the same message as before.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mergeopt.config import load_recipe
from mergeopt.errors import UserError
from mergeopt.evaluation.proxy import grid_weights, read_grid
from mergeopt.evaluation.table_checks import check_weights
from mergeopt.export.fitted_mixture import check_mixture
from mergeopt.merging.simplex import ROUNDOFF, mixture_problem, snap_roundoff
from mergeopt.run_files import MixtureFile

ROUNDED = 1 - 0.01 - 0.06 - 0.93  # −1.1e-16 in float64
FLOAT32 = float(np.float32(1) - np.float32(0.6) - np.float32(0.3) - np.float32(0.1))  # −3.7e-8


def test_the_values_are_what_the_tests_assume():
    assert -1e-15 < ROUNDED < 0 and -1e-7 < FLOAT32 < 0 and ROUNDOFF == 1e-6


@pytest.mark.parametrize("value", [ROUNDED, FLOAT32, -ROUNDOFF])
def test_round_off_is_a_mixture_and_snaps_to_zero(value):
    weights = {"a": 1.0, "b": value}
    assert mixture_problem(weights) is None
    assert snap_roundoff(weights) == {"a": 1.0, "b": 0.0}
    assert str(snap_roundoff(weights)["b"]) == "0.0"  # not −0.0 either


def test_beyond_round_off_is_still_negative():
    assert mixture_problem({"a": 1.000002, "b": -2e-6}) == "the weight of 'b' is negative (-2e-06)"


def test_the_sum_checked_is_that_of_the_snapped_weights():
    """Every reader judges the weights it keeps: 1.0000015 and −1e-6 sum to 1 within 1e-6, but
    once −1e-6 is read as 0 they do not, and mixture.json, --weights and recipes all refuse them
    (mixture.json once accepted them and `mergeopt merge` then refused the file it had accepted)."""
    weights = {"a": 1.0000015, "b": -1e-6}
    assert mixture_problem(weights) == "the weights sum to 1.0000015, not 1 (within 1e-06)"
    with pytest.raises(UserError, match="sum to 1.0000015"):
        check_mixture(weights, ["a", "b"], "--weights")
    with pytest.raises(ValueError, match="sum to 1.0000015"):
        MixtureFile.model_validate({"status": "complete", "weights": weights})


def test_recipe_weights_read_round_off_as_zero(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  base: /ckpt/base\n  experts: {math: /ckpt/math, code: /ckpt/code}\n"
        "data:\n  dev:\n    - {name: math, path: /dev/math.jsonl}\n"
        f"weights:\n  init: {{math: 1.0, code: {ROUNDED!r}}}\n"
    )
    assert load_recipe(path).weights.init == {"math": 1.0, "code": 0.0}


def test_merge_and_export_weights_read_round_off_as_zero():
    checked = check_mixture({"a": 0.3, "b": 0.7, "c": ROUNDED}, ["a", "b", "c"], "--weights")
    assert checked == {"a": 0.3, "b": 0.7, "c": 0.0}
    with pytest.raises(UserError, match=r"^--weights: the weight of 'c' is negative \(-0\.001\)$"):
        check_mixture({"a": 0.3, "b": 0.701, "c": -0.001}, ["a", "b", "c"], "--weights")


def test_mixture_json_reads_round_off_as_zero():
    mixture = MixtureFile.model_validate({"status": "complete", "weights": {"a": 1.0, "b": ROUNDED}})
    assert mixture.weights == {"a": 1.0, "b": 0.0}


def test_score_tables_read_round_off_as_zero(tmp_path):
    frame = pd.DataFrame({"w_a": [0.3, 1.0, 0.0], "w_b": [0.7, ROUNDED, 1.0], "loss": [1.0, 2.0, 3.0]})
    weights = check_weights(frame, ["w_a", "w_b"], "t.csv")
    assert weights[1].tolist() == [1.0, 0.0]
    frame.loc[1, "w_b"] = -0.001
    frame.loc[1, "w_a"] = 1.001
    with pytest.raises(UserError, match=r"^t\.csv line 3: weight w_b is negative \(-0\.001\)$"):
        check_weights(frame, ["w_a", "w_b"], "t.csv")


def test_grid_reads_round_off_as_zero(tmp_path):
    grid = tmp_path / "grid.csv"
    grid.write_text(f"w_a,w_b,loss_a\n0.3,0.7,1\n1.0,{ROUNDED!r},2\n0.0,1.0,3\n", encoding="utf-8")
    table = read_grid(grid, ["a", "b"])
    assert table["w_b"].tolist() == [0.7, 0.0, 1.0]
    assert grid_weights(table, ["a", "b"])[1].tolist() == [1.0, 0.0]


def test_a_pinned_weight_reads_round_off_as_zero():
    """weights.pinned is a recipe weight too: a pin written as 1 − Σ others was refused as 'below 0'."""
    from mergeopt.config.weights import WeightsSection

    assert WeightsSection.model_validate({"pinned": {"a": ROUNDED}}).pinned == {"a": 0.0}
    with pytest.raises(ValueError, match="'a' is pinned at -0.001, below 0"):
        WeightsSection.model_validate({"pinned": {"a": -0.001}})


def test_bounds_and_pins_read_round_off_outside_the_unit_interval_as_0_or_1():
    """A bound or pin written as 1 − Σ others can land a hair below 0 or above 1; both were refused
    as outside [0, 1]. Beyond round-off they still are, with the same message."""
    from mergeopt.config.weights import WeightsSection

    above = 1.0 + 1e-12
    section = WeightsSection.model_validate({"bounds": {"a": [ROUNDED, above]}, "pinned": {"b": above}})
    assert section.bounds == {"a": (0.0, 1.0)} and section.pinned == {"b": 1.0}
    with pytest.raises(ValueError, match=r"'a' has bounds \[-0.001, 0.5\]"):
        WeightsSection.model_validate({"bounds": {"a": [-0.001, 0.5]}})
    with pytest.raises(ValueError, match=r"'a' has bounds \[0, 1.001\]"):
        WeightsSection.model_validate({"bounds": {"a": [0, 1.001]}})
    with pytest.raises(ValueError, match="'b' is pinned at 1.001, above 1"):
        WeightsSection.model_validate({"pinned": {"b": 1.001}})
