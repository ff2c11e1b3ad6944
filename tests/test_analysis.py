"""The run-directory API (mergeopt.reporting.analysis), report.md, and notebooks/analysis.ipynb executed on real runs.

Two tiny-world runs are made once: a gradient fit ranked against the tiny grid of trained mixtures
(tests/data/tiny_grid/grid.csv, mergeopt.worlds.train's output for recipes/tiny_grid.yaml) and a
zero-order (grid search) fit. The notebook is executed with nbclient on both, so a change in the
run layout or the API that breaks it fails here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergeopt.config import load_recipe
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.reporting import analysis
from mergeopt.runtime.exact_csv import read_csv
from tests.conftest import REPO, environment, recipe_tree, repo_pythonpath, run_in_process

GRID = REPO / "tests" / "data" / "tiny_grid" / "grid.csv"
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def _tiny_fit(tiny_world, out: Path, *overrides: str) -> Path:
    cache = tiny_world.parent
    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml",
        [f"output_dir={out}", f"world.cache_dir={cache}", "optim.steps=40", *overrides],
    )
    fit(recipe, progress=False, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def ranked_run(tiny_world, tmp_path_factory):
    # the grid's runs drew sample shares (recipes/tiny_grid.yaml): ranked in the same unit
    out = tmp_path_factory.mktemp("ranked")
    return _tiny_fit(tiny_world, out, f"rank.grid={GRID}", "rank.bootstrap=50", "weights.unit=samples")


@pytest.fixture(scope="module")
def search_run(tiny_world, tmp_path_factory):
    return _tiny_fit(
        tiny_world, tmp_path_factory.mktemp("search"), "search.strategy=grid", "search.grid.divisions=2"
    )


def test_open_run_reads_what_fit_wrote(ranked_run):
    run = analysis.open_run(ranked_run)
    mixture = json.loads((ranked_run / "mixture.json").read_text())
    assert run.weights.to_dict() == mixture["weights"] and run.strategy == "gradient"
    trace = read_csv(ranked_run / "trace.csv")  # exact under every pandas
    np.testing.assert_array_equal(run.weight_path(), trace[[f"w_{n}" for n in run.expert_names]].to_numpy())
    table = analysis.mixture_table(run)
    assert table.loc["fitted", "heldout_loss"] == mixture["heldout_loss"]
    assert table.loc["markov only", "dev_loss"] == mixture["expert_dev_loss"]["markov"]
    assert table.loc["uniform", "w_arith"] == 0.25
    # the rank pairs are the grid's weights with the proxy's and the grid's own scores
    grid = pd.read_csv(GRID)
    pairs = run.rank_pairs
    np.testing.assert_allclose(
        pairs[[c for c in pairs if c.startswith("w_")]], grid[[c for c in grid if c.startswith("w_")]]
    )
    np.testing.assert_allclose(pairs["truth_arith"], grid["loss_arith"])
    ranks = analysis.rank_table(run)
    assert ranks.loc["target", "spearman"] == run.rank["metrics"]["target"]["spearman"]
    from scipy import stats

    expected = stats.spearmanr(pairs["proxy_target"], pairs["truth_target"]).statistic
    assert ranks.loc["target", "spearman"] == pytest.approx(expected, abs=1e-12)
    # beside the baselines: the proxy's rows are the table's, each baseline's its report entry, and
    # interpolation's Spearman is that of interpolating the experts' (vertices') proxy losses
    against = analysis.rank_table(run, baselines=True)
    assert against.index.names == ["metric", "predictor"]
    assert set(run.rank["baselines"]) == {"interpolation", "lightgbm_loo", "mixing_law_loo"}
    assert list(against.loc["target"].index) == [
        "merged proxy",
        "interpolation Σ w_i s(θ_i)",
        "LightGBM, leave-one-out",
        "mixing law c + k·exp(t·w), leave-one-out",
    ]
    pd.testing.assert_frame_equal(
        against.xs("merged proxy", level="predictor"), ranks, check_names=False, check_dtype=False
    )
    for name, label in (
        ("lightgbm_loo", "LightGBM, leave-one-out"),
        ("interpolation", "interpolation Σ w_i s(θ_i)"),
    ):
        for metric, statistics in run.rank["baselines"][name].items():
            assert against.loc[(metric, label), "spearman"] == statistics["spearman"]
            assert against.loc[(metric, label), "regret"] == statistics["regret"]
    assert against.loc[("target", "interpolation Σ w_i s(θ_i)"), "spearman"] == pytest.approx(
        stats.spearmanr(pairs["interpolation_target"], pairs["truth_target"]).statistic, abs=1e-12
    )


def test_unfinished_or_missing_runs_are_one_line_errors(tmp_path, ranked_run):
    with pytest.raises(UserError, match="does not exist"):
        analysis.open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="mixture.json does not exist"):
        analysis.open_run(tmp_path / "empty")
    partial = tmp_path / "partial"
    partial.mkdir()
    data = json.loads((ranked_run / "mixture.json").read_text()) | {"status": "running"}
    (partial / "mixture.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="the fit did not finish \\(status 'running', not 'complete'\\)"):
        analysis.open_run(partial)
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoint").mkdir(parents=True)  # a fit stopped mid-way: its state, no answer yet
    with pytest.raises(UserError, match="the fit has not finished .*rerun the fit's command to finish it"):
        analysis.open_run(interrupted)
    lock = tmp_path / ".interrupted.lock"
    assert not lock.exists()  # the probe above created nothing beside the run


def test_a_run_that_a_fit_is_writing_says_so(tmp_path):
    """A fit in progress holds its directory: opening it said 'rerun the fit's command', though the
    fit is live. The probe of its lock takes nothing from it, and the fit's own lock stays."""
    from mergeopt.runtime.rundir import owned

    live = tmp_path / "live"
    (live / "checkpoint").mkdir(parents=True)
    with owned(live, "fit"):
        with pytest.raises(
            UserError, match=r"live: mergeopt fit \(pid \d+\) is writing it now: open the run"
        ):
            analysis.open_run(live)
        with pytest.raises(UserError, match="is in use by mergeopt fit"):  # still held by the fit
            with owned(live, "rank"):
                pass
    with pytest.raises(UserError, match="the fit has not finished"):  # the fit gone: a stopped one
        analysis.open_run(live)


def _hand_made_run(root: Path, trace: str) -> Path:
    """A finished fit's directory of two experts with ``trace`` as its trace.csv (no fit needed)."""
    root.mkdir()
    mixture = {"schema_version": 1, "status": "complete", "weights": {"a": 0.25, "b": 0.75}}
    (root / "mixture.json").write_text(json.dumps(mixture))
    (root / "trace.csv").write_text(trace)
    return root


def test_damaged_recipe_or_trace_of_other_experts_are_one_line_errors(tmp_path):
    """open_run on a run whose recipe.yaml is not YAML raised yaml's ParserError (or a
    UnicodeDecodeError); a trace.csv of other experts, or cut short in its header, opened and then
    failed in weight_path or plot_losses with pandas' KeyError. Each is one line naming the file."""
    good = "step,loss,heldout_loss,w_a,w_b\n0,1.0,1.1,0.5,0.5\n1,,1.0,0.25,0.75\n"
    run = analysis.open_run(_hand_made_run(tmp_path / "good", good))
    np.testing.assert_array_equal(run.weight_path(), [[0.5, 0.5], [0.25, 0.75]])
    other = _hand_made_run(tmp_path / "other", good.replace("w_b", "w_c"))
    with pytest.raises(
        UserError, match=r"other/trace.csv: no column w_b \(it has step, loss, heldout_loss, w_a, w_c\)"
    ):
        analysis.open_run(other)
    short = _hand_made_run(tmp_path / "short", "step,loss,heldout_")
    with pytest.raises(UserError, match=r"short/trace.csv: no column heldout_loss, w_a, w_b "):
        analysis.load_run(short)
    broken = _hand_made_run(tmp_path / "broken", good)
    (broken / "recipe.yaml").write_text("model: [unclosed\n  x: {\n")
    with pytest.raises(UserError, match=r"broken/recipe.yaml:2: not valid YAML \(expected ',' or ']'"):
        analysis.open_run(broken)
    (broken / "recipe.yaml").write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(UserError, match=r"broken/recipe.yaml: not UTF-8 text"):
        analysis.open_run(broken)
    (broken / "recipe.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match=r"broken/recipe.yaml: a recipe must be a mapping of keys, got list"):
        analysis.open_run(broken)


def test_a_rank_checks_own_directory_opens_and_reports_its_simplex(ranked_run, tmp_path):
    """``mergeopt rank --out DIR`` without a fit: open_run reads its report (there is no mixture to
    ask for), and report.md shows the simplex.png written beside it."""
    import shutil

    from mergeopt.reporting.run_report import write_report

    for name in ("rank_report.json", "rank_pairs.csv", "rank_scatter.png"):
        shutil.copy(ranked_run / name, tmp_path / name)
    run = analysis.open_run(tmp_path)
    assert run.mixture is None and run.expert_names == ["arith", "reverse", "brackets", "markov"]
    assert analysis.rank_table(run).loc["target", "spearman"] == run.rank["metrics"]["target"]["spearman"]
    with pytest.raises(UserError, match="no mixture.json"):
        _ = run.weights
    report = write_report(tmp_path).read_text()
    assert (tmp_path / "simplex.png").is_file() and "(simplex.png)" in report
    assert "(simplex.png)" in (ranked_run / "report.md").read_text()  # a fit's report: once, in its section
    assert (ranked_run / "report.md").read_text().count("(simplex.png)") == 1


def test_a_mixture_without_the_closing_losses_is_a_one_line_error(tmp_path):
    """mixture_table on a mixture.json (schema 1, where the losses are optional) that lacks the
    uniform or an expert's loss raised KeyError inside pandas' row building; null losses (not finite,
    or no held-out part) stay NaN in the table."""
    mixture = {
        "schema_version": 1,
        "status": "complete",
        "weights": {"a": 0.25, "b": 0.75},
        "dev_loss": 1.0,
        "heldout_loss": None,
        "uniform_dev_loss": 1.5,
        "uniform_heldout_loss": None,
        "expert_dev_loss": {"a": 2.0, "b": None},
        "expert_heldout_loss": {"a": None, "b": None},
    }
    (tmp_path / "mixture.json").write_text(json.dumps(mixture))
    table = analysis.mixture_table(analysis.open_run(tmp_path))
    assert table.loc["a only", "dev_loss"] == 2.0 and table["heldout_loss"].isna().all()
    assert math.isnan(table.loc["b only", "dev_loss"]) and table.loc["uniform", "dev_loss"] == 1.5
    del mixture["uniform_dev_loss"], mixture["expert_dev_loss"]["b"]
    (tmp_path / "mixture.json").write_text(json.dumps(mixture))
    with pytest.raises(UserError, match=r"mixture.json: no uniform_dev_loss, expert_dev_loss.b \(written by"):
        analysis.mixture_table(analysis.open_run(tmp_path))


def test_simplex_coordinates():
    corners = analysis.simplex_vertices(3)
    np.testing.assert_allclose(analysis.simplex_coordinates(np.eye(3)), corners)
    np.testing.assert_allclose(analysis.simplex_coordinates([1 / 3] * 3)[0], corners.mean(axis=0))
    assert np.linalg.norm(corners[2] - corners[0]) == pytest.approx(1.0)  # equilateral
    five = analysis.simplex_coordinates(np.eye(5))
    np.testing.assert_allclose(np.linalg.norm(five, axis=1), 1.0)  # a regular pentagon's corners
    np.testing.assert_allclose(analysis.simplex_coordinates(np.full(5, 0.2))[0], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(analysis.simplex_coordinates([[0.3, 0.7]]), [[0.7, 0.0]])


def test_report_links_existing_figures_and_states_the_numbers(ranked_run, search_run):
    for run_dir in (ranked_run, search_run):
        report = (run_dir / "report.md").read_text()
        links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
        assert links and all((run_dir / link).is_file() for link in links)
        mixture = json.loads((run_dir / "mixture.json").read_text())
        fitted = next(line for line in report.splitlines() if line.startswith("| fitted |"))
        assert f"{mixture['heldout_loss']:.4f}" in fitted
        assert all(f"{w:.4f}" in fitted for w in mixture["weights"].values())
    ranked = (ranked_run / "report.md").read_text()
    spearman = json.loads((ranked_run / "rank_report.json").read_text())["metrics"]["target"]["spearman"]
    assert "## Does the merged proxy rank mixtures" in ranked and f"{spearman:.3f}" in ranked
    # the proxy beside the baselines, as rank_report.md shows it
    assert (
        "Against the baselines (target;" in ranked
        and "| LightGBM, leave-one-out | n - 1 real runs |" in ranked
    )
    assert "search_curve.png" in (search_run / "report.md").read_text()


def test_a_metric_fits_report_shows_its_objective_terms(tiny_world, tmp_path):
    """A zero-order fit of a metric: report.md names the objective (not the loss target it did not
    optimise) and holds the terms' scores of every mixture, fit / held-out, as mixture.json has them."""
    run_dir = _tiny_fit(
        tiny_world,
        tmp_path / "metric",
        "search.strategy=dirichlet",
        "search.dirichlet.samples=3",
        "objective.terms=[{kind: exact_match, dev: arith}, {kind: loss, dev: reverse, weight: 0.5}]",
    )
    mixture = json.loads((run_dir / "mixture.json").read_text())
    labels = [t["label"] for t in mixture["objective"]["terms"]]
    report = (run_dir / "report.md").read_text()
    assert f"objective **{', '.join(labels)}**" in report and "target **" not in report
    section = report.split("### Objective terms", 1)[1]
    for row, parts in mixture["objective"]["scores"].items():
        (line,) = [x for x in section.splitlines() if x.startswith(f"| {row} |")]
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells == [f"{parts['fit'][t]:.4f} / {parts['heldout'][t]:.4f}" for t in labels], line
    from mergeopt.reporting.outcome_warnings import warning_lines

    notes = [line for line in report.splitlines() if line.startswith("**Note:** ")]
    assert notes == [f"**Note:** {w[0].upper()}{w[1:]}." for w in warning_lines(mixture)]  # as printed


def test_rank_cli_adds_its_section_to_the_report(ranked_run, tmp_path):
    import shutil

    from mergeopt.errors import run_cli
    from mergeopt.evaluation import rank

    run_dir = tmp_path / "run"
    shutil.copytree(ranked_run, run_dir)
    for name in ("rank_report.json", "rank_report.md", "rank_pairs.csv", "rank_scatter.png", "report.md"):
        (run_dir / name).unlink()
    code = run_cli(
        rank.main, [str(run_dir / "recipe.yaml"), f"output_dir={run_dir}", "--grid", str(GRID), "--quiet"]
    )
    assert code == 0
    report = (run_dir / "report.md").read_text()
    assert "## Recommended mixture" in report and "## Does the merged proxy rank mixtures" in report


def _executed_notebook(run_dir: Path) -> list:
    """The outputs of notebooks/analysis.ipynb run on ``run_dir``; fails on a cell that raises."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        "MERGEOPT_RUN": str(run_dir),
        "PYTHONPATH": repo_pythonpath(),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    with environment(env):
        nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


@pytest.mark.parametrize("which", ["ranked", "search"])
def test_notebook_runs_on_a_run_directory(which, ranked_run, search_run):
    run_dir = ranked_run if which == "ranked" else search_run
    outputs = _executed_notebook(run_dir)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images == (3 if which == "ranked" else 2)  # loss curve, simplex (+ proxy vs truth)
    tables = sum("text/html" in o.get("data", {}) for o in outputs)
    assert tables >= (3 if which == "ranked" else 2)  # weights, mixture table (+ rank table)
    assert math.isfinite(json.loads((run_dir / "mixture.json").read_text())["dev_loss"])


def test_a_rank_of_two_tables_opens_draws_and_runs_the_notebook(tmp_path):
    """``mergeopt rank --proxy A --truth B --out DIR`` (no fit): its mixtures are the tables' own
    weight columns (not ``w_``), its headline metric ``mean`` (no target). The simplex showed an
    empty figure, plot_proxy_vs_truth's default refused, report.md (rewritten by a later diagnose or
    fit there) failed on the grid the report has not, and the notebook stopped at ``run.weights``
    saying the fit had not finished."""
    import matplotlib

    matplotlib.use("Agg")
    from mergeopt.errors import run_cli
    from mergeopt.evaluation import rank
    from mergeopt.reporting.run_report import write_report

    regmix = REPO / "tests" / "data" / "regmix"
    tables = [f"{regmix}/test_mixture_{m}.csv+{regmix}/test_pile_loss_{m}.csv" for m in ("1m", "60m")]
    out = tmp_path / "rank_out"
    argv = ["--proxy", tables[0], "--truth", tables[1], "--bootstrap", "20", "--out", str(out), "--quiet"]
    assert run_cli(rank.main, argv) == 0
    run = analysis.open_run(out)
    columns = run.rank["mixture_columns"]
    assert run.mixture is None and run.expert_names == columns and len(columns) == 17
    assert run.pair_columns() == columns
    with pytest.raises(UserError, match="a rank check's directory, no mixture.json"):
        _ = run.weights
    grid = analysis.plot_simplex(run).collections[0].get_offsets()
    np.testing.assert_allclose(grid, analysis.simplex_coordinates(run.rank_pairs[columns].to_numpy()))
    ax = analysis.plot_proxy_vs_truth(run)
    assert ax.get_title().startswith(f"mean: Spearman {run.rank['metrics']['mean']['spearman']:.3f}")
    np.testing.assert_array_equal(
        ax.collections[0].get_offsets(), run.rank_pairs[["proxy_mean", "truth_mean"]]
    )
    report = write_report(out).read_text()  # as diagnose --out DIR or a fit there rewrites it
    assert f"256 mixtures, `{tables[0]}` against `{tables[1]}`" in report and "(simplex.png)" in report
    fit = {"weights": {"arith": 0.5, "reverse": 0.5}, "status": "complete"}  # beside a fit's mixture
    beside = analysis.Run(out, fit, None, None, None, run.rank, run.rank_pairs)
    assert [c.get_label() for c in analysis.plot_simplex(beside).collections] == ["recommended"]
    with pytest.raises(UserError, match="no mixture to place on the simplex"):
        analysis.plot_simplex(analysis.load_run(tmp_path))  # a directory with nothing of a run
    outputs = _executed_notebook(out)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # simplex, proxy vs truth


@pytest.mark.parametrize("k", [2, 3, 5])
def test_simplex_plot_draws_any_number_of_experts(k, tmp_path):
    """Ternary for 3 experts, a segment for 2, a polygon for more; gradient and zero-order runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"e{i}" for i in range(k)]
    path = np.random.default_rng(0).dirichlet(np.ones(k), size=12)
    trace = pd.DataFrame({"step": range(12), "loss": 1.0, "heldout_loss": 1.0})
    trace[[f"w_{n}" for n in names]] = path
    mixture = {"weights": dict(zip(names, path[-1])), "status": "complete"}
    evaluations = trace.rename(columns={"step": "index", "loss": "value"})
    for run in (
        analysis.Run(tmp_path, mixture, None, trace, None, None, None),
        analysis.Run(tmp_path, mixture, None, None, evaluations, None, None),
    ):
        fig, ax = plt.subplots()
        analysis.plot_simplex(run, ax)
        analysis.plot_losses(run, ax=plt.subplots()[1])
        labels = [t.get_text() for t in ax.texts]
        assert labels == names
        star = ax.collections[-1].get_offsets()[0]
        np.testing.assert_allclose(star, analysis.simplex_coordinates(path[-1])[0])
        plt.close("all")


def test_proxy_vs_truth_plots_the_rank_pairs_with_their_spearman(ranked_run, search_run):
    """One point per grid mixture at (proxy, truth) as rank_pairs.csv holds them, titled with the
    report's Spearman, which is scipy's on those points; a metric not ranked, or a run without a
    rank check, is a one-line error."""
    import matplotlib

    matplotlib.use("Agg")
    from scipy import stats

    run = analysis.open_run(ranked_run)
    ax = analysis.plot_proxy_vs_truth(run, "target")
    points = ax.collections[0].get_offsets()
    proxy, truth = run.rank_pairs["proxy_target"].to_numpy(), run.rank_pairs["truth_target"].to_numpy()
    np.testing.assert_array_equal(points[:, 0], proxy)
    np.testing.assert_array_equal(points[:, 1], truth)
    spearman = run.rank["metrics"]["target"]["spearman"]
    assert spearman == pytest.approx(stats.spearmanr(proxy, truth).statistic, abs=1e-12)
    assert f"Spearman {spearman:.3f}" in ax.get_title()
    with pytest.raises(UserError, match=r"metric 'accuracy' was not ranked; known: .*target"):
        analysis.plot_proxy_vs_truth(run, "accuracy")
    with pytest.raises(UserError, match=r"no rank check"):
        analysis.plot_proxy_vs_truth(analysis.open_run(search_run))


def test_proxy_vs_truth_of_a_metric_that_ranks_nothing(tmp_path):
    """A metric constant over the mixtures (an exact match of 0 everywhere) has null Spearman and
    Kendall in rank_report.json; plot_proxy_vs_truth failed formatting None into its title."""
    import matplotlib

    matplotlib.use("Agg")
    nulls = dict.fromkeys(
        ["spearman", "kendall", "pairwise_accuracy", "top1_hit", "topk_hit", "topk_overlap"]
    )
    stats = {
        **nulls,
        "n": 3,
        "higher_is_better": True,
        "spearman_ci": [None, None],
        "kendall_ci": [None, None],
        "bootstrap_used": 0,
        "k": 1,
        "regret": None,
        "proxy_best_row": 0,
        "true_best_row": 0,
    }
    report = {"schema_version": 1, "overall": "em", "options": {}, "metrics": {"em": stats}}
    (tmp_path / "rank_report.json").write_text(json.dumps(report))
    (tmp_path / "rank_pairs.csv").write_text("a,b,proxy_em,truth_em\n0.5,0.5,0,0\n1,0,0,0\n0,1,0,0\n")
    run = analysis.open_run(tmp_path)
    assert analysis.plot_proxy_vs_truth(run).get_title() == "em: Spearman n/a, Kendall n/a"
    assert analysis.rank_table(run).loc["em"].isna().all()


def test_the_search_curve_numbers_evaluations_as_evaluations_csv_and_plot_losses(
    search_run, tmp_path, monkeypatch
):
    """search_curve.png, evaluations.csv, open_run's plot_losses and the trackers count from 0 alike."""
    import matplotlib.axes

    from mergeopt.reporting import analysis
    from mergeopt.reporting.report import plot_search_curve

    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def recorded(ax, x, *args, **kwargs):
        drawn.append(list(x))
        return real_plot(ax, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded)
    run = analysis.open_run(search_run)
    rows = run.evaluations.to_dict("records")
    plot_search_curve(rows, list(run.weights.index), tmp_path / "curve.png", "value")
    curve = drawn[:]
    drawn.clear()
    analysis.plot_losses(run)
    assert curve[0] == drawn[0] == run.evaluations["index"].tolist() and curve[0][0] == 0


def test_a_fit_of_other_experts_leaves_the_kept_diagnostics_out_of_its_report(random_world, tmp_path):
    """A fit of another recipe (one expert fewer) into a diagnosed directory keeps diagnose.json, as
    it keeps every other command's files; report.md then set the new fit beside diagnostics and
    flags of experts it does not merge. Now the section says why it is left out, the fit warns, and
    a fit of the diagnosed experts shows it again."""
    import yaml

    out = tmp_path / "fit"
    tree = recipe_tree(random_world, out, search={"strategy": "grid", "grid": {"divisions": 2}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert run_in_process("fit", str(recipe), "--quiet").returncode == 0
    assert run_in_process("diagnose", str(recipe), "--points", "3", "--quiet").returncode == 0
    table = "|  | ‖τ‖/‖θ0‖ |"
    assert table in (out / "report.md").read_text()

    fewer = tmp_path / "fewer.yaml"
    tree["model"]["experts"].pop("gamma")
    fewer.write_text(yaml.safe_dump(tree))
    done = run_in_process("fit", str(fewer), "--quiet")
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "| gamma |" not in report and table not in report
    said = "diagnose.json is of other experts (alpha, beta, gamma) than this fit's mixture.json"
    assert f"## Diagnostics\n\nLeft out: {said}" in report
    (warning,) = [line for line in done.stderr.splitlines() if "other experts" in line]
    assert warning.startswith(f"mergeopt: warning: {out / 'diagnose.json'} is of other experts"), warning
    assert (out / "diagnose.json").is_file()  # kept: the user's to remove

    assert run_in_process("fit", str(recipe), "--quiet").returncode == 0
    assert table in (out / "report.md").read_text()


def test_a_fit_of_other_experts_leaves_the_kept_rank_check_out_of_its_report(random_world, tmp_path):
    """The same for a grid rank check: report.md showed the old experts' ranking and their fitted
    mixture's regret under the new fit, and the simplex placed their grid on the new fit's corners."""
    import yaml

    out = tmp_path / "fit"
    tree = recipe_tree(random_world, out, search={"strategy": "grid", "grid": {"divisions": 2}})
    names = list(tree["model"]["experts"])
    rows = [[1.0 if i == j else 0.0 for j in range(len(names))] for i in range(len(names))]
    rows.append([1.0 / len(names)] * len(names))
    header = [f"w_{n}" for n in names] + [f"loss_{d['name']}" for d in tree["data"]["dev"]]
    lines = [",".join(map(str, w + [float(i + 1)] * len(tree["data"]["dev"]))) for i, w in enumerate(rows)]
    grid = tmp_path / "grid.csv"
    grid.write_text("\n".join([",".join(header), *lines]) + "\n")
    tree["rank"] = {"grid": str(grid)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert run_in_process("fit", str(recipe), "--quiet").returncode == 0
    assert "Fitted mixture: nearest grid mixture" in (out / "report.md").read_text()

    tree["model"]["experts"].pop("gamma")
    del tree["rank"]
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text(yaml.safe_dump(tree))
    done = run_in_process("fit", str(fewer), "--quiet")
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "Fitted mixture: nearest grid mixture" not in report
    said = "rank_report.json is of other experts (alpha, beta, gamma) than this fit's mixture.json"
    assert f"## Does the merged proxy rank mixtures like training does?\n\nLeft out: {said}" in report
    assert any(f"{out / 'rank_report.json'} is of other experts" in line for line in done.stderr.splitlines())


def test_a_table_mode_rank_check_is_not_of_other_experts(tmp_path):
    """A table-mode rank check ranks a table's own mixtures, over its own columns: a report written
    before mixture_columns was recorded was read as grid mode, and flagged as of other experts (a
    warning on each fit, its section left out of report.md). Grid mode is told by its grid key."""
    from mergeopt.reporting import analysis

    mixture = {"weights": {"alpha": 0.5, "beta": 0.5}}
    pairs = pd.DataFrame(
        {"w_code": [0.2, 0.8], "w_web": [0.8, 0.2], "proxy": [1.0, 2.0], "truth": [1.0, 2.0]}
    )
    table = {"target": "loss", "metrics": {}}  # no grid, no mixture_columns: an older table-mode report
    run = analysis.Run(tmp_path, mixture, None, None, None, table, pairs)
    assert analysis.of_other_experts(run) == {}
    grid = analysis.Run(tmp_path, mixture, None, None, None, {**table, "grid": "grid.csv"}, pairs)
    assert analysis.of_other_experts(grid) == {"rank_report.json": ["code", "web"]}


def test_report_md_says_why_a_grids_baselines_were_not_computed(tmp_path):
    """A grid too small for the baselines it asked for (rank.baselines: [lightgbm_loo] on a few
    runs) has none, and rank_report.md says why under its proxy row; report.md's rank section,
    which has rank_report.md's baseline table, showed neither. A report from before the baselines
    (no key) shows no table."""
    from types import SimpleNamespace

    from mergeopt.evaluation.rank_report import baseline_table
    from mergeopt.evaluation.rank_stats import rank_statistics
    from mergeopt.reporting.run_report import _rank_section

    statistics = rank_statistics(
        np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]), n_bootstrap=50
    )
    why = "3 runs per fit, fewer than the 20 a LightGBM split needs"
    report = {
        "grid": "grid.csv",
        "n_mixtures": 4,
        "overall": "target",
        "options": {"confidence": 0.9},
        "metrics": {"target": statistics},
        "baselines": {},
        "baselines_skipped": {"lightgbm_loo": why},
    }
    section = "\n".join(_rank_section(SimpleNamespace(rank=report, path=tmp_path, mixture=None)))
    assert baseline_table(report) in section and f"LightGBM, leave-one-out: not computed ({why})." in section
    older = {k: v for k, v in report.items() if not k.startswith("baselines")}
    assert "Against the baselines" not in "\n".join(
        _rank_section(SimpleNamespace(rank=older, path=tmp_path, mixture=None))
    )
