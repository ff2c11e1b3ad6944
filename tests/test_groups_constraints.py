"""Hierarchical mixtures (weights.groups) under bounds, pins and caps.

What is compared with what:
- the constrained hierarchical Dirichlet draws against their definition (the hierarchical draw over
  the free experts, shifted onto the lower-bounded simplex, rng.dirichlet at each level), against the
  flat constrained draws with singleton groups (number for number), and against the box (every draw
  feasible, pins held, the same seed the same draws);
- dirichlet and surrogate on a quadratic black box with groups and the box: every mixture they
  evaluate feasible, the pin held;
- a dirichlet fit with groups, bounds and a pin on the random world: mixture.json within the box,
  both levels reported, and a second run byte-identical;
- a gradient fit with groups, bounds and a pin: the flat constrained fit started at the hierarchy's
  start (every group equal), number for number, both levels reported.
"""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from mergeopt.config import SearchSection, recipe_from_dict
from mergeopt.fit import fit
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.groups import Groups
from mergeopt.search import STRATEGIES, Evaluator
from mergeopt.search.dirichlet import draw_feasible
from tests.conftest import recipe_tree

NAMES = ("a1", "b1", "a2", "b2", "c")
SPEC = {"A": ["a1", "a2"], "B": ["b1", "b2"]}  # c alone
BOX = FeasibleSet.build(NAMES, {"b1": (0.0, 0.15), "a1": (0.05, 1.0)}, {"c": 0.1}, caps={"a2": 0.5})
TARGET = np.array([0.05, 0.5, 0.2, 0.2, 0.05])  # b1 wants more than its bound 0.15


# ----------------------------------------------------------------------------- the draws


def test_constrained_hierarchical_draws_are_the_hierarchy_over_the_free_mass():
    loose = FeasibleSet.build(NAMES, {"a1": (0.1, 1.0)}, {"c": 0.2})  # no upper bound binds
    draws = draw_feasible(np.random.default_rng(4), 5, 0.6, 30, loose, Groups.build(NAMES, SPEC))
    rng = np.random.default_rng(4)  # free: a1, b1, a2, b2 in groups A (a1, a2), B (b1, b2)
    shares = rng.dirichlet([0.6, 0.6], size=30)
    a, b = rng.dirichlet([0.6, 0.6], size=30), rng.dirichlet([0.6, 0.6], size=30)
    free = 1.0 - 0.1 - 0.2
    np.testing.assert_allclose(draws[:, [0, 2]], [0.1, 0.0] + free * shares[:, [0]] * a, atol=1e-15)
    np.testing.assert_allclose(draws[:, [1, 3]], free * shares[:, [1]] * b, atol=1e-15)
    assert (draws[:, 4] == 0.2).all()


@pytest.mark.parametrize("count", [1, 40])
def test_constrained_hierarchical_draws_are_feasible_deterministic_and_hold_pins(count):
    groups = Groups.build(NAMES, SPEC)
    draws = draw_feasible(np.random.default_rng(7), 5, 1.0, count, BOX, groups)
    assert draws.shape == (count, 5) and all(BOX.contains(w) for w in draws)
    assert (draws[:, 4] == 0.1).all()  # c's pin
    np.testing.assert_array_equal(draws, draw_feasible(np.random.default_rng(7), 5, 1.0, count, BOX, groups))
    tight = FeasibleSet.build(NAMES, {"a1": (0.0, 0.02), "a2": (0.0, 0.02)}, {"c": 0.5})
    few = draw_feasible(np.random.default_rng(0), 5, 1.0, 50, tight, groups)  # some projected
    assert len(few) == 50 and all(tight.contains(w) for w in few)


def test_singleton_groups_draw_the_flat_constrained_draws_number_for_number():
    singletons = Groups.build(NAMES, {})
    for alpha, box in (
        (0.5, BOX),
        (2.0, FeasibleSet.build(NAMES, {"b1": (0.0, 0.3)}, {"a1": 0.3, "c": 0.4})),
    ):
        np.testing.assert_array_equal(
            draw_feasible(np.random.default_rng(1), 5, alpha, 25, box, singletons),
            draw_feasible(np.random.default_rng(1), 5, alpha, 25, box),
        )


@pytest.mark.parametrize("strategy", ["dirichlet", "surrogate"])
def test_grouped_strategies_evaluate_only_feasible_mixtures(strategy):
    evaluator = Evaluator(
        list(NAMES),
        lambda w: {"sq": float(((w - TARGET) ** 2).sum())},
        lambda s: s["sq"],
        feasible=BOX,
        groups=Groups.build(NAMES, SPEC),
    )
    search = {"dirichlet": {"samples": 30}, "surrogate": {"seeds": 20, "candidates": 500}}[strategy]
    result = STRATEGIES[strategy](
        evaluator, SearchSection(strategy=strategy, budget=30, **{strategy: search}), 0, False, None
    )
    assert len(result.log) >= 20 and all(BOX.contains([row[f"w_{n}"] for n in NAMES]) for row in result.log)
    assert result.weights[4] == pytest.approx(0.1, abs=1e-12)


# ----------------------------------------------------------------------------- through fit


def test_a_constrained_grouped_dirichlet_fit_is_feasible_reported_and_deterministic(random_world, tmp_path):
    weights = {"groups": {"ab": ["alpha", "gamma"]}, "bounds": {"gamma": [0.0, 0.3]}, "pinned": {"beta": 0.2}}
    search = {"strategy": "dirichlet", "dirichlet": {"samples": 12}}
    runs = []
    for name in ("one", "two"):
        tree = recipe_tree(random_world, tmp_path / name, search=search, weights=weights)
        runs.append(fit(recipe_from_dict(tree), progress=False, log=lambda _m: None))
    mixture = runs[0]
    box = FeasibleSet.build(["alpha", "beta", "gamma"], {"gamma": (0.0, 0.3)}, {"beta": 0.2})
    assert box.violation(mixture["weights"]) is None and mixture["weights"]["beta"] == pytest.approx(0.2)
    w, record = mixture["weights"], mixture["groups"]
    assert record["ab"]["share"] == pytest.approx(w["alpha"] + w["gamma"], rel=1e-14)
    assert record["beta"]["share"] == pytest.approx(0.2, abs=1e-12)
    for row in csv.DictReader((tmp_path / "one" / "evaluations.csv").open()):
        assert box.contains([float(row[f"w_{n}"]) for n in ("alpha", "beta", "gamma")]), row
    assert (tmp_path / "one" / "mixture.json").read_text().replace("/one", "/two") == (
        tmp_path / "two" / "mixture.json"
    ).read_text()


def test_a_constrained_grouped_gradient_fit_is_the_flat_fit_from_the_hierarchys_start(random_world, tmp_path):
    """Under bounds (pins and caps alike) the gradient strategy steps on the experts' logits, starting where the
    hierarchy starts (every group the same share, every expert the same share within its group):
    the flat constrained fit given that start as weights.init, number for number."""
    constraints = {"bounds": {"gamma": [0.0, 0.3], "beta": [0.1, 0.6]}}
    optim = {"steps": 8, "batch_size": 4, "eval_every": 2, "eval_batch_size": 16}
    grouped = recipe_tree(
        random_world,
        tmp_path / "grouped",
        weights={**constraints, "groups": {"ab": ["alpha", "gamma"]}},
        optim=optim,
    )
    start = {"alpha": 0.25, "beta": 0.5, "gamma": 0.25}  # groups ab and beta equal, alpha = gamma
    flat = recipe_tree(random_world, tmp_path / "flat", weights={**constraints, "init": start}, optim=optim)
    box = FeasibleSet.build(["alpha", "beta", "gamma"], {"gamma": (0.0, 0.3), "beta": (0.1, 0.6)})
    one = fit(recipe_from_dict(grouped), progress=False, log=lambda _m: None)
    two = fit(recipe_from_dict(flat), progress=False, log=lambda _m: None)
    assert one["weights"] == pytest.approx(two["weights"], rel=1e-12, abs=1e-15)
    assert one["logits"] == pytest.approx(two["logits"], rel=1e-12, abs=1e-12)
    assert box.violation(one["weights"]) is None
    trace_one, trace_two = (pd.read_csv(tmp_path / run / "trace.csv") for run in ("grouped", "flat"))
    pd.testing.assert_frame_equal(trace_one, trace_two, rtol=1e-12)  # the start: log and exp round trip
    w, record = one["weights"], one["groups"]
    assert record["ab"]["share"] == pytest.approx(w["alpha"] + w["gamma"], rel=1e-14)
    assert record["ab"]["within"]["gamma"] == pytest.approx(w["gamma"] / (w["alpha"] + w["gamma"]), rel=1e-14)
    assert "logit" not in record["ab"]  # the fit stepped on the experts' logits, which mixture.json holds
    assert trace_one["w_alpha"].nunique() > 2  # the fit moved: not a comparison of two starts
