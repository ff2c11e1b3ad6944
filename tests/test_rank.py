"""rank: correlations against scipy.stats (random data and RegMix 1M vs 60M through the CLI), pairwise
accuracy against a brute-force loop, regret and top-k on hand-made examples, seeded bootstrap
intervals, nearest-grid-point regret, and one-line CLI errors with exit code 2."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mergeopt.errors import UserError
from mergeopt.evaluation.rank_report import json_safe
from mergeopt.evaluation.rank_stats import mixture_regret, pairwise_accuracy, rank_statistics
from mergeopt.evaluation.tables import load_table, rank_tables
from tests.conftest import run_in_process

REPO = Path(__file__).parent.parent
REGMIX = REPO / "tests" / "data" / "regmix"
PROXY = f"{REGMIX / 'test_mixture_1m.csv'}+{REGMIX / 'test_pile_loss_1m.csv'}"
TRUTH = f"{REGMIX / 'test_mixture_60m.csv'}+{REGMIX / 'test_pile_loss_60m.csv'}"


def run_rank(*args: str) -> subprocess.CompletedProcess:
    return run_in_process("rank", *args)


def correlated(seed: int, n: int = 40, noise: float = 0.5, ties: bool = False):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=n)
    proxy = truth + noise * rng.normal(size=n)
    if ties:
        truth, proxy = np.round(truth, 0), np.round(proxy, 0)
    return proxy, truth


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
@pytest.mark.parametrize("higher_is_better", [False, True])
def test_correlations_equal_scipy(seed, ties, higher_is_better):
    proxy, truth = correlated(seed, ties=ties)
    s = rank_statistics(proxy, truth, higher_is_better=higher_is_better, n_bootstrap=0)
    assert s["n"] == len(truth)
    assert s["spearman"] == pytest.approx(stats.spearmanr(proxy, truth).statistic, abs=1e-12)
    assert s["kendall"] == pytest.approx(stats.kendalltau(proxy, truth).statistic, abs=1e-12)


def brute_force_pairwise(proxy, truth) -> float:
    agree, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(truth)), 2):
        if truth[i] == truth[j]:
            continue
        pairs += 1
        if proxy[i] == proxy[j]:
            agree += 0.5
        elif (proxy[i] < proxy[j]) == (truth[i] < truth[j]):
            agree += 1
    return agree / pairs


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (4, True)])
def test_pairwise_accuracy_equals_brute_force(seed, ties):
    proxy, truth = correlated(seed, n=60, noise=1.0, ties=ties)
    expected = brute_force_pairwise(proxy, truth)
    assert pairwise_accuracy(proxy, truth) == pytest.approx(expected, abs=1e-12)
    assert pairwise_accuracy(proxy, truth, block=7) == pytest.approx(expected, abs=1e-12)
    for hib in (False, True):  # direction does not change which pairs agree
        assert rank_statistics(proxy, truth, higher_is_better=hib, n_bootstrap=0)[
            "pairwise_accuracy"
        ] == pytest.approx(expected, abs=1e-12)


def test_regret_hand_examples():
    truth = np.array([0.0, 1.0, 2.0, 10.0])
    perfect = rank_statistics(truth * 3 + 1, truth, n_bootstrap=0)
    assert perfect["regret"] == 0 and perfect["top1_hit"] and perfect["pairwise_accuracy"] == 1
    reversed_ = rank_statistics(-truth, truth, n_bootstrap=0)
    assert reversed_["regret"] == 1 and not reversed_["top1_hit"] and reversed_["pairwise_accuracy"] == 0
    # lower is better: the proxy's lowest is row 2 (true 2.0); best 0, range 10
    assert rank_statistics([5, 6, 1, 7], truth, n_bootstrap=0)["regret"] == pytest.approx(0.2)
    # higher is better, mirrored: the proxy's highest is row 1 (true 1.0); best 10, range 10
    hib = rank_statistics([5, 9, 1, 7], truth, higher_is_better=True, n_bootstrap=0)
    assert hib["regret"] == pytest.approx(0.9)
    assert rank_statistics(truth, truth, higher_is_better=True, n_bootstrap=0)["regret"] == 0
    assert rank_statistics(-truth, truth, higher_is_better=True, n_bootstrap=0)["regret"] == 1
    flat = rank_statistics([3, 1, 2, 4], [5.0, 5.0, 5.0, 5.0], n_bootstrap=0)
    assert flat["regret"] == 0 and np.isnan(flat["spearman"])


def test_top_k_hand_example():
    truth = np.array([5.0, 1.0, 3.0, 2.0, 4.0])  # true top 3 (lowest): rows 1, 3, 2
    miss = rank_statistics([1.0, 5.0, 2.0, 3.0, 4.0], truth, k=3, n_bootstrap=0)  # proxy top 3: 0, 2, 3
    assert (miss["top1_hit"], miss["topk_hit"], miss["topk_overlap"]) == (False, False, pytest.approx(2 / 3))
    hit = rank_statistics([1.0, 2.0, 5.0, 4.0, 3.0], truth, k=3, n_bootstrap=0)  # proxy top 3: 0, 1, 4
    assert (hit["top1_hit"], hit["topk_hit"], hit["topk_overlap"]) == (False, True, pytest.approx(1 / 3))
    best = rank_statistics([0.0, -1.0, 9.0, 9.0, 9.0], truth, k=2, n_bootstrap=0)  # proxy top 2: 1, 0
    assert (best["top1_hit"], best["topk_hit"], best["topk_overlap"]) == (True, True, 0.5)
    assert rank_statistics(truth, truth, k=10, n_bootstrap=0)["k"] == 5  # k capped at n
    # higher is better: true top 2 rows 0, 4; proxy top 2 rows 0, 2
    up = rank_statistics([9.0, 0.0, 8.0, 1.0, 2.0], truth, higher_is_better=True, k=2, n_bootstrap=0)
    assert (up["top1_hit"], up["topk_hit"], up["topk_overlap"]) == (True, True, 0.5)


@pytest.mark.parametrize(
    "seed, confidence, n, ties",
    [
        (0, 0.95, 30, False),
        (7, 0.9, 31, False),
        (11, 0.5, 30, False),
        (3, 0.95, 40, True),  # tau-b and average ranks over tied values
        (5, 0.9, 300, True),  # past PAIRWISE_MAX: Kendall's tau per resample by scipy
    ],
)
def test_bootstrap_intervals_equal_scipy_stats_bootstrap(seed, confidence, n, ties):
    """Our percentile bootstrap is scipy.stats.bootstrap(paired, percentile) draw for draw: the same
    generator, the same resampled indices, the same interval (scipy would return NaN where a
    resample is constant; ours skips it, which never happens with this many distinct values)."""
    proxy, truth = correlated(seed, n=n, noise=0.8, ties=ties)
    resamples = 400 if n < 100 else 60
    ours = rank_statistics(proxy, truth, n_bootstrap=resamples, seed=seed, confidence=confidence)
    assert ours["bootstrap_used"] == resamples
    statistics = {
        "spearman_ci": lambda p, t: stats.spearmanr(p, t)[0],
        "kendall_ci": lambda p, t: stats.kendalltau(p, t)[0],
    }
    for key, statistic in statistics.items():
        result = stats.bootstrap(
            (proxy, truth),
            statistic,
            paired=True,
            vectorized=False,
            n_resamples=resamples,
            method="percentile",
            confidence_level=confidence,
            rng=np.random.default_rng(seed),
        )
        interval = [result.confidence_interval.low, result.confidence_interval.high]
        assert ours[key] == pytest.approx(interval, abs=1e-12), key


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
    proxy, truth = correlated(5, n=50, noise=0.8)
    a = rank_statistics(proxy, truth, n_bootstrap=300, seed=0)
    b = rank_statistics(proxy, truth, n_bootstrap=300, seed=0)
    c = rank_statistics(proxy, truth, n_bootstrap=300, seed=1)
    assert a == b
    assert a["spearman_ci"] != c["spearman_ci"] and a["kendall_ci"] != c["kendall_ci"]
    for key in ("spearman", "kendall"):
        low, high = a[f"{key}_ci"]
        assert low < a[key] < high
    assert a["bootstrap_used"] == 300
    narrow = rank_statistics(proxy, truth, n_bootstrap=300, seed=0, confidence=0.5)
    assert a["spearman_ci"][0] < narrow["spearman_ci"][0] < narrow["spearman_ci"][1] < a["spearman_ci"][1]


def test_bootstrap_skips_constant_resamples():
    # two mixtures: a resample is constant whenever it draws the same row twice (about half of them)
    s = rank_statistics([1.0, 2.0], [1.0, 3.0], n_bootstrap=200, seed=0)
    assert 0 < s["bootstrap_used"] < 200
    assert s["spearman_ci"] == pytest.approx([1.0, 1.0], abs=1e-12)


def test_nan_is_an_error_naming_the_column():
    with pytest.raises(UserError, match=r"arxiv \(truth\).*row 3"):
        rank_statistics([1.0, 2.0, 3.0], [1.0, 2.0, np.nan], name="arxiv")


def test_mixture_regret_nearest_grid_point():
    grid = pd.DataFrame(
        {"w_code": [1.0, 0.0, 0.5, 0.2], "w_math": [0.0, 1.0, 0.5, 0.8]}, index=[10, 11, 12, 13]
    )
    truth = np.array([3.0, 1.0, 2.0, 1.5])
    r = mixture_regret({"code": 0.45, "math": 0.55}, grid, truth)
    assert (r["row"], r["index"]) == (2, 12)
    assert r["distance"] == pytest.approx(np.hypot(0.05, 0.05), abs=1e-12)
    assert r["regret"] == pytest.approx((2.0 - 1.0) / (3.0 - 1.0))
    assert mixture_regret({"code": 0.45, "math": 0.55}, grid, truth, higher_is_better=True)[
        "regret"
    ] == pytest.approx((3.0 - 2.0) / 2.0)
    exact = mixture_regret({"math": 0.8, "code": 0.2}, grid.rename(columns={"w_code": "code"}), truth)
    assert (exact["row"], exact["distance"], exact["regret"]) == (3, 0.0, 0.25)
    with pytest.raises(UserError, match="do not match the fitted experts"):
        mixture_regret({"code": 0.5, "prose": 0.5}, grid, truth)


def test_trailing_comma_and_split_tables(tmp_path):
    (tmp_path / "mix.csv").write_text("index,w_a,w_b\n1,0.25,0.75\n2,1.0,0.0\n")
    (tmp_path / "loss.csv").write_text("index,loss_a,loss_b,\n2,3.0,4.0\n1,1.0,2.0\n")
    frame, source = load_table(f"{tmp_path / 'mix.csv'}+{tmp_path / 'loss.csv'}")
    assert source == str(tmp_path / "mix.csv")
    assert list(frame.columns) == ["index", "w_a", "w_b", "loss_a", "loss_b"]
    assert frame["loss_a"].tolist() == [1.0, 3.0]  # joined on index, not on position
    (tmp_path / "both.csv").write_text("w_a,w_b,loss,\n0.5,0.5,1.0,\n")
    assert list(load_table(str(tmp_path / "both.csv"))[0].columns) == ["w_a", "w_b", "loss"]


@pytest.mark.parametrize(
    "delimiter, decimal, name", [(";", ".", "semicolons"), (";", ",", "semicolons"), ("\t", ".", "tabs")]
)
def test_a_table_not_split_by_commas_is_named_as_such(tmp_path, delimiter, decimal, name):
    """A spreadsheet's semicolon "CSV" was blamed on its mixture columns (and a decimal comma warned)."""
    rows = [["w_a", "w_b", "loss"], ["0.25", "0.75", "1.5"], ["1.0", "0.0", "2.5"]]
    text = "\n".join(delimiter.join(cell.replace(".", decimal) for cell in row) for row in rows) + "\n"
    (tmp_path / "table.csv").write_text(text, encoding="utf-8-sig")
    with pytest.raises(UserError, match=f"table.csv: the header is separated by {name}, not commas"):
        load_table(str(tmp_path / "table.csv"))


# ---------------------------------------------------------------- table mode


@pytest.fixture(scope="module")
def regmix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank") / "out"
    result = run_rank(
        "--proxy", PROXY, "--truth", TRUTH, "--bootstrap", "200", "--seed", "3", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    return out, result, json.loads((out / "rank_report.json").read_text())


def test_regmix_cli_correlations_equal_scipy(regmix_run):
    _, _, report = regmix_run
    mixtures_1m = pd.read_csv(REGMIX / "test_mixture_1m.csv")
    mixtures_60m = pd.read_csv(REGMIX / "test_mixture_60m.csv")
    assert mixtures_1m.equals(mixtures_60m)  # the same 256 mixtures in the same order
    proxy = pd.read_csv(REGMIX / "test_pile_loss_1m.csv").drop(columns="index")
    truth = pd.read_csv(REGMIX / "test_pile_loss_60m.csv").drop(columns="index")
    assert list(report["metrics"]) == [*proxy.columns, "mean"]
    assert report["n_mixtures"] == 256 and len(report["mixture_columns"]) == 17
    proxy["mean"], truth["mean"] = proxy.mean(axis=1), truth.mean(axis=1)
    for metric, s in report["metrics"].items():
        assert s["n"] == 256
        assert s["spearman"] == pytest.approx(
            stats.spearmanr(proxy[metric], truth[metric]).statistic, abs=1e-12
        )
        assert s["kendall"] == pytest.approx(
            stats.kendalltau(proxy[metric], truth[metric]).statistic, abs=1e-12
        )


def test_regmix_report_matches_the_function(regmix_run):
    out, result, report = regmix_run
    assert all((out / name).stat().st_size > 0 for name in ("rank_report.md", "rank_scatter.png"))
    proxy = pd.read_csv(REGMIX / "test_pile_loss_1m.csv").drop(columns="index")
    truth = pd.read_csv(REGMIX / "test_pile_loss_60m.csv").drop(columns="index")
    options = {"k": 3, "n_bootstrap": 200, "seed": 3, "confidence": 0.95}
    assert report["options"] == options
    for metric in ("metric/the_pile_arxiv_val_loss", "metric/the_pile_ubuntu_irc_val_loss"):
        assert report["metrics"][metric] == json_safe(
            rank_statistics(proxy[metric], truth[metric], **options)
        )
    mean = rank_statistics(proxy.mean(axis=1), truth.mean(axis=1), **options)
    assert report["metrics"]["mean"] == json_safe(mean)
    table = (out / "rank_report.md").read_text()
    assert table.strip() in result.stdout
    assert f"| **mean** | 256 | {mean['spearman']:.3f} [{mean['spearman_ci'][0]:.3f}" in table
    assert len(table.strip().splitlines()) == 2 + 14


def test_regmix_pairs_name_each_mixture_and_the_picks(regmix_run):
    """rank_pairs.csv holds each compared mixture's weights beside its two scores, and the report's
    proxy_best_row and true_best_row are rows of it."""
    out, _, report = regmix_run
    pairs = pd.read_csv(out / "rank_pairs.csv")
    mixtures = pd.read_csv(REGMIX / "test_mixture_1m.csv").drop(columns="index")
    mixtures = mixtures.loc[:, ~mixtures.columns.str.startswith("Unnamed")]  # RegMix's trailing comma
    assert list(pairs.columns[: mixtures.shape[1]]) == report["mixture_columns"] == list(mixtures.columns)
    np.testing.assert_allclose(pairs[mixtures.columns].to_numpy(), mixtures.to_numpy(), rtol=0, atol=1e-12)
    mean = report["metrics"]["mean"]
    assert mean["proxy_best_row"] == pairs["proxy_mean"].idxmin()
    assert mean["true_best_row"] == pairs["truth_mean"].idxmin()


def test_table_mode_compares_the_mixtures_both_tables_hold(tmp_path):
    """A proxy scores more mixtures than were trained (and a truth table may hold runs the proxy
    never scored): the statistics are those of the shared mixtures alone, the note says how many
    each table held, and rank_pairs.csv lists the shared ones."""
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(3), size=40).round(4)
    weights[:, 2] = 1 - weights[:, :2].sum(axis=1)
    loss = rng.uniform(size=40)
    frame = pd.DataFrame(weights, columns=["w_a", "w_b", "w_c"])
    frame.assign(loss=loss + 0.2 * rng.normal(size=40)).to_csv(tmp_path / "proxy.csv", index=False)
    trained = [*range(5, 30), 38]  # 26 of the proxy's 40 mixtures, and 2 the proxy never scored
    extra = pd.DataFrame([[0.2, 0.2, 0.6], [0.1, 0.3, 0.6]], columns=["w_a", "w_b", "w_c"])
    truth = pd.concat([frame.iloc[trained].assign(loss=loss[trained]), extra.assign(loss=[0.0, 1.0])])
    truth.iloc[::-1].to_csv(tmp_path / "truth.csv", index=False)
    out = tmp_path / "out"
    args = ["--proxy", str(tmp_path / "proxy.csv"), "--truth", str(tmp_path / "truth.csv")]
    result = run_rank(*args, "--bootstrap", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rank_report.json").read_text())
    note = "compared on the 26 mixtures both tables hold (of 40 in the proxy table and 28 in the truth table)"
    assert report["n_mixtures"] == 26 and note in report["note"] and note in result.stdout
    proxy = pd.read_csv(tmp_path / "proxy.csv").iloc[trained]
    expected = rank_statistics(proxy["loss"], loss[trained], k=3, n_bootstrap=20, seed=0)
    assert report["metrics"]["loss"] == json_safe(expected)
    pairs = pd.read_csv(out / "rank_pairs.csv")
    np.testing.assert_allclose(pairs[["w_a", "w_b", "w_c"]].to_numpy(), weights[trained], atol=1e-12)
    np.testing.assert_allclose(pairs["truth_loss"].to_numpy(), loss[trained], atol=1e-12)


def test_table_mode_joins_shuffled_rows_and_higher_is_better(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), size=30).round(4)
    weights[:, 2] = 1 - weights[:, :2].sum(axis=1)
    acc = rng.uniform(size=30)
    loss = rng.uniform(size=30)
    proxy = pd.DataFrame(weights, columns=["w_a", "w_b", "w_c"]).assign(
        acc=acc + 0.3 * rng.normal(size=30), loss=loss
    )
    truth = pd.DataFrame(weights, columns=["w_a", "w_b", "w_c"]).assign(acc=acc, loss=loss, note="x")
    proxy["note"] = "y"
    proxy.to_csv(tmp_path / "proxy.csv", index=False)
    order = rng.permutation(30)
    truth.iloc[order].to_csv(tmp_path / "truth.csv", index=False)
    out = tmp_path / "out"
    args = [
        "--proxy",
        str(tmp_path / "proxy.csv"),
        "--truth",
        str(tmp_path / "truth.csv"),
        "--bootstrap",
        "50",
    ]
    result = run_rank(*args, "--higher-is-better", "acc", "--metrics", "acc", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rank_report.json").read_text())
    expected = rank_statistics(proxy["acc"], acc, higher_is_better=True, n_bootstrap=50)
    assert report["metrics"]["acc"] == json_safe(expected)
    assert report["metrics"]["mean"] == report["metrics"]["acc"]
    mixed = run_rank(*args, "--higher-is-better", "acc", "--out", str(out))
    report = json.loads((out / "rank_report.json").read_text())
    assert mixed.returncode == 0 and list(report["metrics"]) == [
        "acc",
        "loss",
    ]  # 'note' is text: not a metric
    assert report["metrics"]["loss"]["spearman"] == pytest.approx(1.0)
    assert "mix lower- and higher-is-better" in mixed.stdout


def error_cases(tmp: Path) -> list[tuple[list[str], str]]:
    good = tmp / "good.csv"
    pd.DataFrame({"w_a": [0.5, 1.0, 0.0], "w_b": [0.5, 0.0, 1.0], "loss": [1.0, 2.0, 3.0]}).to_csv(
        good, index=False
    )
    (tmp / "other.csv").write_text("w_a,w_b,acc\n0.5,0.5,1\n1.0,0.0,2\n0.0,1.0,3\n")
    (tmp / "noweights.csv").write_text("a,b,loss\n0.5,0.5,1\n1.0,0.0,2\n")
    (tmp / "malformed.csv").write_text('w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2,7,8\n"0.1')
    (tmp / "unquoted.csv").write_text('w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2\n"0.1')
    (tmp / "moved.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n0.9,0.1,2\n0.0,1.0,3\n")
    (tmp / "sum.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2\n0.5,0.6,3\n")
    (tmp / "nan.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,\n0.0,1.0,3\n")
    # a metric with one text cell is refused as an empty cell is, not dropped with its column
    (tmp / "text.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,abc\n0.0,1.0,3\n")
    (tmp / "negative.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.1,-0.1,2\n0.0,1.0,3\n")
    (tmp / "twice.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2\n0.0,1.0,3\n1.0,0.0,4\n")
    (tmp / "three.csv").write_text("w_a,w_b,w_c,loss\n0.5,0.5,0,1\n1.0,0.0,0,2\n0.0,0.5,0.5,3\n")
    (tmp / "two.csv").write_text("w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2\n")
    g = str(good)
    return [
        (
            ["--proxy", str(tmp / "text.csv"), "--truth", g],
            "text.csv line 3: column loss is empty or not a finite number",
        ),
        (
            ["--proxy", g, "--truth", str(tmp / "negative.csv")],
            "negative.csv line 3: weight w_b is negative (-0.1)",
        ),
        (
            ["--proxy", str(tmp / "twice.csv"), "--truth", g],
            f"twice.csv line 5: the same weights as {tmp / 'twice.csv'} line 3; average repeated runs",
        ),
        (
            ["--proxy", g, "--truth", str(tmp / "twice.csv")],
            f"twice.csv line 5: the same weights as {tmp / 'twice.csv'} line 3; average repeated runs",
        ),
        (
            ["--proxy", g, "--truth", str(tmp / "three.csv")],
            f"good.csv: no mixture column(s) ['w_c'] (present in {tmp / 'three.csv'})",
        ),
        (
            ["--proxy", str(tmp / "three.csv"), "--truth", g],
            f"good.csv: no mixture column(s) ['w_c'] (present in {tmp / 'three.csv'})",
        ),
        (
            ["--proxy", str(tmp / "two.csv"), "--truth", g],
            "two.csv and " + g + " share only 2 mixture(s); the rank statistics need at least 3",
        ),
        (["--proxy", str(tmp / "missing.csv"), "--truth", g], "missing.csv: no such file"),
        (["--proxy", g, "--truth", str(tmp / "other.csv")], "share no numeric metric columns"),
        (["--proxy", str(tmp / "noweights.csv"), "--truth", g], "no mixture columns"),
        (
            ["--proxy", str(tmp / "malformed.csv"), "--truth", g],
            "malformed.csv line 3: 5 cells, but the header names 3",
        ),
        (["--proxy", str(tmp / "unquoted.csv"), "--truth", g], "not a readable CSV table"),
        (
            ["--proxy", str(tmp / "moved.csv"), "--truth", g],
            f"moved.csv and {g} share only 2 mixture(s); the rank statistics need at least 3",
        ),
        (["--proxy", g, "--truth", g, "--k", "0"], "need --k ≥ 1 and --bootstrap ≥ 0, got 0 and 1000"),
        (["--proxy", g, "--truth", g, "--bootstrap", "-1"], "need --k ≥ 1 and --bootstrap ≥ 0, got 3 and -1"),
        (["--proxy", g, "--truth", str(tmp)], f"{tmp} is a directory, not a file"),
        (
            ["--proxy", g, "--truth", str(tmp / "sum.csv")],
            "sum.csv line 4: weights sum to 1.1, not 1 (±0.005)",
        ),
        (
            ["--proxy", g, "--truth", str(tmp / "nan.csv")],
            "nan.csv line 3: column loss is empty or not a finite number",
        ),
        (["--proxy", g, "--truth", g, "--higher-is-better", "acc"], "--higher-is-better names ['acc']"),
        (["--proxy", f"{g}+{tmp / 'missing.csv'}", "--truth", g], "missing.csv: no such file"),
        (["recipes/tiny.yaml", "--grid", g], "column w_a names an expert the recipe does not have"),
    ]


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    for args, message in error_cases(tmp_path):
        result = run_rank(*args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), (args, result.stderr)
        assert message in lines[0], (message, lines[0])
    assert not (tmp_path / "out").exists()


def test_a_metrics_file_alone_is_told_to_join_its_mixtures(tmp_path):
    """RegMix's METRICS.csv given without its MIXTURES.csv: the error says how to join them."""
    (tmp_path / "loss.csv").write_text("index,loss\n1,1.0\n2,2.0\n3,3.0\n")
    with pytest.raises(UserError, match=r"loss.csv: no mixture columns .* as MIXTURES.csv\+METRICS.csv"):
        rank_tables(str(tmp_path / "loss.csv"), str(tmp_path / "loss.csv"), n_bootstrap=0)


def test_table_mode_ranks_no_bookkeeping_or_weight_column(tmp_path):
    """run, tokens, seed and a weight column not chosen as a mixture column are not metrics."""
    from mergeopt.evaluation.tables import rank_tables

    table = {
        "run": [0, 1, 2, 3],
        "w_a": [1.0, 0.6, 0.3, 0.0],
        "w_b": [0.0, 0.4, 0.7, 1.0],
        "tokens": [100, 200, 300, 400],
        "seed": [0, 0, 0, 0],
        "loss": [3.0, 2.0, 2.5, 1.0],
    }
    for name in ("proxy", "truth"):
        pd.DataFrame(table).to_csv(tmp_path / f"{name}.csv", index=False)
    proxy, truth = str(tmp_path / "proxy.csv"), str(tmp_path / "truth.csv")
    report, *_ = rank_tables(proxy, truth, n_bootstrap=0)
    assert list(report["metrics"]) == ["loss", "mean"]
    report, *_ = rank_tables(proxy, truth, mixture_cols=["w_a", "w_b"], n_bootstrap=0)
    assert list(report["metrics"]) == ["loss", "mean"]


MIX = "index,w_a,w_b\n1,0.25,0.75\n2,1.0,0.0\n"
LOSS = "index,loss_a\n2,3.0\n1,1.0\n"


@pytest.mark.parametrize(
    ("files", "spec", "message"),
    [
        (
            {"mix.csv": MIX, "loss.csv": "index,loss_a\n"},
            "mix.csv+loss.csv",
            r"loss.csv: the table has no rows$",
        ),
        (
            {"mix.csv": MIX, "loss.csv": LOSS},
            "mix.csv+loss.csv+",
            r"as MIXTURES.csv\+METRICS.csv \(two files\)$",
        ),
        (
            {"mix.csv": MIX, "loss.csv": "loss_a\n3.0\n1.0\n"},
            "mix.csv+loss.csv",
            r"loss.csv: a split table needs an 'index' column to join on$",
        ),
        (
            {"mix.csv": MIX, "loss.csv": "index,loss_a\n2,3.0\n2,1.0\n"},
            "mix.csv+loss.csv",
            r"loss.csv line 3: index 2 appears more than once, first at \S*loss.csv line 2$",
        ),
        (
            {"mix.csv": MIX, "loss.csv": "index,loss_a\n2,3.0\n7,1.0\n"},
            "mix.csv+loss.csv",
            r"mix.csv line 2: index 1 has no row in the other file$",
        ),
        (
            {"mix.csv": MIX, "loss.csv": "index,w_b,loss_a\n2,0.0,3.0\n1,0.75,1.0\n"},
            "mix.csv+loss.csv",
            r"mix.csv\+.*loss.csv: both files have column\(s\) \['w_b'\]$",
        ),
    ],
)
def test_split_tables_that_cannot_be_joined_are_one_line_errors(tmp_path, files, spec, message):
    """MIXTURES.csv+METRICS.csv (RegMix's layout) is joined on ``index``; each way the two files
    cannot be joined row for row is named, with the file, before any ranking."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    spec = "+".join(str(tmp_path / p) if p else p for p in spec.split("+"))
    with pytest.raises(UserError, match=message):
        load_table(spec)


def test_a_metric_column_that_is_not_numeric_is_named(tmp_path):
    """A metric's cell that is not a number is refused naming its line, whether the metric was asked
    for or found; a column of text only (a run's name) is no metric and is left alone."""
    from mergeopt.evaluation.tables import rank_tables

    (tmp_path / "proxy.csv").write_text("w_a,w_b,loss\n0.5,0.5,1.0\n1.0,0.0,2.0\n0.0,1.0,3.0\n")
    (tmp_path / "truth.csv").write_text("w_a,w_b,loss\n0.5,0.5,low\n1.0,0.0,high\n0.0,1.0,3.0\n")
    proxy, truth = str(tmp_path / "proxy.csv"), str(tmp_path / "truth.csv")
    message = r"truth.csv line 2: column loss is empty or not a finite number \(and 1 more row\(s\) below\)$"
    with pytest.raises(UserError, match=message):
        rank_tables(proxy, truth, metrics=["loss"])
    with pytest.raises(UserError, match=message):
        rank_tables(proxy, truth)
    (tmp_path / "named.csv").write_text(
        "name,w_a,w_b,loss,acc\nx,0.5,0.5,1.0,5\ny,1.0,0.0,2.0,abc\nz,0.0,1.0,3.0,4\n"
    )
    (tmp_path / "plain.csv").write_text(
        "name,w_a,w_b,loss,acc\nu,0.5,0.5,1.0,1\nv,1.0,0.0,2.0,2\nw,0.0,1.0,4.0,3\n"
    )
    named, plain = str(tmp_path / "named.csv"), str(tmp_path / "plain.csv")
    with pytest.raises(UserError, match=r"named.csv line 3: column acc is empty or not a finite number$"):
        rank_tables(named, plain, n_bootstrap=0)  # acc was dropped, and the mean changed without it
    report, *_ = rank_tables(named, plain, metrics=["loss"], n_bootstrap=0)
    assert list(report["metrics"]) == ["loss", "mean"]
    report, *_ = rank_tables(plain, plain, n_bootstrap=0)
    assert list(report["metrics"]) == ["loss", "acc", "mean"]  # name: text only, not a metric


def test_table_mode_statistics_of_a_constant_metric_are_undefined(tmp_path):
    """A constant score ranks nothing: Spearman, and the pick's top-1, top-k and regret (a tie-break
    before), are n/a (null in JSON), and the mean is over the metrics that vary."""
    from mergeopt.evaluation.rank_report import markdown_table
    from mergeopt.evaluation.tables import rank_tables

    w = {"w_a": [1.0, 0.75, 0.5, 0.25, 0.0], "w_b": [0.0, 0.25, 0.5, 0.75, 1.0]}
    pd.DataFrame({**w, "loss": [1.0] * 5, "acc": [5.0, 4.0, 3.0, 1.0, 2.0]}).to_csv(
        tmp_path / "proxy.csv", index=False
    )
    truth = {"loss": [2.0, 1.0, 3.0, 4.0, 5.0], "acc": [5.0, 4.0, 3.0, 2.0, 1.0]}
    pd.DataFrame({**w, **truth}).to_csv(tmp_path / "truth.csv", index=False)
    report, pairs, _ = rank_tables(str(tmp_path / "proxy.csv"), str(tmp_path / "truth.csv"), n_bootstrap=20)
    loss = json_safe(report["metrics"]["loss"])
    assert loss["spearman"] is None and loss["pairwise_accuracy"] == 0.5
    assert [loss[k] for k in ("top1_hit", "topk_hit", "topk_overlap", "regret")] == [None] * 4
    assert pairs["mean"][1].tolist() == truth["acc"]  # the mean leaves the constant loss out
    assert report["metrics"]["mean"] == rank_statistics(
        *pairs["acc"], n_bootstrap=20, name="mean", undefined_when_constant=True
    )
    assert report["metrics"]["mean"]["regret"] == pytest.approx(1 / 4)
    table = markdown_table(report)
    assert "| loss | 5 | n/a [n/a, n/a] | n/a [n/a, n/a] | 0.500 | n/a | n/a | n/a |" in table
    assert "mean of acc; left out, constant in a table: loss" in table
    out = tmp_path / "out"
    result = run_rank(
        "--proxy",
        str(tmp_path / "proxy.csv"),
        "--truth",
        str(tmp_path / "truth.csv"),
        "--bootstrap",
        "0",
        "--k",
        "100",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "rank_report.json").read_text())["metrics"]["loss"]["regret"] is None
    # --k 100 is clamped to the 5 mixtures: the label says the k used
    assert "| top-1 | top-5 | regret |" in result.stdout and "top-100" not in result.stdout


@pytest.mark.parametrize(
    ("proxy", "truth", "options", "message"),
    [
        ([1.0, "low", 3.0], [1.0, 2.0, 3.0], {}, r"loss \(proxy\): scores are not numbers$"),
        ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], {}, r"loss \(proxy\): expected one score per mixture \(1-D\)"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], {}, r"loss: proxy has 3 mixtures but truth has 2$"),
        ([1.0], [2.0], {}, r"loss: rank checks need at least 2 mixtures, got 1$"),
        ([1.0, 2.0], [2.0, 1.0], {"k": 0}, r"loss: need k ≥ 1, n_bootstrap ≥ 0 and 0 < confidence < 1$"),
        ([1.0, 2.0], [2.0, 1.0], {"confidence": 1.0}, r"loss: need k ≥ 1"),
    ],
)
def test_rank_statistics_refuse_what_cannot_be_ranked(proxy, truth, options, message):
    """Scores that are not one number per mixture, tables of different lengths, fewer than two
    mixtures and meaningless options are refused naming the metric, never ranked as they come."""
    with pytest.raises(UserError, match=message):
        rank_statistics(proxy, truth, name="loss", **options)
