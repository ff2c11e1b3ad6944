"""The baselines every grid rank report sets beside the merged proxy (mergeopt.evaluation.baselines).

Checked against numbers worked out independently: the interpolation against Σ w_i s(θ_i) and, on
the committed tiny grid, against the target Spearman its issue quotes (0.233); the leave-one-out
regressions never see the run they predict; the mixing law recovers a law it is fitted to and
agrees with scipy's curve_fit; and a rank run's report, Markdown and rank_pairs.csv agree with
scipy.stats on the predictions they write.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from mergeopt.evaluation import baselines
from mergeopt.runtime.exact_csv import read_csv
from tests.conftest import REPO, run_in_process
from tests.test_proxy_evaluator import _write

TINY_GRID = REPO / "benchmarks" / "results" / "tiny_grid" / "grid.csv"
TINY_EXPERTS = ["arith", "reverse", "brackets", "markov"]


def _tiny_grid():
    grid = read_csv(TINY_GRID)
    weights = grid[[f"w_{n}" for n in TINY_EXPERTS]].to_numpy()
    target = grid[[f"loss_{n}" for n in TINY_EXPERTS]].to_numpy().mean(axis=1)
    return weights, target


def test_interpolation_is_the_weighted_sum_of_the_experts_scores():
    weights = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    scores = np.array([2.0, 3.0, 5.0])
    expected = [2.0, 0.2 * 2.0 + 0.5 * 3.0 + 0.3 * 5.0, 5.0]
    np.testing.assert_allclose(baselines.interpolation(weights, scores), expected, rtol=0, atol=1e-12)


def test_on_the_tiny_grid_interpolation_ranks_as_its_issue_measured():
    """Issue 16: the free baseline ranks the tiny grid's truth at a target Spearman of 0.233 (the
    experts' own losses are the grid's vertex rows: `mergeopt train`'s experts are those runs)."""
    weights, target = _tiny_grid()
    vertices = np.array([target[weights[:, i] == 1.0][0] for i in range(len(TINY_EXPERTS))])
    rho = scipy.stats.spearmanr(baselines.interpolation(weights, vertices), target).statistic
    assert rho == pytest.approx(0.233, abs=5e-4)


def test_lightgbm_loo_never_sees_the_run_it_predicts_and_repeats_for_a_seed():
    weights, target = _tiny_grid()
    predicted = baselines.lightgbm_loo(weights, target, seed=0)
    assert np.array_equal(predicted, baselines.lightgbm_loo(weights, target, seed=0))
    changed = target.copy()
    changed[7] += 10.0  # a run's own truth does not reach its prediction ...
    moved = baselines.lightgbm_loo(weights, changed, seed=0)
    assert moved[7] == predicted[7]
    assert not np.allclose(np.delete(moved, 7), np.delete(predicted, 7))  # ... but reaches the others'
    assert np.ptp(predicted) > 0  # not a constant: the booster splits on 19 runs


def test_the_mixing_law_recovers_a_law_and_agrees_with_curve_fit():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), size=30)
    c, k, t = 1.5, 0.8, np.array([-1.0, 0.5, -2.0])
    y = c + k * np.exp(weights @ t)
    fitted = baselines.fit_mixing_law(weights, y)
    fresh = rng.dirichlet(np.ones(3), size=5)
    np.testing.assert_allclose(fitted(fresh), c + k * np.exp(fresh @ t), rtol=1e-6)
    np.testing.assert_allclose(baselines.mixing_law_loo(weights, y), y, rtol=1e-6)
    # on noisy scores: the same least squares as scipy's curve_fit from the same start
    noisy = y + rng.normal(0, 0.01, size=len(y))
    start = baselines.mixing_law_start(weights, noisy)

    def law(w, c, k, *t):
        return c + k * np.exp(np.asarray(w).T @ np.array(t))

    params, _ = scipy.optimize.curve_fit(law, weights.T, noisy, p0=start, maxfev=20000)
    np.testing.assert_allclose(
        baselines.fit_mixing_law(weights, noisy)(weights), law(weights.T, *params), rtol=1e-5
    )


def test_the_mixing_law_takes_weights_written_to_six_decimals():
    """A grid CSV written to six decimals (rows summing to 1 ± 1e-6) once overflowed exp in the
    start, whose intercept column was then barely independent of the weights: the law fitted on the
    rounded rows predicts what it predicts on the exact ones."""
    steps = np.arange(4) / 3
    exact = np.array([[a, b, 1 - a - b] for a in steps for b in steps if a + b <= 1 + 1e-12])
    rounded = np.round(exact, 6)
    assert np.abs(rounded.sum(axis=1) - 1).max() > 1e-7
    y = 1.5 + 0.8 * np.exp(exact @ np.array([-1.0, 0.5, -2.0]))
    start = baselines.mixing_law_start(rounded, y)
    assert np.isfinite(start).all()
    np.testing.assert_allclose(start, baselines.mixing_law_start(exact, y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        baselines.mixing_law_loo(rounded, y), baselines.mixing_law_loo(exact, y), rtol=1e-4
    )


def test_the_mixing_laws_jacobian_matches_finite_differences():
    """The Jacobian the least squares is given, against central differences of the law itself, at
    a point where some rows' t·w lie beyond the clip (their t-columns are 0) and the rest inside."""
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(4), size=12)
    params = np.array([0.7, -1.3, 80.0, -2.0, 30.0, 1.5])
    exponent = weights @ params[2:]
    assert (np.abs(exponent) > baselines.EXPONENT_CLIP).any() and (np.abs(exponent) < 40).any()
    analytic = baselines.mixing_law_jacobian(params, weights)
    step = 1e-6
    numeric = np.column_stack(
        [
            (
                baselines.mixing_law(params + step * e, weights)
                - baselines.mixing_law(params - step * e, weights)
            )
            / (2 * step)
            for e in np.eye(len(params))
        ]
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())
    clipped = np.abs(exponent) > baselines.EXPONENT_CLIP
    assert (analytic[clipped, 2:] == 0).all() and (analytic[~clipped, 2:] != 0).all()


def test_the_leave_one_out_fits_show_a_bar_to_their_total(capsys):
    """One step per fit: each regression fits once per run and metric (here 2 × 2 × 8), and the
    bar's predictions are those made without it."""
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), size=8)
    truths = {m: 1.0 + weights @ rng.normal(size=3) for m in ("a", "b")}
    experts = {m: rng.normal(size=3) for m in truths}
    shown, _ = baselines.baseline_predictions(weights, truths, experts, seed=0, progress=True)
    bar = capsys.readouterr().err
    assert "baselines, leave-one-out" in bar and "32/32" in bar
    quiet, _ = baselines.baseline_predictions(weights, truths, experts, seed=0)
    assert capsys.readouterr().err == ""
    for name in baselines.NAMES:
        for m in truths:
            np.testing.assert_array_equal(shown[name][m], quiet[name][m])


def test_a_grid_too_small_for_a_baseline_says_so():
    assert baselines.skipped(20, 4) == {}
    assert baselines.skipped(6, 4)["mixing_law_loo"] == "5 runs per fit, fewer than its 6 parameters"
    assert set(baselines.skipped(2, 3)) == {"mixing_law_loo", "lightgbm_loo"}
    assert "lightgbm_loo" in baselines.skipped(6, 2) and "lightgbm_loo" not in baselines.skipped(7, 2)


def test_lightgbm_on_too_few_runs_would_rank_exactly_against_the_truth():
    """Why it is skipped below 2 x min_child_samples runs per fit: no tree splits, each prediction
    is the others' mean, and the Spearman correlation is -1 whatever the runs."""
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), size=6)
    truth = rng.normal(size=6)
    predicted = baselines.lightgbm_loo(weights, truth, seed=0)
    np.testing.assert_allclose(predicted, (truth.sum() - truth) / 5, rtol=1e-6)  # LightGBM's float32
    assert scipy.stats.spearmanr(predicted, truth).statistic == pytest.approx(-1.0)


def test_a_rank_report_sets_every_baseline_beside_the_proxy(random_world, tmp_path):
    recipe, grid = _write(random_world, tmp_path)
    out = tmp_path / "rank"
    # in a pool of two workers (rank.workers): the predictions are those fitted here, below
    result = run_in_process("rank", recipe, "rank.workers=2", "--grid", grid, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rank_report.json").read_text())
    pairs = read_csv(out / "rank_pairs.csv")
    table = read_csv(grid)
    assert set(report["baselines"]) == set(baselines.NAMES) and "baselines_skipped" not in report
    weights = table[["w_alpha", "w_beta", "w_gamma"]].to_numpy()
    vertex = [int(np.flatnonzero((weights == np.eye(3)[i]).all(axis=1))[0]) for i in range(3)]
    for metric in report["metrics"]:
        truth = pairs[f"truth_{metric}"]
        # the interpolation of the proxy's own scores at the experts (the grid's vertex rows here)
        expected = weights @ pairs[f"proxy_{metric}"].to_numpy()[vertex]
        np.testing.assert_allclose(pairs[f"interpolation_{metric}"], expected, rtol=1e-12)
        for name in baselines.NAMES:
            stats = report["baselines"][name][metric]
            predicted = pairs[f"{name}_{metric}"]
            if np.ptp(predicted) > 0:
                assert stats["spearman"] == pytest.approx(scipy.stats.spearmanr(predicted, truth).statistic)
                assert stats["kendall"] == pytest.approx(scipy.stats.kendalltau(predicted, truth).statistic)
    for name in baselines.NAMES:  # every baseline's comparison above was made, on the target at least
        assert np.ptp(pairs[f"{name}_target"]) > 0, name
    loo = baselines.lightgbm_loo(weights, pairs["truth_target"].to_numpy(), seed=0)
    np.testing.assert_allclose(pairs["lightgbm_loo_target"], loo, rtol=1e-12)
    law = baselines.mixing_law_loo(weights, pairs["truth_target"].to_numpy())
    np.testing.assert_allclose(pairs["mixing_law_loo_target"], law, rtol=1e-12)
    text = (out / "rank_report.md").read_text()
    assert "Against the baselines (target" in text and "| interpolation Σ w_i s(θ_i) |" in text
    rows = [line for line in result.stdout.splitlines() if line.startswith("| mixing law c + k·exp(t·w)")]
    assert len(rows) == 1  # printed once, as the Markdown has it


def test_a_small_grid_reports_the_baselines_it_can(random_world, tmp_path):
    from tests.conftest import recipe_tree
    from tests.test_rank_grid import grid_table, rank_cli

    result = rank_cli(
        tmp_path, recipe_tree(random_world, tmp_path / "out"), grid_table(), "--out", str(tmp_path / "r")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "rank_report.json").read_text())
    assert set(report["baselines"]) == {"interpolation"}
    assert report["baselines_skipped"]["mixing_law_loo"] == "2 runs per fit, fewer than its 5 parameters"
    assert report["baselines_skipped"]["lightgbm_loo"].startswith(
        "2 runs per fit, fewer than the 6 a LightGBM split needs"
    )
    assert (
        "not computed (2 runs per fit, fewer than its 5 parameters)"
        in (tmp_path / "r" / "rank_report.md").read_text()
    )


def test_rank_baselines_leaves_the_regressions_out(random_world, tmp_path):
    """rank.baselines=[interpolation]: the regressions are not fitted, the report says why, and the
    interpolation is the one every report computes."""
    recipe, grid = _write(random_world, tmp_path)
    out = tmp_path / "rank"
    result = run_in_process(
        "rank", recipe, "rank.baselines=[interpolation]", "--grid", grid, "--out", str(out), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rank_report.json").read_text())
    assert set(report["baselines"]) == {"interpolation"}
    left_out = "left out by rank.baselines"
    assert report["baselines_skipped"] == {"lightgbm_loo": left_out, "mixing_law_loo": left_out}
    pairs = read_csv(out / "rank_pairs.csv")
    assert not [c for c in pairs.columns if c.startswith(("lightgbm_loo_", "mixing_law_loo_"))]
    weights = read_csv(grid)[["w_alpha", "w_beta", "w_gamma"]].to_numpy()
    vertex = [int(np.flatnonzero((weights == np.eye(3)[i]).all(axis=1))[0]) for i in range(3)]
    expected = weights @ pairs["proxy_target"].to_numpy()[vertex]
    np.testing.assert_allclose(pairs["interpolation_target"], expected, rtol=1e-12)
    assert f"not computed ({left_out})" in (out / "rank_report.md").read_text()


def test_rank_baselines_names_only_known_baselines_once():
    from mergeopt.config import RankSection

    assert RankSection().baselines == baselines.NAMES  # every baseline unless the recipe says otherwise
    assert RankSection(baselines=[]).baselines == ()
    with pytest.raises(ValueError, match="names a baseline twice: mixing_law_loo"):
        RankSection(baselines=["mixing_law_loo", "interpolation", "mixing_law_loo"])
    with pytest.raises(ValueError, match="lightgbm"):
        RankSection(baselines=["lightgbm"])


def _small_problem(runs: int = 12):
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(3), size=runs)
    truths = {m: 2.0 + np.exp(weights @ rng.normal(size=3)) for m in ("a", "b")}
    return weights, truths, {m: rng.normal(size=3) for m in truths}


def test_the_pool_predicts_what_one_process_predicts_bit_for_bit():
    """rank.workers: the leave-one-out fits in two worker processes (from a fork server) give the
    very predictions of the fits made here, in the same order of baselines."""
    weights, truths, experts = _small_problem()
    here, _ = baselines.baseline_predictions(weights, truths, experts, seed=3, workers=1)
    pooled, _ = baselines.baseline_predictions(weights, truths, experts, seed=3, workers=2)
    assert list(pooled) == list(here) == list(baselines.NAMES)
    for name in baselines.NAMES:
        for m in truths:
            np.testing.assert_array_equal(pooled[name][m], here[name][m])


def test_ranks_on_a_node_share_its_cpus(monkeypatch):
    monkeypatch.setattr(baselines.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert baselines.usable_cpus() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc_per_node=8
    assert baselines.usable_cpus() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert baselines.usable_cpus() == 1


def test_how_many_workers(monkeypatch):
    import sys
    import types

    monkeypatch.setattr(baselines, "usable_cpus", lambda: 8)
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a notebook: no file
    # the tiny grid's report (200 fits x 20 runs x 4 experts) is too little work to pay for a pool
    assert baselines.loo_workers(None, 200, 20, 4) == 1
    assert baselines.loo_workers(None, 256, 64, 17) == 8  # RegMix's, two metrics
    assert baselines.loo_workers(3, 10, 5, 2) == 3 and baselines.loo_workers(30, 10, 5, 2) == 10  # asked for
    script = types.ModuleType("__main__")
    script.__file__ = "/home/me/choose.py"  # a user's script: it may lack the __main__ guard
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert baselines.loo_workers(None, 256, 64, 17) == 1 and baselines.loo_workers(4, 256, 64, 17) == 4
    script.__file__ = "/venv/bin/mergeopt"  # mergeopt's own command
    assert baselines.loo_workers(None, 256, 64, 17) == 8


class FakePool:
    """A ProcessPoolExecutor stand-in: each share submitted stays under way."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, *args, **kwargs):
        import concurrent.futures

        return concurrent.futures.Future()

    def shutdown(self, *args, **kwargs):  # the workers left are stopped
        pass


def test_a_pool_whose_workers_die_is_one_line(monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from mergeopt.errors import UserError

    class Broken(FakePool):
        def submit(self, *args, **kwargs):
            raise BrokenProcessPool("a worker died")

    monkeypatch.setattr(baselines, "ProcessPoolExecutor", Broken)
    weights, truths, experts = _small_problem()
    with pytest.raises(UserError, match="set rank.workers: 1 to fit them in this process"):
        baselines.baseline_predictions(weights, truths, experts, seed=0, workers=2)


FORKSERVER_MASK = """
import multiprocessing.forkserver as forkserver, signal
import numpy as np
from mergeopt.evaluation import baselines

rng = np.random.default_rng(0)
weights = rng.dirichlet(np.ones(3), size=8)
baselines.baseline_predictions(
    weights, {"t": rng.normal(size=8)}, {"t": np.zeros(3)}, 0, asked=("lightgbm_loo",), workers=2
)
status = open(f"/proc/{forkserver._forkserver._forkserver_pid}/status").read()
blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
print(blocked >> (signal.SIGINT - 1) & 1, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or "forkserver" not in multiprocessing.get_all_start_methods(),
    reason="reads the fork server's signal mask from Linux's /proc",
)
def test_the_pools_fork_server_starts_with_sigint_blocked():
    """A Ctrl-C while the fork server imports its preloads (about 3 s) printed its traceback under
    the command's one line: it starts with SIGINT blocked, and this process's mask is restored."""
    result = subprocess.run(
        [sys.executable, "-c", FORKSERVER_MASK], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "False"]


def test_a_ctrl_c_held_while_the_pool_starts_stops_its_workers(monkeypatch):
    """A Ctrl-C while the pool starts is held (SIGINT blocked) and raised as the block ends, where
    a handler that raises (Python's own, outside mergeopt's commands) stopped the command: the
    workers are stopped then too, not waited for through every share submitted."""
    from contextlib import contextmanager

    @contextmanager
    def held():
        yield
        raise KeyboardInterrupt  # the Ctrl-C held back, delivered as SIGINT is unblocked

    stopped = []
    monkeypatch.setattr(baselines, "ProcessPoolExecutor", FakePool)
    monkeypatch.setattr(baselines, "_sigint_held", held)
    monkeypatch.setattr(baselines, "_stop_workers", stopped.append)
    weights, truths, experts = _small_problem()
    with pytest.raises(KeyboardInterrupt):
        baselines.baseline_predictions(weights, truths, experts, seed=0, workers=2)
    assert len(stopped) == 1
