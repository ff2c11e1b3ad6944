"""The feasible set {lo ≤ w ≤ hi, Σw = 1} (mergeopt.merging.constraints) against reference solvers.

What is compared with what:
- the Euclidean projection against scipy's SLSQP on the same quadratic program, on random boxes;
- the feasible softmax against scipy's SLSQP minimising KL(w || softmax(z)) over the box, and
  against softmax itself on the whole simplex;
- Adam on the logits followed by the KL projection (the gradient strategy's step) against scipy's
  constrained optimum of a quadratic, with bounds, a pin and a cap binding; on a problem where
  every free logit's gradient has one sign, plain Adam stays at its start and Adam with the held
  experts released (FeasibleSet.held_gradient) reaches the optimum, a fixed point of that gradient;
- the constrained lattice and Dirichlet samples against their definitions (every point feasible,
  the plain lattice and plain Dirichlet draws when nothing binds);
- the messages: each infeasible box names its culprit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import softmax

from mergeopt.merging.constraints import FeasibleSet, repetition_caps
from mergeopt.search.grid import lattice
from mergeopt.search.mixtures import simplex_lattice


def random_sets(count: int, seed: int = 0):
    """Random feasible boxes over K = 2..6 experts, some lower bounds 0, some upper bounds 1."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        k = int(rng.integers(2, 7))
        lo = rng.uniform(0, 0.6 / k, k) * (rng.random(k) < 0.6)
        hi = np.where(rng.random(k) < 0.3, 1.0, np.minimum(1.0, lo + rng.uniform(0.05, 0.8, k)))
        if hi.sum() < 1.0:
            continue
        names = [f"e{i}" for i in range(k)]
        made += 1
        yield FeasibleSet.build(names, {n: (a, b) for n, a, b in zip(names, lo, hi)}), rng


def scipy_min(fun, feasible: FeasibleSet, jac=None) -> np.ndarray:
    result = minimize(
        fun,
        feasible.centre(),
        jac=jac,
        method="SLSQP",
        bounds=list(zip(feasible.lower, feasible.upper)),
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x


def test_euclidean_projection_equals_scipys_quadratic_program():
    for feasible, rng in random_sets(60):
        v = rng.normal(1.0 / len(feasible.names), 0.5, len(feasible.names))
        expected = scipy_min(lambda x, v=v: ((x - v) ** 2).sum(), feasible, jac=lambda x, v=v: 2 * (x - v))
        w = feasible.project(v)
        assert feasible.contains(w) and w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(w, expected, atol=1e-6)


def test_projection_works_row_by_row_and_keeps_feasible_points():
    feasible, rng = next(random_sets(1, seed=3))
    rows = rng.normal(0.2, 0.4, (5, len(feasible.names)))
    np.testing.assert_allclose(feasible.project(rows), [feasible.project(r) for r in rows], atol=1e-15)
    inside = feasible.project(rows[0])
    np.testing.assert_allclose(feasible.project(inside), inside, atol=1e-15)


def test_feasible_softmax_is_the_kl_projection_of_softmax():
    for feasible, rng in random_sets(40, seed=1):
        z = rng.normal(0, 1.5, len(feasible.names))
        s = softmax(z)
        expected = scipy_min(lambda x, s=s: float(np.sum(x * np.log(np.maximum(x, 1e-300) / s))), feasible)
        w = feasible.softmax(z)
        assert feasible.contains(w)
        np.testing.assert_allclose(w, expected, atol=2e-6)


def test_feasible_softmax_on_the_whole_simplex_is_softmax():
    feasible = FeasibleSet.build(["a", "b", "c", "d"])
    assert feasible.trivial
    z = np.random.default_rng(0).normal(0, 3, (10, 4))
    np.testing.assert_allclose(feasible.softmax(z), softmax(z, axis=1), rtol=1e-13)


def test_projected_logits_have_logsumexp_zero_and_give_the_feasible_softmax():
    feasible = FeasibleSet.build(["a", "b", "c"], {"a": (0.1, 0.3)}, {"c": 0.0})
    z = np.array([2.0, -1.0, 0.5])
    projected = feasible.project_logits(z)
    assert np.log(np.exp(projected).sum()) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(softmax(projected), feasible.softmax(z), rtol=1e-14, atol=2e-300)
    assert np.isfinite(projected).all()  # a pin at 0 is a weight of 1e-300, JSON-writable


def projected_adam(
    feasible: FeasibleSet, target, scale, steps: int, lr: float = 0.05, release: bool = True
) -> np.ndarray:
    """The gradient strategy's loop on the quadratic Σ scale·(w − target)²: Adam on the logits, the
    held experts' pushes released (FeasibleSet.held_gradient), then the KL projection."""
    z = torch.tensor(feasible.project_logits(np.zeros(len(target))), requires_grad=True)
    adam = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        adam.zero_grad()
        w = torch.softmax(z, dim=0)
        g = 2 * scale * (w.detach().numpy() - target)  # ∂L/∂w
        if release:
            g = feasible.held_gradient(w.detach().numpy(), g)
        (z.grad,) = torch.autograd.grad(w, z, torch.from_numpy(g))
        adam.step()
        with torch.no_grad():
            z.copy_(torch.from_numpy(feasible.project_logits(z.detach().numpy())))
    return torch.softmax(z, dim=0).detach().numpy()


def quadratic_optimum(feasible: FeasibleSet, target, scale) -> np.ndarray:
    return scipy_min(
        lambda x: float((scale * (x - target) ** 2).sum()), feasible, jac=lambda x: 2 * scale * (x - target)
    )


def test_projected_adam_on_the_logits_reaches_the_constrained_optimum():
    """The gradient strategy's step: the KL projection makes the constrained optimum a fixed point."""
    names = ["a", "b", "c", "d"]
    feasible = FeasibleSet.build(names, {"a": (0.0, 0.25), "b": (0.3, 1.0)}, {"d": 0.1}, caps={"c": 0.6})
    target = np.array([0.6, 0.05, 0.3, 0.05])  # a wants more than 0.25, b less than 0.3
    scale = np.array([1.0, 2.0, 0.5, 1.0])
    w = projected_adam(feasible, target, scale, 1500)
    assert feasible.contains(w)
    np.testing.assert_allclose(w, quadratic_optimum(feasible, target, scale), atol=2e-3)
    assert w[0] == pytest.approx(0.25, abs=1e-12) and w[3] == pytest.approx(0.1, abs=1e-12)


# b1 wants more than its bound, c is pinned, a1 has a floor, a2 a cap: from the projected uniform
# start every free expert's logit gradient has the same sign, so unreleased Adam moves the free
# logits by one common amount, which the KL projection undoes
STALL = FeasibleSet.build(
    ("a1", "b1", "a2", "b2", "c"), {"b1": (0.0, 0.15), "a1": (0.05, 1.0)}, {"c": 0.1}, caps={"a2": 0.5}
)
STALL_TARGET, STALL_SCALE = np.array([0.05, 0.5, 0.2, 0.2, 0.05]), np.array([1.0, 2.0, 0.5, 1.0, 1.0])


def test_released_held_experts_let_adam_reach_the_optimum_where_it_stalled():
    optimum = quadratic_optimum(STALL, STALL_TARGET, STALL_SCALE)
    stalled = projected_adam(STALL, STALL_TARGET, STALL_SCALE, 3000, release=False)
    np.testing.assert_allclose(stalled, STALL.project(STALL.centre()), atol=1e-6)  # never left its start
    assert np.abs(stalled - optimum).max() > 0.1
    released = projected_adam(STALL, STALL_TARGET, STALL_SCALE, 3000)
    assert STALL.contains(released) and released[1] == pytest.approx(0.15, abs=1e-12)
    np.testing.assert_allclose(released, optimum, atol=1e-4)


def test_the_constrained_optimum_is_a_fixed_point_of_the_released_gradient():
    """At scipy's optimum the logits' gradient is 0 once held experts are released; without, b1
    (held at its bound) still pushes the free experts."""
    optimum = STALL.project(quadratic_optimum(STALL, STALL_TARGET, STALL_SCALE))
    z = torch.tensor(STALL.project_logits(np.log(optimum)), requires_grad=True)
    w = torch.softmax(z, dim=0)
    np.testing.assert_allclose(w.detach().numpy(), optimum, atol=1e-12)
    g = 2 * STALL_SCALE * (optimum - STALL_TARGET)
    (released,) = torch.autograd.grad(
        w, z, torch.from_numpy(STALL.held_gradient(optimum, g)), retain_graph=True
    )
    (plain,) = torch.autograd.grad(w, z, torch.from_numpy(g))
    assert released.abs().max() < 1e-6 and plain.abs().max() > 1e-2


def test_lattice_is_the_plain_lattice_on_the_whole_simplex():
    names = ("a", "b", "c")
    plain = lattice(names, 4)
    assert len(plain) == len(simplex_lattice(names, 4))
    np.testing.assert_array_equal(FeasibleSet.build(names).lattice(4), plain)


def test_constrained_lattice_is_feasible_and_keeps_every_feasible_lattice_point():
    names = ("a", "b", "c")
    feasible = FeasibleSet.build(names, {"a": (0.2, 0.5)}, {"c": 0.1})
    points = feasible.lattice(7)
    assert all(feasible.contains(p) for p in points)
    assert len(np.unique(np.round(points, 12), axis=0)) == len(points)
    # w = lo + 0.7 * c / 7 on the free experts a, b: a in {0.2, 0.3, ..., 0.9}, cut at 0.5
    inside = {(round(0.2 + 0.1 * i, 12), round(0.7 - 0.1 * i, 12)) for i in range(4)}
    assert inside <= {(round(p[0], 12), round(p[1], 12)) for p in points}
    assert len(points) == 4  # the points past a = 0.5 all project to a = 0.5, already there


def test_samples_are_feasible_and_plain_dirichlet_shifted_when_no_upper_bound_binds():
    names = ("a", "b", "c", "d")
    feasible = FeasibleSet.build(names, {"a": (0.1, 1.0), "b": (0.2, 1.0)}, {"d": 0.3})
    draws = feasible.sample(np.random.default_rng(5), 0.5, 20)
    expected = np.random.default_rng(5).dirichlet(np.full(3, 0.5), size=20) * 0.4
    np.testing.assert_allclose(draws[:, [0, 1, 2]], expected + [0.1, 0.2, 0.0], atol=1e-15)
    assert (draws[:, 3] == 0.3).all()
    tight = FeasibleSet.build(names, {"a": (0.0, 0.05), "b": (0.0, 0.05)}, caps={"c": 0.5})
    draws = tight.sample(np.random.default_rng(0), 1.0, 50)  # few draws survive: some are projected
    assert len(draws) == 50 and all(tight.contains(w) for w in draws)


def test_caps_bound_from_above_with_budget_and_tokens():
    caps = repetition_caps(5.0, 1_000, {"a": 40, "b": 500})
    assert caps == {"a": 0.2, "b": 2.5}
    feasible = FeasibleSet.build(["a", "b"], caps=caps)
    assert feasible.upper == (0.2, 1.0) and feasible.upper_from == ("cap", "")


@pytest.mark.parametrize(
    ("bounds", "pinned", "caps", "culprit"),
    [
        ({"a": (0.0, 0.2), "b": (0.0, 0.3)}, {}, {}, "the upper bounds sum to 0.5, below 1 (a 0.2 (bound)"),
        ({"a": (0.7, 1.0), "b": (0.4, 1.0)}, {}, {}, "the lower bounds and pins sum to 1.1, above 1"),
        ({}, {"a": 0.9}, {"b": 0.05}, "the upper bounds sum to 0.95, below 1 (a 0.9 (pinned), b 0.05 (cap)"),
        ({"a": (0.5, 1.0)}, {}, {"a": 0.3}, "'a' needs at least 0.5 but its repetition cap is 0.3"),
    ],
)
def test_an_empty_box_names_its_culprits(bounds, pinned, caps, culprit):
    assert culprit in FeasibleSet.build(["a", "b"], bounds, pinned, caps).problem()


def test_a_pin_outside_its_bounds_is_refused():
    with pytest.raises(ValueError, match="weights.pinned 'a' is 0.7, outside its weights.bounds"):
        FeasibleSet.build(["a", "b"], {"a": (0.0, 0.5)}, {"a": 0.7})


def test_violation_names_the_weight_and_its_limit():
    feasible = FeasibleSet.build(["a", "b"], {"a": (0.0, 0.3)}, caps={"b": 0.8})
    assert feasible.violation({"a": 0.2, "b": 0.8}) is None
    assert "'a' is 0.4, outside [0, 0.3]" in feasible.violation({"a": 0.4, "b": 0.6})
    assert "outside [0, 0.8] (the upper limit is its repetition cap)" in feasible.violation([0.1, 0.9])
