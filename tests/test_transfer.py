"""transfer: correlations against scipy.stats, regret and pairing on a hand-made table, RegMix 1M → 60M
on the same 256 mixtures, the LightGBM surrogate fitted on RegMix's 512 1M runs against RegMix's
published Spearman, determinism, the CLI's outputs against the function, and one-line errors (exit 2)
that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mergeopt.errors import run_cli
from mergeopt.evaluation.rank_report import json_safe
from mergeopt.evaluation.rank_stats import rank_statistics
from mergeopt.evaluation.transfer import main, transfer_tables
from mergeopt.evaluation.transfer_report import short_names
from tests.conftest import run_in_process, run_module
from tests.test_search_strategies import PUBLISHED

REGMIX = Path(__file__).parent / "data" / "regmix"
SMALL = f"{REGMIX / 'test_mixture_1m.csv'}+{REGMIX / 'test_pile_loss_1m.csv'}"
LARGE = f"{REGMIX / 'test_mixture_60m.csv'}+{REGMIX / 'test_pile_loss_60m.csv'}"
TRAIN = f"{REGMIX / 'train_mixture_1m.csv'}+{REGMIX / 'train_pile_loss_1m.csv'}"

# RegMix's published Spearman ×100 of its LightGBM, fitted on the 512 1M train runs and scored on the
# 256 1M test runs (README of tests/data/regmix; their notebook early-stopped on the test runs, we
# use fixed rounds). The same figures and tolerance as test_search_strategies' surrogate test.
PUBLISHED_TOLERANCE = 0.01  # |ours − published| on Spearman (not ×100)

# Measured (seed 0, default surrogate settings), recorded so that a change shows:
# Spearman of the 1M measured losses against the 60M ones on the same 256 mixtures (scipy's value) ...
DIRECT_SPEARMAN = {"arxiv": 0.9948, "dm_mathematics": 0.9883, "pile_cc": 0.9941, "ubuntu_irc": 0.9801}
DIRECT_MEAN = {
    "spearman": 0.9658,
    "kendall": 0.8485,
    "regret_raw": 0.0080,
    "regret": 0.0053,
    "choice_rank": 2,
}
# ... and of the surrogate's predictions (fitted on the 512 1M runs) against the 60M losses.
SURROGATE_60M = {
    "arxiv": 0.9907,
    "freelaw": 0.9957,
    "pubmed_central": 0.9850,
    "wikipedia_en": 0.9921,
    "dm_mathematics": 0.9558,
    "github": 0.9888,
    "stackexchange": 0.9949,
    "gutenberg_pg_19": 0.9893,
    "pile_cc": 0.9870,
    "ubuntu_irc": 0.9542,
    "hackernews": 0.9791,
    "pubmed_abstracts": 0.9901,
    "uspto_backgrounds": 0.9864,
    "mean": 0.9581,
}


def domain(metric: str) -> str:
    return metric if metric == "mean" else metric.split("the_pile_")[1].removesuffix("_val_loss")


def by_domain(comparison: dict, key: str = "spearman") -> dict[str, float]:
    return {domain(m): s[key] for m, s in comparison["metrics"].items()}


def losses(name: str) -> pd.DataFrame:
    return pd.read_csv(REGMIX / name).drop(columns="index")


# ---------------------------------------------------------------- hand-made tables


def write_hand_tables(tmp: Path) -> tuple[str, str]:
    """Four shared mixtures A-D, one only at the small scale (E), one only at the large scale (F)."""
    small = pd.DataFrame(
        {
            "w_a": [1.0, 0.75, 0.5, 0.25, 0.0],  # A B C D E
            "w_b": [0.0, 0.25, 0.5, 0.75, 1.0],
            "loss": [1.0, 2.0, 3.0, 4.0, 0.5],  # E is best but has no large-scale run
            "acc": [0.9, 0.5, 0.7, 0.1, 0.3],
        }
    )
    large = pd.DataFrame(
        {
            "w_a": [0.5, 1.0, 0.25, 0.75, 0.1],  # C A D B F
            "w_b": [0.5, 0.0, 0.75, 0.25, 0.9],
            "loss": [10.0, 12.0, 13.0, 11.0, 9.0],  # F is best but has no small-scale run
            "acc": [0.8, 0.6, 0.2, 0.4, 0.99],
            "extra": [1, 2, 3, 4, 5],
        }
    )
    small.to_csv(tmp / "small.csv", index=False)
    large.to_csv(tmp / "large.csv", index=False)
    return str(tmp / "small.csv"), str(tmp / "large.csv")


def test_selected_metrics_do_not_report_the_others_as_missing(tmp_path, capsys):
    small, large = write_hand_tables(tmp_path)
    report, _ = transfer_tables(small, large, metrics=["loss"], n_bootstrap=0)
    assert report["metrics"] == ["loss"] and report["skipped_metrics"] == {}
    assert main([small, large, "--metrics", "loss", "--out", str(tmp_path / "out")]) == 0
    assert "Not compared" not in capsys.readouterr().out
    assert "not compared" not in (tmp_path / "out" / "transfer_report.md").read_text()
    # without --metrics, a column only one table has is still named
    assert main([small, large, "--out", str(tmp_path / "all")]) == 0
    assert "Not compared (not in every table): LARGE's ['extra']" in capsys.readouterr().out


def test_console_counts_the_shared_mixtures_and_labels_the_k_used(tmp_path, capsys):
    """4 of the 5 mixtures are shared: the console says so (not only transfer_report.md); --k 100
    is clamped to those 4, and the labels say top-4."""
    small, large = write_hand_tables(tmp_path)
    assert main([small, large, "--k", "100", "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "SMALL→LARGE: compared on the 4 mixtures both tables hold (of 5 and 5)." in printed
    assert "Kendall intervals, top-4 overlap" in printed and "top-100" not in printed
    md = (tmp_path / "out" / "transfer_report.md").read_text()
    assert "| top-4 overlap |" in md and "top-100" not in md
    # two tables that hold the same mixtures print no count
    assert main([small, small, "--out", str(tmp_path / "out3")]) == 0
    assert "compared on the" not in capsys.readouterr().out


def test_a_constant_metric_has_no_pick_and_stays_out_of_the_aggregate(tmp_path, capsys):
    """SMALL's loss is constant: its ρ, top-k overlap, regret and pick were n/a, 1 and a tie-break;
    now all are n/a (null in JSON), and the mean is taken over acc alone."""
    w = {"w_a": [1.0, 0.75, 0.5, 0.25, 0.0], "w_b": [0.0, 0.25, 0.5, 0.75, 1.0]}
    pd.DataFrame({**w, "loss": [1.0] * 5, "acc": [1.0, 2.0, 3.0, 5.0, 4.0]}).to_csv(
        tmp_path / "small.csv", index=False
    )
    large = {"loss": [5.0, 1.0, 3.0, 4.0, 2.0], "acc": [1.0, 2.0, 3.0, 4.0, 5.0]}
    pd.DataFrame({**w, **large}).to_csv(tmp_path / "large.csv", index=False)
    args = [str(tmp_path / "small.csv"), str(tmp_path / "large.csv"), "--bootstrap", "0"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| loss | n/a [n/a, n/a] | n/a | n/a |" in printed
    assert "SMALL→LARGE: the mean leaves out ['loss'], constant in a table" in printed
    report = json.loads((tmp_path / "out" / "transfer_report.json").read_text())
    comparison = report["comparisons"]["small_to_large"]
    loss = comparison["metrics"]["loss"]
    assert [loss[k] for k in ("spearman", "top1_hit", "topk_overlap", "regret", "regret_raw")] == [None] * 5
    assert (loss["choice_rank"], loss["choice"], loss["best"]) == (None, None, "row 2")
    assert comparison["aggregate_left_out"] == ["loss"]
    assert comparison["metrics"]["mean"] == comparison["metrics"]["acc"]  # the mean of acc alone
    md = (tmp_path / "out" / "transfer_report.md").read_text()
    assert "| loss | 5 | n/a [n/a, n/a] | n/a [n/a, n/a] | n/a | n/a | n/a | n/a |" in md


def test_hand_table_pairs_shared_mixtures_and_regret_by_hand(tmp_path):
    small, large = write_hand_tables(tmp_path)
    report, pairs = transfer_tables(small, large, higher_is_better=["acc"], k=2, n_bootstrap=0)
    assert report["n_mixtures"] == {"small": 5, "large": 5, "shared": 4, "train": None}
    assert report["skipped_metrics"] == {"LARGE": ["extra"]}
    assert report["aggregate"] == "mean_rank"  # loss and acc point different ways
    loss_small, loss_large = np.array([1.0, 2, 3, 4]), np.array([12.0, 11, 10, 13])  # A B C D
    acc_small, acc_large = np.array([0.9, 0.5, 0.7, 0.1]), np.array([0.6, 0.4, 0.8, 0.2])
    np.testing.assert_array_equal(pairs["small_to_large"]["loss"][0], loss_small)
    np.testing.assert_array_equal(pairs["small_to_large"]["loss"][1], loss_large)
    s = report["comparisons"]["small_to_large"]["metrics"]
    assert s["loss"]["spearman"] == pytest.approx(stats.spearmanr(loss_small, loss_large).statistic)
    assert s["loss"]["kendall"] == pytest.approx(stats.kendalltau(loss_small, loss_large).statistic)
    # SMALL picks A (loss 1); at LARGE, A scores 12 against the best shared 10 (C); range 13 − 10
    assert s["loss"]["regret_raw"] == pytest.approx(2.0)
    assert s["loss"]["regret"] == pytest.approx(2.0 / 3.0)
    assert s["loss"]["choice_rank"] == 3 and s["loss"]["choice"] == "row 2" and s["loss"]["best"] == "row 1"
    assert s["loss"]["topk_overlap"] == 0.5  # top-2 {A, B} against {C, B}
    # acc, higher is better: SMALL picks A (0.9); at LARGE A has 0.6 against C's 0.8
    assert s["acc"]["regret_raw"] == pytest.approx(0.2)
    assert s["acc"]["regret"] == pytest.approx(0.2 / 0.6)
    assert s["acc"]["choice_rank"] == 2
    assert s["acc"]["spearman"] == pytest.approx(stats.spearmanr(acc_small, acc_large).statistic)
    for side, (loss, acc) in enumerate(((loss_small, acc_small), (loss_large, acc_large))):
        mean_rank = (stats.rankdata(loss) + stats.rankdata(-acc)) / 2  # 1 = best, per metric
        np.testing.assert_allclose(pairs["small_to_large"]["mean_rank"][side], mean_rank)
    assert set(report["comparisons"]) == {"small_to_large"} and report["surrogate"] is None


def test_short_names_cut_at_separators():
    names = ["metric/the_pile_arxiv_val_loss", "metric/the_pile_pile_cc_val_loss"]
    assert short_names(names) == (
        {names[0]: "arxiv", names[1]: "pile_cc"},
        "metric/the_pile_",
        "_val_loss",
    )
    assert short_names(["loss_a", "loss_ab"])[0] == {"loss_a": "a", "loss_ab": "ab"}
    assert short_names(["acc", "acc_x"])[0] == {"acc": "acc", "acc_x": "acc_x"}  # nothing left of acc
    assert short_names(["loss"])[0] == {"loss": "loss"}


# ---------------------------------------------------------------- RegMix


def test_regmix_1m_to_60m_equals_scipy():
    report, _ = transfer_tables(SMALL, LARGE, n_bootstrap=0)
    assert report["n_mixtures"]["shared"] == 256 and len(report["mixture_columns"]) == 17
    small, large = losses("test_pile_loss_1m.csv"), losses("test_pile_loss_60m.csv")
    small["mean"], large["mean"] = small.mean(axis=1), large.mean(axis=1)
    comparison = report["comparisons"]["small_to_large"]
    assert list(comparison["metrics"]) == list(small.columns)
    for metric, s in comparison["metrics"].items():
        assert s["spearman"] == pytest.approx(
            stats.spearmanr(small[metric], large[metric]).statistic, abs=1e-12
        )
        assert s["kendall"] == pytest.approx(
            stats.kendalltau(small[metric], large[metric]).statistic, abs=1e-12
        )
        chosen = int(np.argmin(small[metric]))
        assert s["regret_raw"] == pytest.approx(large[metric].iloc[chosen] - large[metric].min(), abs=1e-12)
    rho = by_domain(comparison)
    assert {d: rho[d] for d in DIRECT_SPEARMAN} == pytest.approx(DIRECT_SPEARMAN, abs=1e-4)
    mean = comparison["metrics"]["mean"]
    assert {key: mean[key] for key in DIRECT_MEAN} == pytest.approx(DIRECT_MEAN, abs=1e-4)


@pytest.fixture(scope="module")
def regmix_surrogate():
    return transfer_tables(SMALL, LARGE, surrogate_fit=TRAIN, n_bootstrap=20, seed=0)


def test_surrogate_on_regmix_matches_published_spearman(regmix_surrogate):
    report, _ = regmix_surrogate
    assert report["n_mixtures"]["train"] == 512
    assert report["surrogate"]["early_stopping"] is None and report["surrogate"]["rounds"] == 300
    assert report["surrogate"]["train_mixtures_in"] == {"SMALL": 0, "LARGE": 0}  # held out
    rho_1m = by_domain(report["comparisons"]["surrogate_to_small"])
    for name, published in PUBLISHED.items():
        assert abs(rho_1m[name] - published / 100) <= PUBLISHED_TOLERANCE, (name, rho_1m[name], published)
    rho_60m = by_domain(report["comparisons"]["surrogate_to_large"])
    assert rho_60m["pile_cc"] > 0.5 and min(rho_60m.values()) > 0.5
    assert rho_60m == pytest.approx(SURROGATE_60M, abs=2e-3)


def test_a_surrogate_trained_on_compared_mixtures_says_so_on_the_console(tmp_path):
    """A training table that holds some of LARGE's mixtures (here 10 of RegMix's 1M test runs added
    to its 512 training runs) is counted in the report and said under the summary table."""
    from mergeopt.evaluation.tables import load_table
    from mergeopt.evaluation.transfer_report import context_notes

    train, small = load_table(TRAIN)[0], load_table(SMALL)[0]
    pd.concat([train, small.iloc[:10]]).drop(columns="index", errors="ignore").to_csv(
        tmp_path / "train.csv", index=False
    )
    report, _ = transfer_tables(None, LARGE, surrogate_fit=str(tmp_path / "train.csv"), n_bootstrap=0)
    assert report["surrogate"]["train_mixtures_in"] == {"LARGE": 10}
    line = "The surrogate's training table holds 10 of LARGE's 256 mixtures: there its scores are fitted"
    assert any(note.startswith(line) for note in context_notes(report))
    assert not any("training table holds" in note for note in context_notes(report | {"surrogate": None}))


def test_surrogate_report_is_deterministic(regmix_surrogate):
    again, _ = transfer_tables(SMALL, LARGE, surrogate_fit=TRAIN, n_bootstrap=20, seed=0)
    assert json_safe(again) == json_safe(regmix_surrogate[0])
    other = transfer_tables(SMALL, LARGE, surrogate_fit=TRAIN, n_bootstrap=20, seed=1)[0]
    mean = other["comparisons"]["surrogate_to_large"]["metrics"]["mean"]
    assert (
        mean["spearman_ci"]
        != regmix_surrogate[0]["comparisons"]["surrogate_to_large"]["metrics"]["mean"]["spearman_ci"]
    )


def test_cli_surrogate_outputs_match_the_function(tmp_path, regmix_surrogate):
    out = tmp_path / "out"
    result = run_in_process(
        "transfer", SMALL, LARGE, "--surrogate-fit", TRAIN, "--bootstrap", "20", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert all((out / name).stat().st_size > 0 for name in ("transfer_report.md", "transfer_scatter.png"))
    report = json.loads((out / "transfer_report.json").read_text())
    assert report == {
        "schema_version": 1,
        **json_safe(regmix_surrogate[0]),
    }  # another process, the same report
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| metric | SMALL→LARGE ρ [CI] | τ | regret | surrogate→LARGE ρ [CI]")
    assert sum(line.startswith("| ") for line in lines) == 2 + 14
    mean = report["comparisons"]["small_to_large"]["metrics"]["mean"]
    assert f"| **mean** | {mean['spearman']:.3f} [{mean['spearman_ci'][0]:.3f}" in result.stdout
    table = (out / "transfer_report.md").read_text()
    assert table.count("## ") == 3 and "fixed rounds, no early stopping" in table


def test_cli_direct_and_surrogate_alone(tmp_path):
    small, large = write_hand_tables(tmp_path)
    assert run_cli(main, [small, large, "--metrics", "loss", "--out", str(tmp_path / "direct")]) == 0
    report = json.loads((tmp_path / "direct" / "transfer_report.json").read_text())
    assert report["aggregate"] is None and list(report["comparisons"]) == ["small_to_large"]
    expected = rank_statistics([1.0, 2, 3, 4], [12.0, 11, 10, 13], n_bootstrap=1000)
    assert {k: report["comparisons"]["small_to_large"]["metrics"]["loss"][k] for k in expected} == json_safe(
        expected
    )
    # LARGE alone with a surrogate fitted on SMALL: only surrogate → LARGE
    args = [large, "--surrogate-fit", small, "--metrics", "loss", "--rounds", "5", "--min-child-samples", "1"]
    assert run_cli(main, [*args, "--bootstrap", "0", "--out", str(tmp_path / "alone")]) == 0
    report = json.loads((tmp_path / "alone" / "transfer_report.json").read_text())
    assert list(report["comparisons"]) == ["surrogate_to_large"] and report["small"] is None
    assert report["surrogate"]["rounds"] == 5 and report["comparisons"]["surrogate_to_large"]["n"] == 5


# ---------------------------------------------------------------- errors


def error_cases(tmp: Path) -> list[tuple[list[str], str]]:
    small, large = write_hand_tables(tmp)
    files = {
        "prefix.csv": "x_a,x_b,loss\n1.0,0.0,1\n0.5,0.5,2\n",
        "regmix_style.csv": "train_a,train_b,loss\n1.0,0.0,1\n0.5,0.5,2\n",
        "third.csv": "w_a,w_b,w_c,loss\n1.0,0.0,0,1\n0.5,0.5,0,2\n",
        "elsewhere.csv": "w_a,w_b,loss\n0.9,0.1,1\n0.2,0.8,2\n",
        "one.csv": "w_a,w_b,loss\n1.0,0.0,1\n0.9,0.1,2\n",
        "nan.csv": "w_a,w_b,loss\n1.0,0.0,1\n0.5,0.5,\n0.0,1.0,3\n",
        "twice.csv": "w_a,w_b,loss\n1.0,0.0,1\n0.5,0.5,2\n1.0,0.0,3\n",
        "sum.csv": "w_a,w_b,loss\n1.0,0.0,1\n0.5,0.6,2\n",
        "noloss.csv": "w_a,w_b,acc\n1.0,0.0,1\n0.5,0.5,2\n",
        "malformed.csv": 'w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2,7,8\n"0.1',
        "unquoted.csv": 'w_a,w_b,loss\n0.5,0.5,1\n1.0,0.0,2\n"0.1',
        # one text cell in a metric: refused as an empty cell is, not dropped (nor blamed on LARGE)
        "text.csv": "w_a,w_b,loss,acc\n1.0,0.0,1,0.1\n0.5,0.5,2,abc\n0.25,0.75,3,0.3\n",
        "negative.csv": "w_a,w_b,loss\n1.0,0.0,1\n1.1,-0.1,2\n0.5,0.5,3\n",
        "lacks_b.csv": "w_a,loss\n1.0,1\n0.5,2\n0.25,3\n",
        "two_shared.csv": "w_a,w_b,loss\n1.0,0.0,1\n0.5,0.5,2\n0.1,0.9,3\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    t = {name: str(tmp / name) for name in files}
    return [
        ([small, str(tmp / "missing.csv")], "missing.csv: no such file"),
        ([small, t["prefix.csv"]], "prefix.csv: no mixture columns"),
        ([small, t["regmix_style.csv"]], "lacks ['w_a', 'w_b']; it has extra ['train_a', 'train_b']"),
        ([small, t["third.csv"]], f"small.csv: no mixture column(s) ['w_c'] (present in {t['third.csv']})"),
        ([small, t["elsewhere.csv"]], "share no mixtures (rows are matched on their weights"),
        ([small, t["one.csv"]], "share only 1 mixture(s); the rank statistics need at least 3"),
        ([small, t["two_shared.csv"]], "share only 2 mixture(s); the rank statistics need at least 3"),
        ([t["text.csv"], large], "text.csv line 3: column acc is empty or not a finite number"),
        ([small, t["negative.csv"]], "negative.csv line 3: weight w_b is negative (-0.1)"),
        ([t["lacks_b.csv"], large], f"lacks_b.csv: no mixture column(s) ['w_b'] (present in {large})"),
        ([small, t["lacks_b.csv"]], f"lacks_b.csv: no mixture column(s) ['w_b'] (present in {small})"),
        ([small, t["nan.csv"]], "nan.csv line 3: column loss is empty or not a finite number"),
        ([t["twice.csv"], large], f"twice.csv line 4: the same weights as {t['twice.csv']} line 2"),
        ([small, t["sum.csv"]], "sum.csv line 3: weights sum to 1.1, not 1 (±0.005)"),
        ([small, t["noloss.csv"], "--metrics", "loss"], "noloss.csv: no metric column(s) ['loss']"),
        ([small, large, "--metrics", "extra"], "small.csv: no metric column(s) ['extra']"),
        ([t["malformed.csv"], large], "malformed.csv line 3: 5 cells, but the header names 3 columns"),
        ([t["unquoted.csv"], large], "not a readable CSV table"),
        ([small, large, "--higher-is-better", "nope"], "--higher-is-better names ['nope']"),
        ([large], "expected SMALL LARGE, or LARGE with --surrogate-fit TRAIN; got 1"),
        ([small, large, "--rounds", "5"], "need --surrogate-fit"),
        ([small, large, "--surrogate-fit", t["nan.csv"]], "nan.csv line 3: column loss is empty or not a"),
        ([small, large, "--surrogate-fit", t["third.csv"]], "small.csv: no mixture column(s) ['w_c']"),
        ([t["one.csv"], "--surrogate-fit", large], "one.csv: only 2 mixture(s); the rank statistics"),
        # too few runs for LightGBM to split once: every prediction would be the same, the report all n/a
        (
            [large, "--surrogate-fit", t["two_shared.csv"]],
            "two_shared.csv: only 3 run(s) to fit the surrogate",
        ),
        ([large, "--surrogate-fit", small], "with --min-child-samples 3 LightGBM needs at least 6 to split"),
        ([large, "--surrogate-fit", t["one.csv"], "--min-child-samples", "1"], "needs at least 3 to split"),
        ([small, large, "--surrogate-fit", t["noloss.csv"], "--metrics", "loss"], "noloss.csv: no metric"),
        (
            [small, large, "--surrogate-fit", small, "--rounds", "0"],
            "--rounds: Input should be greater than 0",
        ),
        ([small, large, "--k", "0"], "need --k ≥ 1 and --bootstrap ≥ 0, got 0 and 1000"),
    ]


def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    for args, message in error_cases(tmp_path):
        capsys.readouterr()
        assert run_cli(main, [*args, "--out", str(out)]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), (args, lines)
        assert message in lines[0], (message, lines[0])
    assert not out.exists()


def test_module_entry_point_error(tmp_path):
    small, _ = write_hand_tables(tmp_path)
    result = run_module("transfer", small, str(tmp_path / "absent.csv"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"mergeopt: error: {tmp_path / 'absent.csv'}: no such file"
    assert not (tmp_path / "out").exists()


TINY_GRIDS = Path(__file__).parent / "data"
TINY_LOSSES = ["loss_arith", "loss_reverse", "loss_brackets", "loss_markov"]
# measured with benchmarks/transfer_tiny.sh (64-wide 2-layer against 128-wide 4-layer, 20 mixtures)
TINY_SPEARMAN = {"loss_arith": 0.893, "loss_reverse": 0.795, "loss_brackets": 0.835, "loss_markov": 0.874}


def test_tiny_world_two_sizes_end_to_end():
    """mergeopt.worlds.train's grids at two model sizes of the tiny world, ranked against each other."""
    small_path, large_path = (
        TINY_GRIDS / "tiny_grid" / "grid.csv",
        TINY_GRIDS / "tiny_grid_large" / "grid.csv",
    )
    report, _ = transfer_tables(str(small_path), str(large_path), metrics=TINY_LOSSES, n_bootstrap=0)
    assert report["n_mixtures"]["shared"] == 20
    small = pd.read_csv(small_path).sort_values(["w_arith", "w_reverse", "w_brackets", "w_markov"])
    large = pd.read_csv(large_path).sort_values(["w_arith", "w_reverse", "w_brackets", "w_markov"])
    comparison = report["comparisons"]["small_to_large"]["metrics"]
    for metric in TINY_LOSSES:
        expected = stats.spearmanr(small[metric], large[metric]).statistic
        assert comparison[metric]["spearman"] == pytest.approx(expected, abs=1e-12)
        assert comparison[metric]["spearman"] == pytest.approx(TINY_SPEARMAN[metric], abs=1e-3)
