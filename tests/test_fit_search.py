"""fit with every search strategy and merge method, checked against direct evaluations.

The zero-order path of ``mergeopt.fit``: the chosen mixture is the best row of evaluations.csv,
the reported scores equal a fresh evaluation of the merged model at that mixture, the budget holds,
a rerun with the same seed writes the same log, and a user's mistakes end in one line, exit code 2.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch

from mergeopt.config import recipe_from_dict
from mergeopt.errors import UserError
from mergeopt.fit import fit
from mergeopt.loading.problem import load_problem
from mergeopt.objectives import metrics
from mergeopt.objectives.loss import evaluate, target_loss
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.scoring import make_scorer
from mergeopt.reporting.outcome_warnings import worse_than_expert_line
from tests.conftest import REPO, recipe_tree, run_in_process

ZERO_ORDER = {
    "grid": {"strategy": "grid", "grid": {"divisions": 3}},
    "dirichlet": {"strategy": "dirichlet", "dirichlet": {"samples": 8}},
    "cmaes": {"strategy": "cmaes", "budget": 12},
    "spsa": {"strategy": "spsa", "budget": 12},
    "surrogate": {
        "strategy": "surrogate",
        "budget": 14,
        "surrogate": {"seeds": 8, "verify": 3, "candidates": 2000},
    },
}


def _rows(out):
    return list(csv.DictReader((out / "evaluations.csv").open()))


@pytest.mark.parametrize("strategy", sorted(ZERO_ORDER))
def test_zero_order_fit_returns_the_best_logged_mixture(strategy, random_world, tmp_path):
    tree = recipe_tree(random_world, tmp_path / "run", search=ZERO_ORDER[strategy])
    recipe = recipe_from_dict(tree)
    mixture = fit(recipe, progress=False, log=lambda _m: None)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {
        "mixture.json",
        "evaluations.csv",
        "recipe.yaml",
        "search_curve.png",
        "simplex.png",
        "report.md",
    }
    assert json.loads((out / "mixture.json").read_text()) == json.loads(json.dumps(mixture))
    rows = _rows(out)
    names = list(mixture["weights"])
    assert len(rows) == mixture["search"]["evaluations"]
    if recipe.search.budget is not None:
        assert len(rows) <= recipe.search.budget
    weights = [tuple(float(r[f"w_{n}"]) for n in names) for r in rows]
    assert len(set(weights)) == len(weights), "a mixture was evaluated twice"
    best = min(rows, key=lambda r: float(r["value"]))
    assert mixture["search"]["value"] == pytest.approx(float(best["value"]), rel=1e-12)
    for n in names:
        assert mixture["weights"][n] == pytest.approx(float(best[f"w_{n}"]), abs=1e-9)
    # the logged value is the target dev loss on the fit part, recomputed here from scratch
    problem = load_problem(recipe, progress=False)
    w = torch.tensor([mixture["weights"][n] for n in names], dtype=torch.float32)
    means = evaluate(problem.model, problem.stack, w, problem.sets, "fit", 16, problem.pad_id, problem.device)
    assert float(target_loss(means, torch.ones_like(means), torch.ones(len(means)))) == pytest.approx(
        mixture["search"]["value"], rel=1e-5
    )
    held = mixture["objective"]["scores"]["fitted"]["heldout"]["loss:all"]
    assert held == pytest.approx(mixture["search"]["heldout_value"], rel=1e-12)


def test_zero_order_runs_are_reproducible(random_world, tmp_path):
    logs = []
    for i in range(2):
        tree = recipe_tree(random_world, tmp_path / f"r{i}", search=ZERO_ORDER["cmaes"])
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
        logs.append([{k: v for k, v in r.items() if k != "seconds"} for r in _rows(tmp_path / f"r{i}")])
    assert logs[0] == logs[1]


def test_grid_search_agrees_with_an_exhaustive_loop(random_world, tmp_path):
    """The grid pick is the argmin of the fit-part dev loss over the lattice, computed independently."""
    tree = recipe_tree(random_world, tmp_path / "run", search=ZERO_ORDER["grid"])
    recipe = recipe_from_dict(tree)
    mixture = fit(recipe, progress=False, log=lambda _m: None)
    problem = load_problem(recipe, progress=False)
    losses = {}
    for counts in [(a, b, 3 - a - b) for a in range(4) for b in range(4 - a)]:
        w = torch.tensor(counts, dtype=torch.float32) / 3
        means = evaluate(
            problem.model, problem.stack, w, problem.sets, "fit", 16, problem.pad_id, problem.device
        )
        losses[counts] = float(means.mean())
    best = min(losses, key=losses.get)
    assert [mixture["weights"][n] for n in mixture["weights"]] == pytest.approx(
        [c / 3 for c in best], abs=1e-9
    )


def test_merge_method_reaches_the_run_and_mixture_json(random_world, tmp_path):
    merge = {"method": "dare_ties", "density": 0.7, "scale": 1.5, "mixup_alpha": 2.0}
    tree = recipe_tree(random_world, tmp_path / "run", merge=merge)
    mixture = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    method = mixture["method"]
    assert method["name"] == "dare_ties" and method["density"] == 0.7 and method["scale"] == 1.5
    assert method["seed"] == 0 and len(method["mixup_lambda"]) == 3
    assert math.isfinite(mixture["dev_loss"])


def test_loss_terms_give_the_gradient_strategy_their_set_weights(random_world, tmp_path):
    terms = [{"kind": "loss", "dev": "arith", "weight": 3.0}, {"kind": "loss", "dev": "all", "weight": 1.0}]
    tree = recipe_tree(random_world, tmp_path / "run", objective={"terms": terms})
    tree["data"]["dev"][1]["weight"] = 3.0  # markov: data weight 3 -> 'all' is (1·arith + 3·markov)/4
    recipe = recipe_from_dict(tree)
    objective = Objective.from_recipe(recipe)
    a = objective.loss_set_weights()
    torch.testing.assert_close(a, torch.tensor([3.0 + 0.25, 0.75]))
    # the gradient objective Σ a_s L_s / Σ a equals the utility the zero-order strategies use
    problem = load_problem(recipe, progress=False)
    scores = make_scorer(problem, objective, "fit")(np.array([0.2, 0.3, 0.5]))
    utility = metrics.Utility(recipe.objective.terms)
    macro = (3.0 * scores["loss:arith"] + scores["loss:all"]) / 4.0
    assert utility(scores) == pytest.approx(macro, rel=1e-12)  # the value to minimize: the loss itself
    w = torch.tensor([0.2, 0.3, 0.5])
    means = evaluate(problem.model, problem.stack, w, problem.sets, "fit", 16, problem.pad_id, problem.device)
    assert float(target_loss(means, torch.ones_like(means), a)) == pytest.approx(macro, rel=1e-6)


def test_exact_match_objective_scores_equal_a_direct_evaluation(tiny_world, tmp_path):
    root = tiny_world
    tree = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "model": {
            "base": str(root / "base"),
            "experts": {n: str(root / "experts" / n) for n in ("arith", "markov")},
        },
        "data": {
            "dev": [{"name": "arith", "path": str(root / "dev" / "arith.jsonl")}],
            "max_length": 64,
            "max_examples": 40,
        },
        "objective": {"terms": [{"kind": "exact_match", "dev": "arith", "max_new_tokens": 5}]},
        "search": {"strategy": "grid", "grid": {"divisions": 4}},
    }
    recipe = recipe_from_dict(tree)
    mixture = fit(recipe, progress=False, log=lambda _m: None)
    scores = mixture["objective"]["scores"]
    # the arith expert is the one that can add: the grid must not pick the markov expert
    assert scores["fitted"]["fit"]["exact_match:arith"] >= scores["arith only"]["fit"]["exact_match:arith"]
    assert (
        scores["arith only"]["fit"]["exact_match:arith"] > scores["markov only"]["fit"]["exact_match:arith"]
    )
    problem = load_problem(recipe, progress=False)
    w = torch.tensor([mixture["weights"]["arith"], mixture["weights"]["markov"]])
    records = [ex.record for ex in problem.sets[0].fit]
    with problem.stack.at(w) as merged:  # the model at w for plain calls (generation)
        direct = metrics.exact_match(merged, problem.tokenizer, records, 5, 7, problem.device)
    assert direct == scores["fitted"]["fit"]["exact_match:arith"]


def _cli(random_world, tmp_path, *overrides, recipe_extra=None):
    import yaml

    tree = recipe_tree(random_world, tmp_path / "out", **(recipe_extra or {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_in_process("fit", str(path), *overrides, "--quiet")


BAD_INPUT = {
    "unknown strategy": (["search.strategy=annealing"], "search.strategy"),
    "unknown method": (["merge.method=slerp"], "merge.method"),
    "gradient with a metric": (
        ["objective.terms=[{kind: exact_match, dev: arith}]"],
        "search.strategy 'gradient' needs a differentiable objective",
    ),
    "a budget for the gradient strategy": (
        ["search.budget=50"],
        "the gradient strategy's budget is optim.steps",
    ),
    "surrogate budget below its seeds": (
        ["search.strategy=surrogate", "search.budget=10", "search.surrogate.seeds=20"],
        "search.budget 10 is smaller than the surrogate's seeds + verify",
    ),
    "metric path that does not resolve": (
        [
            "search.strategy=grid",
            "search.grid.divisions=2",
            "objective.terms=[{kind: custom, dev: arith, function: 'no_such_pkg.metrics:score'}]",
        ],
        "no_such_pkg.metrics:score",
    ),
    "choice accuracy on a set without choices": (
        [
            "search.strategy=grid",
            "search.grid.divisions=2",
            "objective.terms=[{kind: choice_accuracy, dev: arith}]",
        ],
        "'choice_accuracy:arith': choice_accuracy needs prompt/choices/answer records",
    ),
    "exact match on text records": (
        [
            "search.strategy=grid",
            "search.grid.divisions=2",
            "objective.terms=[{kind: exact_match, dev: markov}]",
        ],
        "'exact_match:markov': exact_match needs prompt/completion",
    ),
    "grid larger than the budget": (
        ["search.strategy=grid", "search.budget=5"],
        "search.grid.divisions=10",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_search_input_is_one_line_exit_2_and_writes_nothing(case, random_world, tmp_path):
    overrides, culprit = BAD_INPUT[case]
    result = _cli(random_world, tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _fit_with_metric(random_world, tmp_path, monkeypatch, body: str, samples: int):
    """A Dirichlet fit of the custom metric ``score`` defined by ``body`` (a module's source), term 'mine'."""
    (tmp_path / "user_metric_pkg.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_metric_pkg", raising=False)
    overrides = [
        "search.strategy=dirichlet",
        f"search.dirichlet.samples={samples}",
        "objective.terms=[{kind: custom, dev: arith, function: 'user_metric_pkg:score', name: mine}]",
    ]
    return _cli(random_world, tmp_path, *overrides)


def test_a_grid_larger_than_the_budget_is_refused_before_any_model_is_loaded(
    random_world, tmp_path, monkeypatch
):
    from mergeopt import fit as fit_module

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fit_module, "load_problem", no_loading)
    result = _cli(
        random_world, tmp_path, "search.strategy=grid", "search.budget=5", "search.grid.divisions=3"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "mergeopt: error: search.grid.divisions=3 over 3 experts is 10 mixtures (10 not yet evaluated) but the "
        "budget leaves 5 evaluations; raise search.budget or lower search.grid.divisions (a truncated grid is biased)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_metric_returning_nan_is_named(random_world, tmp_path, monkeypatch):
    body = """
        def score(model, tokenizer, records):
            return float("nan")
    """
    result = _fit_with_metric(random_world, tmp_path, monkeypatch, body, samples=3)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'mine'" in lines[0] and "nan" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def _stopped_at_the_third(result, tmp_path, score: str) -> tuple[dict, list[dict]]:
    """Checks a fit whose search met a NaN ``score`` at its third evaluation: exit 0, one warning,
    mixture.json's record of the stop, and its weights those of the best evaluation before it.
    Returns (mixture.json, evaluations.csv's rows)."""
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeopt: warning: the search stopped at evaluation 3"), (
        lines
    )
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    stop = mixture["search"]["non_finite"]
    assert (stop["evaluation"], stop["score"], stop["value"]) == (3, score, "nan")
    rows = _rows(tmp_path / "out")
    best = min(rows, key=lambda r: float(r["value"]))
    assert [mixture["weights"][n] for n in mixture["weights"]] == [
        float(best[f"w_{n}"]) for n in mixture["weights"]
    ]
    return mixture, rows


def test_a_metric_turning_nan_mid_search_keeps_the_best_finite_mixture(random_world, tmp_path, monkeypatch):
    """A user's metric is treated as a loss would be: its NaN at the third mixture stops the search,
    which keeps the best mixture scored before it (exit 0, one warning naming the evaluation)."""
    body = """
        CALLS = []
        def score(model, tokenizer, records):
            CALLS.append(1)
            return float("nan") if len(CALLS) == 3 else float(len(CALLS))
    """
    result = _fit_with_metric(random_world, tmp_path, monkeypatch, body, samples=5)
    mixture, rows = _stopped_at_the_third(result, tmp_path, "mine")
    assert [float(r["mine"]) for r in rows] == [1.0, 2.0]
    best = max(rows, key=lambda r: float(r["mine"]))  # higher is better: the second mixture
    assert [mixture["weights"][n] for n in mixture["weights"]] == [
        float(best[f"w_{n}"]) for n in mixture["weights"]
    ]


def test_a_metric_nan_from_the_third_call_on_is_not_finite_in_the_summary(
    random_world, tmp_path, monkeypatch
):
    """A metric that stays NaN after it first turns NaN: the search stops as above, and the closing
    evaluations' scores of it are NaN too (null in mixture.json); the summary's score table says
    "not finite" for them, as its loss rows do, and the run ends with exit 0 and its warnings."""
    body = """
        CALLS = []
        def score(model, tokenizer, records):
            CALLS.append(1)
            return float("nan") if len(CALLS) >= 3 else float(len(CALLS))
    """
    result = _fit_with_metric(random_world, tmp_path, monkeypatch, body, samples=5)
    assert result.returncode == 0, result.stderr
    warned = result.stderr.strip().splitlines()
    assert warned[0].startswith("mergeopt: warning: the search stopped at evaluation 3"), warned
    assert any("closing evaluation" in line and "not finite" in line for line in warned[1:]), warned
    scores = json.loads((tmp_path / "out" / "mixture.json").read_text())["objective"]["scores"]
    assert scores["fitted"]["fit"]["mine"] == 2.0 and scores["uniform"]["fit"]["mine"] is None
    (row,) = [line for line in result.stdout.splitlines() if line.split()[:2] == ["uniform", "not"]]
    assert row.split(maxsplit=1)[1] == "not finite / not finite", result.stdout
    report = (tmp_path / "out" / "report.md").read_text()  # the warnings and the table, kept with the run
    assert "**Note:** The search stopped at evaluation 3: score 'mine' is nan" in report
    # the metric returned the NaN itself: the line points at it, not at the experts' numbers
    assert (
        "user_metric_pkg:score returned it at the mixture mixture.json records under search.non_finite"
        in warned[0]
    )
    assert "| uniform | not finite / not finite |" in report.split("### Objective terms", 1)[1]


def test_a_score_turning_nan_mid_search_keeps_the_best_finite_mixture(random_world, tmp_path, monkeypatch):
    """A NaN score (the merged model's loss at the third mixture) stops the search; the fit finishes on
    the best mixture scored before it, mixture.json says where it stopped, and one warning line says so
    (exit 0: the outputs are complete)."""
    from mergeopt.search import zero_order

    calls = []  # every scorer's calls: only the third evaluation of the run is NaN

    def nan_at_the_third(problem, objective, part):
        score = nan_at_the_third.__wrapped__(problem, objective, part)

        def scores(w):
            calls.append(1)
            out = dict(score(w))
            return {k: math.nan for k in out} if len(calls) == 3 else out

        return scores

    nan_at_the_third.__wrapped__ = zero_order.make_scorer
    monkeypatch.setattr(zero_order, "make_scorer", nan_at_the_third)
    result = _cli(random_world, tmp_path, "search.strategy=grid", "search.grid.divisions=2")
    mixture, rows = _stopped_at_the_third(result, tmp_path, "loss:all")
    assert len(rows) == 2 and mixture["search"]["evaluations"] == 2


def test_a_diverging_gradient_fit_keeps_the_best_finite_mixture(random_world, tmp_path):
    result = _cli(random_world, tmp_path, "optim.lr=1e308")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "mergeopt: warning: the fit stopped at step 1: the mixture logits is nan; mixture.json holds the best "
        "finite mixture (step 0). Lower optim.lr, or check the experts and model.compute_dtype"
    ]
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert mixture["search"]["non_finite"] == {"step": 1, "quantity": "mixture logits", "value": "nan"}
    assert mixture["weights"] == pytest.approx(dict.fromkeys(mixture["weights"], 1 / 3))
    assert not (tmp_path / "out" / "checkpoint").exists()


def _poisoned(value):
    """``value`` (a number or a nested dict of them) with every float made NaN."""
    if isinstance(value, dict):
        return {k: _poisoned(v) for k, v in value.items()}
    return math.nan if isinstance(value, float) else value


def test_a_nan_in_a_closing_score_is_recorded_as_null_with_a_warning(random_world, tmp_path, monkeypatch):
    """The search itself never meets the NaN (the uniform mixture is not on a 2-division grid of
    three experts, and a gradient fit only scores it in closing), but the closing evaluations score
    the uniform mixture: its NaN losses and scores become null in mixture.json (JSON has no NaN),
    one warning line names them, and the run completes with its outputs."""
    from mergeopt.reporting import mixture_record
    from mergeopt.search import zero_order

    real_scorer, real_losses = zero_order.make_scorer, mixture_record._losses

    def uniform(w) -> bool:
        return bool(np.allclose(np.asarray(w, dtype=np.float64), 1 / len(w)))

    def scorer(problem, objective, part):
        score = real_scorer(problem, objective, part)
        return lambda w: _poisoned(dict(score(w))) if uniform(w) else score(w)

    def losses(problem, weights, batch_size):
        out = real_losses(problem, weights, batch_size)
        return _poisoned(out) if uniform(weights.double().numpy()) else out

    monkeypatch.setattr(zero_order, "make_scorer", scorer)
    monkeypatch.setattr(mixture_record, "_losses", losses)
    for strategy in (["search.strategy=grid", "search.grid.divisions=2"], ["optim.steps=2"]):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        result = _cli(random_world, tmp_path, *strategy)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(
            "mergeopt: warning: the closing evaluation of the uniform mixture is not finite"
        )
        mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
        assert mixture["uniform_dev_loss"] is None and mixture["uniform_heldout_loss"] is None
        assert mixture["dev_loss"] is not None and None not in mixture["expert_dev_loss"].values()
        assert set(mixture["per_set_dev_loss"]["uniform"].values()) == {None}
        if "scores" in mixture["objective"]:
            assert mixture["objective"]["scores"]["uniform"]["fit"] == {"loss:all": None}
            assert mixture["objective"]["scores"]["fitted"]["fit"]["loss:all"] is not None
        table = [line for line in result.stdout.splitlines() if "uniform mixture" in line]
        assert len(table) == 1 and "not finite" in table[0], result.stdout
        report = (tmp_path / "out" / "report.md").read_text()
        assert "**Note:** The closing evaluation of the uniform mixture is not finite (NaN or Inf)" in report
        assert "nan" not in report.replace("(NaN or Inf)", "").lower()  # no value shows as NaN


NORMALIZED_TERMS = [{"kind": "loss", "dev": "arith"}, {"kind": "loss", "dev": "markov", "weight": 2.0}]


@pytest.mark.parametrize("search", [ZERO_ORDER["grid"], ZERO_ORDER["cmaes"]], ids=["grid", "cmaes"])
def test_terms_normalized_over_the_experts_pick_the_best_normalized_mixture(search, random_world, tmp_path):
    """objective.normalize: experts (MergeMix's normalisation) end to end: the K experts are scored
    first and count against the budget; every row's value is minus the weighted mean of its terms,
    each min-max normalised over the experts' scores (1: the best expert, 0: the worst), recomputed
    here from the logged scores; the pick is the row of the least value."""
    objective = {"terms": NORMALIZED_TERMS, "normalize": "experts"}
    tree = recipe_tree(random_world, tmp_path / "run", search=search, objective=objective)
    mixture = fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    rows = _rows(tmp_path / "run")
    names = list(mixture["weights"])
    experts = rows[: len(names)]
    assert [r["phase"] for r in experts] == ["expert"] * len(names)
    for i, row in enumerate(experts):
        assert [float(row[f"w_{n}"]) for n in names] == [float(i == j) for j in range(len(names))]
    if "budget" in search:
        assert len(rows) <= search["budget"]
    labels, weights = ["loss:arith", "loss:markov"], [1.0, 2.0]
    best = {label: min(float(r[label]) for r in experts) for label in labels}
    worst = {label: max(float(r[label]) for r in experts) for label in labels}
    for row in rows:
        normalized = [(worst[x] - float(row[x])) / (worst[x] - best[x]) for x in labels]
        expected = -sum(w * n for w, n in zip(weights, normalized)) / sum(weights)
        assert float(row["value"]) == pytest.approx(expected, abs=1e-12)
    chosen = min(rows, key=lambda r: float(r["value"]))
    assert mixture["search"]["value"] == pytest.approx(float(chosen["value"]), abs=1e-12)
    assert [mixture["weights"][n] for n in names] == pytest.approx([float(chosen[f"w_{n}"]) for n in names])


def test_a_budget_too_small_to_score_the_experts_is_refused(random_world, tmp_path):
    objective = {"terms": NORMALIZED_TERMS, "normalize": "experts"}
    search = {"strategy": "cmaes", "budget": 2}
    tree = recipe_tree(random_world, tmp_path / "run", search=search, objective=objective)
    with pytest.raises(UserError, match=r"search.budget 2 cannot even score the 3 experts"):
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
    assert not (tmp_path / "run").exists()


def _tiny_cli(tiny_world, tmp_path, *overrides):
    """``mergeopt fit recipes/tiny.yaml`` on the cached tiny world, into tmp_path/out."""
    import yaml

    tree = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    tree["output_dir"] = str(tmp_path / "out")
    tree["world"] = {"cache_dir": str(tiny_world.parent)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_in_process("fit", str(path), *overrides, "--quiet")


def test_a_search_that_ends_worse_than_an_expert_alone_says_so(tiny_world, tmp_path):
    """The arith loss alone as the objective: three Dirichlet draws never come near the arith
    vertex, which the report scores (arith alone); one warning names the expert and both values,
    mixture.json records them, report.md keeps the warning; with arith alone as weights.init
    (evaluated first) the search returns it and nothing is said. Outside the constraints
    (arith at most 0.5) the vertex is not what the search could have found: nothing is said."""
    search = [
        "search.strategy=dirichlet",
        "search.dirichlet.samples=3",
        "objective.terms=[{kind: loss, dev: arith}]",
    ]
    result = _tiny_cli(tiny_world, tmp_path, *search)
    assert result.returncode == 0, result.stderr
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    alone = mixture["objective"]["scores"]["arith only"]["fit"]["loss:arith"]
    best = min(float(r["value"]) for r in _rows(tmp_path / "out"))
    assert alone < best, "the premise: the arith expert alone beats every mixture the search scored"
    assert mixture["search"]["worse_than_expert"] == {"expert": "arith", "value": best, "expert_value": alone}
    line = (
        f"the dirichlet search's best mixture scores {best:.6g} on the fit part, worse than expert arith alone, "
        f"which scores {alone:.6g} and which the search did not evaluate (3 evaluations): search more "
        "(search.dirichlet.samples), or set weights.init to arith alone, which it then evaluates first"
    )
    assert result.stderr.strip().splitlines() == [f"mergeopt: warning: {line}"]
    assert f"**Note:** {line[0].upper()}{line[1:]}." in (tmp_path / "out" / "report.md").read_text()
    for extra in (
        "weights.init={arith: 1, reverse: 0, brackets: 0, markov: 0}",
        "weights.bounds={arith: [0, 0.5]}",
    ):
        shutil.rmtree(tmp_path / "out")
        result = _tiny_cli(tiny_world, tmp_path, *search, extra)
        assert result.returncode == 0 and result.stderr == "", (extra, result.stderr)
        assert (
            "worse_than_expert" not in json.loads((tmp_path / "out" / "mixture.json").read_text())["search"]
        )


@pytest.mark.parametrize("strategy", ["grid", "cmaes"])
def test_a_search_that_ends_worse_than_the_uniform_mixture_says_so(strategy, request, tmp_path):
    """A search that never scored the centre can end worse than the uniform mixture the report scores
    beside it (the tiny world's 2-division grid of four experts misses the centre; CMA-ES with a
    budget of 2 draws twice): one warning line and mixture.json say so, with both values. Started
    from the uniform mixture (``weights.init``), which grid evaluates first, the grid returns it and
    nothing is said. The tiny world is trained on the CPU that runs the test, so its numbers depend
    on the CPU: where its lattice holds a mixture better than the centre, the test checks that
    nothing is said and that a grid started from the centre still returns the lattice's best."""
    if strategy == "grid":
        world, search = (
            request.getfixturevalue("tiny_world"),
            ["search.strategy=grid", "search.grid.divisions=2"],
        )
        run = _tiny_cli
    else:
        world, run = request.getfixturevalue("random_world"), _cli
        search = ["search.strategy=cmaes", "search.budget=2", "search.cmaes.sigma=3.0"]
    result = run(world, tmp_path, *search)
    assert result.returncode == 0, result.stderr
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    uniform = mixture["objective"]["scores"]["uniform"]["fit"]["loss:all"]
    rows = _rows(tmp_path / "out")
    best = min(float(r["value"]) for r in rows)
    if strategy == "grid" and best <= uniform:
        # the tiny world is trained on this CPU and differs by CPU: on an AMD EPYC with AVX-512 its
        # lattice holds a mixture better than the centre (0.985276 against 1.001895): nothing is said
        assert "worse_than_uniform" not in mixture["search"]
        assert "uniform mixture" not in result.stderr, result.stderr
        _grid_started_from_the_uniform_mixture(world, run, tmp_path, search, mixture, best < uniform)
        return
    assert best > uniform, "the premise: every mixture the search scored is worse than the uniform one"
    assert mixture["search"]["worse_than_uniform"] == {"value": best, "uniform_value": uniform}
    assert mixture["objective"]["terms"] == [
        {"kind": "loss", "dev": "all", "weight": 1.0, "label": "loss:all"}
    ]
    more = "a finer lattice: search.grid.divisions" if strategy == "grid" else "search.budget"
    start = ", or set weights.init to the uniform mixture, which it then evaluates first" * (
        strategy == "grid"
    )
    # CMA-ES's two draws also miss an expert alone that beats them: said on a line of its own
    also = (
        [f"mergeopt: warning: {worse_than_expert_line(mixture)}"]
        if "worse_than_expert" in mixture["search"]
        else []
    )
    assert result.stderr.strip().splitlines() == [
        f"mergeopt: warning: the {strategy} search's best mixture scores {best:.6g} on the fit part, worse than "
        f"the uniform mixture's {uniform:.6g}, which the search did not evaluate ({len(rows)} evaluations): "
        f"search more ({more}){start}",
        *also,
    ]
    if strategy == "grid":
        _grid_started_from_the_uniform_mixture(world, run, tmp_path, search, mixture, False)


def _grid_started_from_the_uniform_mixture(world, run, tmp_path, search, mixture, lattice_wins: bool) -> None:
    """Started from the uniform mixture, the grid evaluates it first and returns the better of it
    and the lattice's best, with nothing to say."""
    shutil.rmtree(tmp_path / "out")
    names = mixture["weights"]
    init = "{" + ", ".join(f"{n}: {1 / len(names)!r}" for n in names) + "}"
    result = run(world, tmp_path, *search, f"weights.init={init}")
    assert result.returncode == 0, result.stderr
    assert "uniform mixture" not in result.stderr if lattice_wins else result.stderr == "", result.stderr
    again = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert "worse_than_uniform" not in again["search"]
    expected = mixture["weights"] if lattice_wins else dict.fromkeys(names, 1 / len(names))
    assert again["weights"] == pytest.approx(expected, abs=1e-12)
