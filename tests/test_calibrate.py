"""``mergeopt calibrate`` on a small random world: what it writes, and that its numbers are the
reference paths' numbers.

- The proxy's values at the runs' mixtures equal ``mergeopt rank``'s proxy on the same grid.
- The calibrated ranking, pick and proposals equal mergeopt.evaluation.calibration's own fit and
  decision on those values; for a higher-is-better metric the pick maximises.
- The pick and the proposals are mixture.json files that ``mergeopt export`` reads.
- A second round with a run appended evaluates only the new mixture (the journal is reused).
Bad inputs (unknown metric, a grid of another recipe's runs) are rows of tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mergeopt.config import CalibrateSection
from mergeopt.errors import UserError
from mergeopt.evaluation import calibration
from mergeopt.evaluation.calibrate import calibrate
from mergeopt.export.mixture_input import read_mixture
from mergeopt.run_files import CalibrationReport
from mergeopt.runtime.exact_csv import read_csv
from tests.conftest import recipe_tree, run_in_process, run_ranks

SPEC = {"candidates": 5, "samples": 200, "batch": 2}


def _grid(rows: int = 3) -> pd.DataFrame:
    weights = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]][:rows]
    table = pd.DataFrame(weights, columns=["w_alpha", "w_beta", "w_gamma"])
    table["loss_arith"] = [3.1, 2.9, 2.7, 2.8][:rows]
    table["loss_markov"] = [3.3, 3.0, 3.2, 2.95][:rows]
    return table


def _run(world, tmp_path, table: pd.DataFrame, *extra: str, **calibrate_spec):
    grid = tmp_path / "grid.csv"
    table.to_csv(grid, index=False)
    tree = recipe_tree(world, tmp_path / "fit", calibrate={**SPEC, **calibrate_spec})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "cal"
    result = run_in_process(
        "calibrate", str(recipe), "--grid", str(grid), "--out", str(out), "--quiet", *extra
    )
    assert result.returncode == 0, result.stderr
    return recipe, grid, out


@pytest.fixture(scope="module")
def first_round(random_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrate")
    recipe, grid, out = _run(random_world, tmp, _grid())
    return tmp, recipe, grid, out


def test_writes_the_report_the_ranking_and_exportable_mixtures(first_round):
    _, _, _, out = first_round
    report = CalibrationReport.model_validate_json((out / "calibration.json").read_text())
    assert report.runs == 3 and len(report.proposals) == 2
    for name in ("calibration.md", "calibrated_ranking.csv", "calibration.png"):
        assert (out / name).is_file()
    for folder in ("pick", "next-1", "next-2"):
        mixture = read_mixture(out / folder)
        assert mixture.strategy == "calibrate" and (out / folder / "recipe.yaml").is_file()
        assert mixture.unit == "tokens"  # the recipe's weights.unit: the export reads the weights in it
    assert read_mixture(out / "pick").weights == pytest.approx(report.pick.weights)
    # the proposals are new mixtures: never one of the runs
    runs = {tuple(np.round(r, 9)) for r in _grid()[["w_alpha", "w_beta", "w_gamma"]].to_numpy()}
    for proposal in report.proposals:
        assert tuple(np.round(list(proposal.weights.values()), 9)) not in runs


def test_the_pick_and_the_proposals_record_the_stack_as_a_fit_does(first_round):
    """mixture.json's ``stack`` is what ``mergeopt merge`` compares the recipe's experts with; the
    pick and the proposals had none, so that check was skipped for them. Each records the stack the
    proxy was scored on: equal to the loaded stack's record, and the merge of the pick passes."""
    from mergeopt.config import load_recipe
    from mergeopt.export.fitted_mixture import FittedStack, check_same_stack
    from mergeopt.loading.problem import load_problem
    from mergeopt.run_files import read_finished_mixture

    tmp, recipe, _, out = first_round
    problem = load_problem(load_recipe(recipe, []), progress=False)
    expected = problem.stack.record("float32")
    assert expected["tensors"] > 0
    for folder in ("pick", "next-1", "next-2"):
        mixture = read_finished_mixture(out / folder / "mixture.json")
        assert mixture.stack == expected and mixture.processes == 1 and mixture.shard == "none"
        check_same_stack(FittedStack(out / folder / "mixture.json", mixture.stack), problem.stack.layout())
    other = {**problem.stack.layout(), "tensors": 0, "lowrank_modules": expected["tensors"]}
    with pytest.raises(UserError, match="fitted on other experts than the recipe names"):
        check_same_stack(FittedStack(out / "pick" / "mixture.json", mixture.stack), other)


def test_the_analysis_api_opens_a_pick_and_says_where_its_numbers_are(first_round):
    """calibration.md says pick/ and next-<i>/ are read like a fit's: open_run takes them and gives
    the weights, and mixture_table (a fit's losses, which a calibrate mixture does not have) says
    in one line where its numbers are (it raised KeyError 'dev_loss')."""
    from mergeopt.reporting.analysis import mixture_table, open_run

    _, _, _, out = first_round
    run = open_run(out / "pick")
    assert run.strategy == "calibrate"
    assert run.weights.to_dict() == pytest.approx(read_mixture(out / "pick").weights)
    with pytest.raises(UserError, match=r"records a prediction, not a fit's losses: its numbers are in "):
        mixture_table(run)


def test_proxy_at_the_runs_equals_the_rank_checks_proxy(first_round, random_world):
    tmp, recipe, grid, out = first_round
    ranking = read_csv(out / "calibrated_ranking.csv")
    ours = ranking[ranking["source"] == "run"].sort_values("candidate")["proxy"].to_numpy()
    result = run_in_process("rank", str(recipe), "--grid", str(grid), "--out", str(tmp / "rank"), "--quiet")
    assert result.returncode == 0, result.stderr
    reference = read_csv(tmp / "rank" / "rank_pairs.csv")["proxy_target"].to_numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-12)


def test_decision_equals_the_models_own(first_round):
    _, _, _, out = first_round
    ranking = read_csv(out / "calibrated_ranking.csv").sort_values("candidate")
    report = json.loads((out / "calibration.json").read_text())
    weights = ranking[["w_alpha", "w_beta", "w_gamma"]].to_numpy()
    proxy = ranking["proxy"].to_numpy()
    truth = _grid()[["loss_arith", "loss_markov"]].to_numpy().mean(axis=1)
    posterior = calibration.fit(weights[:3], truth, proxy[:3], proxy)
    decision = calibration.decide(posterior, weights, proxy, range(3), batch=2, samples=200, seed=0)
    np.testing.assert_allclose(ranking["calibrated"], decision.mean, rtol=1e-12)
    assert report["pick"]["candidate"] == decision.pick
    assert [list(p["weights"].values()) for p in report["proposals"]] == [
        list(weights[i]) for i in decision.proposals
    ]
    assert report["proxy_slope"]["mean"] == pytest.approx(posterior.slope[0], rel=1e-12)


def test_a_higher_is_better_metric_is_maximised():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), size=12)
    score = weights[:, 0] - weights[:, 2]  # an accuracy: best at alpha
    spec = CalibrateSection(batch=1, samples=0)
    _, up = calibrate(weights, score, range(4), score[:4], spec, seed=0, higher_is_better=True)
    assert up.pick == int(np.argmax(score))
    _, down = calibrate(weights, -score, range(4), -score[:4], spec, seed=0)
    assert down.pick == up.pick and down.proposals == up.proposals


def test_the_next_round_evaluates_only_the_new_run(first_round, random_world):
    tmp, recipe, grid, out = first_round
    journal = out / "calibrate_checkpoint" / "proxy_evaluations.jsonl"
    before = journal.read_text().splitlines()
    table = _grid(4)  # the fourth row: a new run came in
    table.to_csv(grid, index=False)
    result = run_in_process("calibrate", str(recipe), "--grid", str(grid), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    after = journal.read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    report = json.loads((out / "calibration.json").read_text())
    assert report["runs"] == 4


def test_the_journal_is_kept_when_only_what_the_proxy_does_not_read_changes(random_world, tmp_path):
    """Between rounds a user trains the proposals and may change the recipe's train, optim or search
    sections: the proxy's values do not depend on them, so the journal is reused (it was refused,
    and --restart re-evaluated every candidate). A change the proxy reads is still refused."""
    recipe, grid, out = _run(random_world, tmp_path, _grid())
    journal = out / "calibrate_checkpoint" / "proxy_evaluations.jsonl"
    before = journal.read_text()
    report = (out / "calibration.json").read_text()
    unread = [
        "optim.lr=0.01",
        "optim.steps=3",
        "search.strategy=grid",
        "output_dir=" + str(tmp_path / "elsewhere"),
    ]
    result = run_in_process(
        "calibrate", str(recipe), *unread, "--grid", str(grid), "--out", str(out), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert journal.read_text() == before  # nothing evaluated again
    assert (out / "calibration.json").read_text() == report
    for read in ("optim.loss_chunk_tokens=7", "data.max_length=16", "seed=3"):
        result = run_in_process(
            "calibrate", str(recipe), read, "--grid", str(grid), "--out", str(out), "--quiet"
        )
        assert result.returncode == 2 and "belongs to a run with another recipe" in result.stderr, read


def test_a_grid_of_no_run_yet_proposes_the_proxys_pick_first(random_world, tmp_path):
    """Before the first training run (a grid of only its header line) the calibrated ranking is
    the proxy's, the first proposal is the proxy's own pick and the batch spreads from it, as the
    guide says; the grid was refused ("no rows")."""
    _, _, out = _run(random_world, tmp_path, _grid(0), batch=3)
    report = json.loads((out / "calibration.json").read_text())
    assert report["runs"] == 0 and report["best_run"] is None
    ranking = read_csv(out / "calibrated_ranking.csv")
    best = ranking.loc[ranking["proxy"].idxmin()]
    first = report["proposals"][0]
    assert first["expected_improvement"] is None
    assert first["proxy"] == pytest.approx(best["proxy"], abs=0) and first["predicted"] == pytest.approx(
        first["proxy"]
    )
    np.testing.assert_allclose(ranking["calibrated"], ranking["proxy"], rtol=0, atol=1e-12)
    assert len({tuple(p["weights"].values()) for p in report["proposals"]}) == 3
    assert read_mixture(out / "next-1").weights == pytest.approx(first["weights"])


def test_the_journal_is_kept_when_the_training_data_changes(random_world, tmp_path):
    """train.data sizes the constraints, never the proxy's value at a mixture: a training set edited
    between rounds (a run trained on more data) keeps the journal; it was refused as "read other
    data". An edited dev set is still refused."""
    data = {n: tmp_path / f"train_{n}.jsonl" for n in ("alpha", "beta", "gamma")}
    for path in data.values():
        path.write_text('{"text": "1 + 1 = 2"}\n')
    tree = recipe_tree(random_world, tmp_path / "fit", calibrate=SPEC)
    tree["train"] = {"data": {n: str(p) for n, p in data.items()}, "output_dir": str(tmp_path / "grid")}
    first = tree["data"]["dev"][0]
    first["path"] = str(shutil.copy(first["path"], tmp_path / "dev.jsonl"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    grid = tmp_path / "grid.csv"
    _grid().to_csv(grid, index=False)
    args = ("calibrate", str(recipe), "--grid", str(grid), "--out", str(tmp_path / "cal"), "--quiet")
    assert run_in_process(*args).returncode == 0
    journal = tmp_path / "cal" / "calibrate_checkpoint" / "proxy_evaluations.jsonl"
    before = journal.read_text()
    with data["alpha"].open("a") as more:
        more.write('{"text": "2 + 2 = 4"}\n')
    result = run_in_process(*args)
    assert result.returncode == 0, result.stderr
    assert journal.read_text() == before
    dev = Path(tree["data"]["dev"][0]["path"])  # a copy: the world's own files are shared
    with dev.open("a") as more:
        more.write('{"text": "3 + 3 = 6"}\n')
    result = run_in_process(*args)
    assert result.returncode == 2 and "read other data" in result.stderr


def test_a_journal_keyed_by_the_whole_recipe_is_still_reused(random_world, tmp_path):
    """A journal written by a mergeopt that keyed it by the whole recipe (optim, search and train
    included) is compared on the part the proxy reads, so the round after an upgrade reuses it; it
    was refused as "another recipe (optim.lr differs: 0.1 in the checkpoint, unset now)"."""
    from mergeopt.config import load_recipe
    from mergeopt.runtime.resume import META, recipe_tree, what_it_computes

    recipe, grid, out = _run(random_world, tmp_path, _grid())
    journal = out / "calibrate_checkpoint" / "proxy_evaluations.jsonl"
    before = journal.read_text()
    meta_path = out / "calibrate_checkpoint" / META
    meta = json.loads(meta_path.read_text())
    whole = {k: v for k, v in recipe_tree(load_recipe(recipe, [])).items() if k not in ("rank", "calibrate")}
    meta["recipe"] = what_it_computes(whole)  # the old key: every section but rank, calibrate, logging
    assert "lr" in meta["recipe"]["optim"]
    meta_path.write_text(json.dumps(meta))
    result = run_in_process("calibrate", str(recipe), "--grid", str(grid), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert journal.read_text() == before


def test_the_journal_follows_its_inputs_copied_to_other_paths(random_world, tmp_path):
    """A team copies its runs, experts and dev sets to another cluster, where the old paths are
    gone: the journal was refused as another recipe's (data.dev.0.path differs) with the advice to
    rerun with that recipe, impossible there, or --restart, evaluating every candidate again. The
    same files at new paths are the same proxy: the journal is reused and the numbers are the same.
    A moved file whose content changed too is named as changed."""
    old, new = tmp_path / "a", tmp_path / "b"
    old.mkdir()
    tree = recipe_tree(random_world, old / "fit", calibrate=SPEC)
    tree["model"]["base"] = str(shutil.copytree(random_world["base"], old / "base"))
    tree["model"]["experts"]["alpha"] = str(shutil.copytree(random_world["experts"]["alpha"], old / "alpha"))
    tree["data"]["dev"][0]["path"] = str(shutil.copy(tree["data"]["dev"][0]["path"], old / "dev.jsonl"))
    _grid().to_csv(old / "grid.csv", index=False)

    def calibrate(tree: dict, root: Path):
        (root / "recipe.yaml").write_text(yaml.safe_dump(tree))
        return run_in_process(
            "calibrate", str(root / "recipe.yaml"), "--grid", str(root / "grid.csv"), "--quiet"
        )

    assert calibrate(tree, old).returncode == 0
    report = json.loads((old / "fit" / "calibration" / "calibration.json").read_text())
    shutil.move(old, new)
    moved = json.loads(json.dumps(tree).replace(str(old), str(new)))
    journal = new / "fit" / "calibration" / "calibrate_checkpoint" / "proxy_evaluations.jsonl"
    before = journal.read_text()
    result = calibrate(moved, new)
    assert result.returncode == 0, result.stderr
    assert journal.read_text() == before  # nothing evaluated again
    after = json.loads((new / "fit" / "calibration" / "calibration.json").read_text())
    assert json.loads(json.dumps(after).replace(str(new), str(old))) == report
    with open(new / "dev.jsonl", "a", encoding="utf-8") as more:
        more.write('{"text": "3 + 3 = 6"}\n')
    result = calibrate(moved, new)
    assert result.returncode == 2 and f"read other data: {new / 'dev.jsonl'} changed since" in result.stderr


def test_constraints_bound_the_pick_and_the_proposals(random_world, tmp_path):
    def run(tree):
        tree["weights"] = {"bounds": {"alpha": [0.0, 0.3]}, "pinned": {"gamma": 0.2}}

    grid = tmp_path / "grid.csv"
    _grid().to_csv(grid, index=False)  # runs outside the box still inform the model
    tree = recipe_tree(random_world, tmp_path / "fit", calibrate={**SPEC, "batch": 3})
    run(tree)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "cal"
    result = run_in_process("calibrate", str(recipe), "--grid", str(grid), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "calibration.json").read_text())
    for mixture in [report["pick"], *report["proposals"]]:
        assert mixture["weights"]["alpha"] <= 0.3 + 1e-9
        assert mixture["weights"]["gamma"] == pytest.approx(0.2, abs=1e-9)
    ranking = read_csv(out / "calibrated_ranking.csv")
    assert set(ranking.loc[~ranking["allowed"], "source"]) <= {"run"}
    recorded = json.loads((out / "next-1" / "mixture.json").read_text())["constraints"]
    assert recorded["upper"]["alpha"] == 0.3 and recorded["lower"]["gamma"] == 0.2


def test_the_grids_column_order_and_extra_columns_do_not_change_the_target(random_world, tmp_path):
    """The target weighs each dev set's loss column by name: a grid whose loss columns come in
    another order, beside a column for a dev set the recipe lacks, gives the same calibration."""
    table = _grid()
    shuffled = table[["w_gamma", "loss_markov", "w_alpha", "loss_arith", "w_beta"]].copy()
    shuffled["loss_other"] = 9.0
    reports = []
    for name, grid in (("plain", table), ("shuffled", shuffled)):
        (tmp_path / name).mkdir()
        _, _, out = _run(random_world, tmp_path / name, grid)
        reports.append(json.loads((out / "calibration.json").read_text()))
    for key in ("pick", "proposals", "proxy_slope", "best_run"):
        assert reports[0][key] == reports[1][key]


def test_the_best_run_is_named_by_its_line_in_the_grid_file(random_world, tmp_path):
    """calibration.md names the best run as the errors name a row: its line in the grid file
    (header = line 1), here past a blank line that pandas skips (its row 2 is line 5, not 4)."""
    table = _grid()
    table["loss_arith"] = [3.1, 2.9, 2.5]
    table["loss_markov"] = [3.3, 3.0, 2.9]
    header, *rows = table.to_csv(index=False).splitlines(keepends=True)
    (tmp_path / "grid.csv").write_text(header + "\n" + "".join(rows))
    tree = recipe_tree(random_world, tmp_path / "fit", calibrate=SPEC)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    out = tmp_path / "cal"
    grid = str(tmp_path / "grid.csv")
    result = run_in_process(
        "calibrate", str(tmp_path / "recipe.yaml"), "--grid", grid, "--out", str(out), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "calibration.json").read_text())["best_run"]
    assert (best["row"], best["line"]) == (2, 5) and best["truth"] == pytest.approx(2.7, abs=1e-12)
    assert best["weights"] == {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}
    lines = (out / "calibration.md").read_text().splitlines()
    assert [line for line in lines if line.startswith("- Best run")] == [
        "- Best run so far: line 5 of grid.csv, alpha 0.200, beta 0.300, gamma 0.500: 2.7000"
    ]


@pytest.mark.parametrize("seeds", [1, 3])
def test_one_mixture_run_once_or_with_several_seeds_is_calibrated(random_world, tmp_path, seeds):
    """Calibrate takes any runs: one run, or several seeds of one mixture (the model has a noise
    term); only a ranking needs two mixtures. Both give a pick and the runs' count."""
    table = pd.concat([_grid(2).iloc[[1]]] * seeds, ignore_index=True)
    table["loss_arith"] = [2.9, 2.95, 2.85][:seeds]
    _, _, out = _run(random_world, tmp_path, table)
    report = CalibrationReport.model_validate_json((out / "calibration.json").read_text())
    assert report.runs == seeds and (out / "pick" / "mixture.json").is_file()


def test_calibration_md_says_when_no_run_is_worth_training(first_round):
    """An expected improvement below 0.1% of the proxy's spread is no reason to train: the report
    says the best run is likely the best mixture (and prints such a gain in full, not as 0.0000)."""
    from mergeopt.evaluation.calibration_report import markdown

    _, _, _, out = first_round
    content = json.loads((out / "calibration.json").read_text())
    ranking = read_csv(out / "calibrated_ranking.csv")
    names = ["alpha", "beta", "gamma"]
    scale = content["model"]["scale"]
    verdict = "The best run so far is likely the best mixture"
    for gain, negligible in ((2.3e-78, True), (0.999e-3 * scale, True), (1.001e-3 * scale, False)):
        for proposal in content["proposals"]:
            proposal["expected_improvement"] = gain
        text = markdown(content, ranking, names)
        assert (verdict in text) is negligible, gain
    content["proposals"][0]["expected_improvement"] = 2.3e-78
    assert "expected improvement 2.3e-78;" in markdown(content, ranking, names)


def test_a_run_typed_to_three_decimals_is_the_mixture_the_proxy_scored(random_world, tmp_path):
    """A row whose weights sum to 1.002 (typed as calibration.md prints them) is within the grid's
    tolerance and the proxy scores it renormalised; the model, the ranking and the pick take that
    mixture too. It was kept as typed, and pick/mixture.json (weights summing to 1) failed with a
    validation traceback when the run was the pick."""
    table = _grid()
    table.loc[2, ["w_alpha", "w_beta", "w_gamma"]] = [0.201, 0.301, 0.5]
    table["loss_arith"] = [3.1, 2.9, 1.0]
    table["loss_markov"] = [3.3, 3.0, 1.0]
    _, _, out = _run(random_world, tmp_path, table, candidates=3)
    report = json.loads((out / "calibration.json").read_text())
    expected = {"alpha": 0.201 / 1.002, "beta": 0.301 / 1.002, "gamma": 0.5 / 1.002}
    assert report["best_run"]["weights"] == pytest.approx(expected, abs=1e-15)
    assert report["pick"]["truth"] == pytest.approx(1.0)
    assert report["pick"]["weights"] == report["best_run"]["weights"]
    assert read_mixture(out / "pick").weights == pytest.approx(expected, abs=1e-15)
    runs = read_csv(out / "calibrated_ranking.csv").query("source == 'run'")
    np.testing.assert_allclose(runs[["w_alpha", "w_beta", "w_gamma"]].sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_a_grid_of_no_run_yet_without_the_proxy_is_one_line(random_world, tmp_path):
    """use_proxy false is a regression on the runs alone: with none it has nothing to say. It
    failed with a TypeError traceback; it is one line naming the grid and the key."""
    grid = tmp_path / "grid.csv"
    _grid(0).to_csv(grid, index=False)
    tree = recipe_tree(random_world, tmp_path / "fit", calibrate={**SPEC, "use_proxy": False})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "cal"
    result = run_in_process("calibrate", str(recipe), "--grid", str(grid), "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.count("\n") == 1
        and f"{grid}: no run yet, and calibrate.use_proxy is false" in result.stderr
    )
    assert not out.exists()


@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_two_gloo_processes_calibrate_as_one(random_world, tmp_path, shard):
    """Under torchrun the ranks deal the candidates out (with ``model.shard: fsdp`` they score each
    one together as one sharded model) and rank 0 fits the model and writes: the ranking (to 1e-6),
    the pick and the proposals equal one process's, and pick/mixture.json says how many processes
    and which shard mode scored it."""
    from mergeopt.run_files import read_finished_mixture

    recipe, grid, one = _run(random_world, tmp_path, _grid(), batch=2)
    two = tmp_path / "two"
    job = run_ranks(
        "calibrate",
        str(recipe),
        f"model.shard={shard}",
        "--grid",
        str(grid),
        "--out",
        str(two),
        "--quiet",
        processes=2,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("Wrote calibration.json") == 1  # rank 0 writes and prints
    pd.testing.assert_frame_equal(
        read_csv(one / "calibrated_ranking.csv"), read_csv(two / "calibrated_ranking.csv"), rtol=1e-6
    )
    reports = [json.loads((out / "calibration.json").read_text()) for out in (one, two)]
    assert reports[0]["pick"]["candidate"] == reports[1]["pick"]["candidate"]
    for mine, theirs in zip(reports[0]["proposals"], reports[1]["proposals"], strict=True):
        assert mine["weights"] == pytest.approx(theirs["weights"], abs=1e-12)
        # the sharded sums differ in the last float32 bits; the model's MAP fit carries that to 5e-6
        assert mine["expected_improvement"] == pytest.approx(theirs["expected_improvement"], rel=1e-5)
    assert reports[0]["pick"]["predicted"] == pytest.approx(reports[1]["pick"]["predicted"], rel=1e-6)
    pick = read_finished_mixture(two / "pick" / "mixture.json")
    assert pick.processes == 2 and pick.shard == shard
    assert pick.weights == pytest.approx(
        read_finished_mixture(one / "pick" / "mixture.json").weights, abs=1e-12
    )


def test_a_truth_on_another_scale_than_the_proxys_is_warned_of(first_round, random_world, tmp_path):
    """A grid whose loss column holds perplexities (exp of the loss) was calibrated silently, its
    scale read as a level and a slope. The proxy's own losses at the runs (the rank check's) pass
    without a word; their exponentials draw one warning per dev set naming the column."""
    tmp, recipe = first_round[:2]
    grid = first_round[2]
    result = run_in_process(
        "rank", str(recipe), "--grid", str(grid), "--out", str(tmp_path / "rank"), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    pairs = read_csv(tmp_path / "rank" / "rank_pairs.csv")
    table = pairs[["w_alpha", "w_beta", "w_gamma"]].copy()  # the grid's runs, however many by now
    for name in ("arith", "markov"):
        table[f"loss_{name}"] = pairs[f"proxy_{name}"]
    same = tmp_path / "same"
    same.mkdir()
    table.to_csv(same / "grid.csv", index=False)
    quiet = run_in_process(
        "calibrate", str(recipe), "--grid", str(same / "grid.csv"), "--out", str(same / "cal"), "--quiet"
    )
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    table["loss_markov"] = np.exp(table["loss_markov"])
    table.to_csv(same / "ppl.csv", index=False)
    warned = run_in_process(
        "calibrate", str(recipe), "--grid", str(same / "ppl.csv"), "--out", str(same / "cal2"), "--quiet"
    )
    assert warned.returncode == 0, warned.stderr
    lines = [line for line in warned.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"mergeopt: warning: {same / 'ppl.csv'}: loss_markov is "
    ), lines
    assert "x the proxy's loss at the same mixtures" in lines[0] and "not a perplexity" in lines[0]
    # rows of mergeopt train's runs are its own measure, in nats, whatever their ratio to the merged
    # model's loss (3.0 on the tiny grid at a mixture without the dev set's domain): not warned of
    table["loss_markov"] = 3 * pairs["proxy_markov"]
    table.insert(0, "path", [str(tmp_path / "runs" / str(i)) for i in range(len(table))])
    for path in table["path"]:
        Path(path).mkdir(parents=True)
        (Path(path) / "run.json").write_text("{}")
    table.to_csv(same / "trained.csv", index=False)
    trained = run_in_process(
        "calibrate", str(recipe), "--grid", str(same / "trained.csv"), "--out", str(same / "cal3"), "--quiet"
    )
    assert trained.returncode == 0 and "the proxy's loss" not in trained.stderr, trained.stderr


def test_a_grid_of_no_run_yet_draws_no_numpy_warning():
    """A grid of only its header line (the guide's first round) printed numpy's "RuntimeWarning:
    Mean of empty slice" with a line of numpy's source under it: the scale check took the median
    of no run."""
    import warnings

    from mergeopt.evaluation.calibrate import warn_of_another_scale

    empty = pd.DataFrame({"loss_arith": np.array([], float)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_of_another_scale(empty, empty, ["arith"], "runs.csv")


def test_a_truth_loss_within_half_to_twice_the_proxys_is_read_as_a_loss(first_round, random_world, tmp_path):
    """A loss column from runs measured otherwise (another split, other training) at 1.9 times the
    proxy's loss draws no warning; a loss in log10 (0.43 times) is warned of."""
    recipe, grid = first_round[1], first_round[2]
    result = run_in_process(
        "rank", str(recipe), "--grid", str(grid), "--out", str(tmp_path / "rank"), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    pairs = read_csv(tmp_path / "rank" / "rank_pairs.csv")
    table = pairs[["w_alpha", "w_beta", "w_gamma"]].copy()
    for name in ("arith", "markov"):
        table[f"loss_{name}"] = pairs[f"proxy_{name}"]
    table["loss_markov"] = 1.9 * table["loss_markov"]
    table.to_csv(tmp_path / "far.csv", index=False)
    far = run_in_process(
        "calibrate", str(recipe), "--grid", str(tmp_path / "far.csv"), "--out", str(tmp_path / "a"), "--quiet"
    )
    assert far.returncode == 0 and "warning" not in far.stderr, far.stderr
    table["loss_markov"] = table["loss_markov"] / 1.9 / np.log(10)
    table.to_csv(tmp_path / "log10.csv", index=False)
    log10 = run_in_process(
        "calibrate",
        str(recipe),
        "--grid",
        str(tmp_path / "log10.csv"),
        "--out",
        str(tmp_path / "b"),
        "--quiet",
    )
    assert log10.returncode == 0 and "loss_markov is 0.434x the proxy's loss" in log10.stderr, log10.stderr
