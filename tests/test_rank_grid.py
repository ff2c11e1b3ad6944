"""rank RECIPE --grid: bad grid tables are one-line errors (exit 2) found before any model is loaded,
including a grid that lacks the score column of one of the recipe's metric objective terms.

The command runs in the test's process (``run_in_process``: the same ``mergeopt.cli.main`` and its
error handler); tests/test_bad_input.py shows what a fresh interpreter prints for such errors."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import recipe_tree, run_in_process


def grid_table(rows: int = 3, **changes) -> pd.DataFrame:
    """Three mixtures over alpha, beta and gamma with made-up losses (the first ``rows``), changed."""
    table = pd.DataFrame(
        {
            "w_alpha": [1.0, 0.5, 0.0],
            "w_beta": [0.0, 0.5, 0.5],
            "w_gamma": [0.0, 0.0, 0.5],
            "loss_arith": [1.0, 2.0, 3.0],
            "loss_markov": [2.0, 1.0, 3.0],
        }
    ).head(rows)
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
        ({"w_gamma": [0.0, 0.1, 0.5]}, "grid.csv line 3: weights sum to 1.1, not 1 (±0.005)"),
        (
            {"w_beta": [0.0, 0.5, 1.0], "w_gamma": [0.0, 0.0, -0.5]},
            "grid.csv line 4: weight w_gamma is negative (-0.5)",
        ),
        (
            {"w_beta": [0.0, "half", 0.5]},
            "grid.csv line 3: column w_beta (a mixture weight) is empty or not a finite number",
        ),
        ({"loss_markov": None}, "no column loss_markov with the true loss of dev set 'markov'"),
        (
            {"rows": 2},
            "grid.csv: only 2 mixture(s); the rank statistics need at least 3 (with 2, Spearman and Kendall "
            "are always ±1)",
        ),
        (
            {"loss_arith": [1.0, None, float("inf")]},
            "grid.csv line 3: column loss_arith (the true loss of dev set 'arith') is empty or not a finite "
            "number (and 1 more row(s) below)",
        ),
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
            "rerun `mergeopt train`",
        ),
        (
            {"score_exact_match:arith": [0.5, None, 0.25]},
            "grid.csv line 3: column score_exact_match:arith (the true score of 'exact_match:arith') is empty "
            "or not a finite number",
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
        ("seed: 0\nmodel:\n  base: b\n", "fit.yaml: a YAML file (a recipe?), not a mixture.json"),
    ],
)
def test_a_damaged_or_foreign_mixture_is_one_line(random_world, tmp_path, content, message):
    mixture = tmp_path / ("fit.yaml" if content and content.startswith("seed:") else "mixture.json")
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


# the same broken grid file: its data row 3 is file line 6 (a blank line and a cell that spans two
# lines come before it), which pandas alone would call row 2 (0-based) or "row 4" (index + 2)
GOOD_ROWS = (
    "w_alpha,w_beta,w_gamma,loss_arith,loss_markov,note\n"
    "1.0,0.0,0.0,1.0,2.0,plain\n"
    "\n"
    '0.5,0.5,0.0,2.0,1.0,"two\nlines"\n'
)
BROKEN = {
    "sum": (GOOD_ROWS + "0.0,0.7,0.5,3.0,3.0,off\n", "grid.csv line 6: weights sum to 1.2, not 1 (±0.005)"),
    "truth": (
        GOOD_ROWS + "0.0,0.5,0.5,,3.0,empty\n",
        "grid.csv line 6: column loss_arith{what} is empty or not a finite number",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_rank_calibrate_and_transfer_name_the_same_line(random_world, tmp_path, broken):
    """rank (grid and table mode), calibrate and transfer read one broken grid file and name the
    same place in it, the file and its line (header = line 1), in the same words."""
    text, message = BROKEN[broken]
    grid = tmp_path / "grid.csv"
    grid.write_text(text)
    good = tmp_path / "good.csv"
    good.write_text(GOOD_ROWS + "0.0,0.5,0.5,3.0,3.0,fine\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, tmp_path / "run")))
    out = str(tmp_path / "out")
    commands = {
        "rank": ("rank", str(recipe), "--grid", str(grid), "--out", out, "--quiet"),
        "calibrate": ("calibrate", str(recipe), "--grid", str(grid), "--out", out, "--quiet"),
        "rank tables": ("rank", "--proxy", str(good), "--truth", str(grid), "--out", out),
        "transfer": ("transfer", str(good), str(grid), "--out", out),
    }
    grid_mode = " (the true loss of dev set 'arith')"
    for name, argv in commands.items():
        result = run_in_process(*argv)
        what = grid_mode if name in ("rank", "calibrate") else ""
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.splitlines() == [f"mergeopt: error: {tmp_path}/{message.format(what=what)}"], (
            name
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_the_fitted_mixtures_nearest_grid_mixture_is_named_by_its_line(random_world, tmp_path):
    """The summary and report.md name the grid mixture nearest the fit as the errors name a row:
    its line in the grid file (here past a blank line: row 1, 0-based, is line 4)."""
    table = grid_table()
    header, *rows = table.to_csv(index=False).splitlines(keepends=True)
    grid = tmp_path / "grid.csv"
    grid.write_text(header + "\n" + "".join(rows))
    mixture = tmp_path / "mixture.json"
    weights = {"alpha": 0.45, "beta": 0.55, "gamma": 0.0}
    mixture.write_text(json.dumps({"status": "complete", "weights": weights, "method": {"name": "linear"}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree(random_world, tmp_path / "out")))
    argv = ("rank", str(recipe), "--grid", str(grid), "--mixture", str(mixture), "--quiet")
    result = run_in_process(*argv)
    assert result.returncode == 0, result.stderr
    fitted = json.loads((tmp_path / "out" / "rank_report.json").read_text())["fitted_mixture"]
    assert (fitted["row"], fitted["line"]) == (1, 4)
    said = [line for line in result.stdout.splitlines() if line.startswith("fitted mixture")]
    assert said == [
        f"fitted mixture ({mixture}): nearest grid mixture on line 4 of grid.csv at distance "
        f"{fitted['distance']:.3f}, normalized regret {fitted['regret']:.3f}"
    ]
    report = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert [line for line in report if line.startswith("Fitted mixture")] == [
        f"Fitted mixture: nearest grid mixture on line 4 of grid.csv (distance {fitted['distance']:.3f}), "
        f"normalised regret {fitted['regret']:.3f}."
    ]


def test_a_score_constant_over_the_grid_has_no_pick_or_regret(random_world, tmp_path):
    """A metric that is the same in every run (an exact match of 0 everywhere, at this size) ranks
    nothing: its pick would be a tie-break, so top-1, top-k and regret are null as its correlations
    are; the target's are numbers."""
    tree = recipe_tree(
        random_world,
        tmp_path / "out",
        objective={"terms": [{"kind": "exact_match", "dev": "arith"}]},
        search={"strategy": "grid"},
    )
    table = grid_table(**{"score_exact_match:arith": [0.0, 0.0, 0.0]})
    result = rank_cli(tmp_path, tree, table)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "rank_report.json").read_text())
    constant = report["metrics"]["exact_match:arith"]
    assert constant["spearman"] is None and constant["regret"] is None
    assert constant["top1_hit"] is None and constant["topk_hit"] is None and constant["topk_overlap"] is None
    for baseline in report["baselines"].values():
        assert baseline["exact_match:arith"]["regret"] is None
    assert isinstance(report["metrics"]["target"]["regret"], float)
    markdown = (tmp_path / "out" / "rank_report.md").read_text()
    assert "n/a" in markdown
