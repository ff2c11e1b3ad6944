"""rank RECIPE --grid: bad grid tables are one-line errors (exit 2) found before any model is loaded,
including a grid that lacks the score column of one of the recipe's metric objective terms.

The command runs in the test's process (``run_in_process``: the same ``mergeopt.cli.main`` and its
error handler); tests/test_bad_input.py shows what a fresh interpreter prints for such errors."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import recipe_tree, run_in_process


def grid_table(**changes) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "w_alpha": [1.0, 0.5, 0.0],
            "w_beta": [0.0, 0.5, 0.5],
            "w_gamma": [0.0, 0.0, 0.5],
            "loss_arith": [1.0, 2.0, 3.0],
            "loss_markov": [2.0, 1.0, 3.0],
        }
    )
    for column, values in changes.items():
        if values is None:
            table = table.drop(columns=column)
        else:
            table[column] = values
    return table


def rank_cli(tmp_path, tree: dict, table: pd.DataFrame, *extra: str) -> subprocess.CompletedProcess:
    """``mergeopt rank RECIPE --grid GRID.csv`` on a written recipe and grid table."""
    grid = tmp_path / "grid.csv"
    table.to_csv(grid, index=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return run_in_process("rank", str(recipe), "--grid", str(grid), "--quiet", *extra)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"w_delta": [0.0, 0.0, 0.0]}, "column w_delta names an expert the recipe does not have"),
        ({"w_gamma": None}, "no weight column w_gamma"),
        ({"w_gamma": [0.0, 0.1, 0.5]}, "row 3 weights sum to 1.100000"),
        ({"loss_markov": None}, "no column loss_markov with the true loss of dev set 'markov'"),
        ({"loss_arith": [1.0, None, 2.0]}, "must be a number in every row, row 2 is not"),
    ],
)
def test_bad_grid_tables(random_world, tmp_path, changes, message):
    result = rank_cli(tmp_path, recipe_tree(random_world, tmp_path / "out"), grid_table(**changes))
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {},
            "no column score_exact_match:arith with the true score of objective term 'exact_match:arith'; "
            "rerun python -m mergeopt.train",
        ),
        (
            {"score_exact_match:arith": [0.5, None, 0.25]},
            "column score_exact_match:arith (the true score of 'exact_match:arith') must be a number in every row",
        ),
    ],
)
def test_grid_without_a_metric_terms_scores(random_world, tmp_path, changes, message):
    tree = recipe_tree(
        random_world,
        tmp_path / "out",
        objective={"terms": [{"kind": "exact_match", "dev": "arith"}]},
        search={"strategy": "grid"},
    )
    result = rank_cli(tmp_path, tree, grid_table(**changes))
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"weights": {"alpha": 0.5,', "not valid JSON (line 1"),
        ('{"status": "running", "weights": {"alpha": 1.0}}', "the fit did not finish"),
        (
            '{"status": "complete", "weights": {"alpha": 0.5, "delta": 0.5}}',
            "its weights name ['alpha', 'delta']",
        ),
        (None, "does not exist"),
    ],
)
def test_a_damaged_or_foreign_mixture_is_one_line(random_world, tmp_path, content, message):
    mixture = tmp_path / "mixture.json"
    if content is not None:
        mixture.write_text(content)
    tree = recipe_tree(random_world, tmp_path / "out")
    result = rank_cli(tmp_path, tree, grid_table(), "--mixture", str(mixture))
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_missing_grid(random_world, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, tmp_path / "out")))
    result = run_in_process("rank", str(recipe))
    assert result.returncode == 2 and "no grid table" in result.stderr
