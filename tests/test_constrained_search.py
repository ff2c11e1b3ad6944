"""Every strategy under bounds, pins and repetition caps: feasible mixtures in, a feasible mixture out.

What is compared with what:
- each zero-order strategy on a quadratic black box whose optimum lies outside the box: every
  mixture it evaluates is feasible, and CMA-ES reaches scipy's constrained optimum;
- each strategy (gradient included) through ``mergeopt fit`` on the random world: mixture.json's
  weights meet the recorded constraints and every logged mixture does too;
- the gradient strategy's first step against Adam's step by hand followed by the KL projection, and
  its gradient at projected logits (a cap binding, a pin at 0) against central finite differences;
- a recipe whose constraints are the whole simplex against the same recipe without them: the same
  mixture.json (but the record) and the same log, bit for bit;
- repetition caps counted from train.data on the tiny world against token_stats' own count.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergeopt.config import OptimSection, SearchSection, recipe_from_dict
from mergeopt.export.token_stats import load_tokenizer, measure
from mergeopt.fit import fit
from mergeopt.loading.problem import load_problem
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.objectives.data import training_batches
from mergeopt.objectives.loss import dev_loss
from mergeopt.search import STRATEGIES, Evaluator, fit_gradient
from tests.conftest import REPO, recipe_tree
from tests.test_fit_search import ZERO_ORDER

NAMES = ["e0", "e1", "e2", "e3"]
BOX = FeasibleSet.build(NAMES, {"e0": (0.0, 0.3), "e1": (0.1, 0.6)}, {"e3": 0.1}, caps={"e2": 0.5})
TARGET = np.array([0.6, 0.05, 0.3, 0.05])  # wants e0 above 0.3 and e1 below 0.1
SEARCHES = {
    "grid": {"strategy": "grid", "grid": {"divisions": 6}},
    "dirichlet": {"strategy": "dirichlet", "dirichlet": {"samples": 30}},
    "cmaes": {"strategy": "cmaes", "budget": 150},
    "spsa": {"strategy": "spsa", "budget": 40},
    "surrogate": {"strategy": "surrogate", "budget": 30, "surrogate": {"seeds": 20, "candidates": 2000}},
}


def quadratic(w: np.ndarray) -> dict[str, float]:
    return {"sq": float(((w - TARGET) ** 2).sum())}


def constrained_optimum() -> np.ndarray:
    return minimize(
        lambda x: ((x - TARGET) ** 2).sum(),
        BOX.centre(),
        method="SLSQP",
        bounds=list(zip(BOX.lower, BOX.upper)),
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
        options={"ftol": 1e-15},
    ).x


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_zero_order_strategy_evaluates_only_feasible_mixtures(strategy):
    evaluator = Evaluator(NAMES, quadratic, lambda s: s["sq"], feasible=BOX)
    result = STRATEGIES[strategy](evaluator, SearchSection(**SEARCHES[strategy]), 0, False, None)
    assert all(BOX.contains([row[f"w_{n}"] for n in NAMES]) for row in result.log)
    assert BOX.contains(result.weights)
    assert result.weights[3] == pytest.approx(0.1, abs=1e-12)  # the pin
    if strategy == "cmaes":
        np.testing.assert_allclose(result.weights, constrained_optimum(), atol=1e-3)


def test_the_result_skips_infeasible_mixtures_evaluated_for_a_normalisation():
    evaluator = Evaluator(NAMES, quadratic, lambda s: s["sq"], feasible=BOX)
    evaluator.prefetch(np.eye(4), "expert")  # e0 alone scores better than anything feasible
    evaluator(BOX.centre(), "start")
    assert BOX.contains(evaluator.best()[0])


# ----------------------------------------------------------------------------- through fit

CONSTRAINED = {
    "bounds": {"alpha": [0.1, 0.5]},
    "pinned": {"gamma": 0.2},
    "max_epochs": 2.0,
    "token_budget": 10_000,
    "tokens": {"alpha": 5_000, "beta": 1_500, "gamma": 9_000},  # beta's cap: 2 · 1500 / 10000 = 0.3
}
FIT_SEARCHES = {"gradient": {"strategy": "gradient"}, **ZERO_ORDER}


def _fit(world, out, search, weights=None):
    tree = recipe_tree(world, out, search=search, **({"weights": weights} if weights else {}))
    return fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)


def _logged(out, strategy) -> list[dict]:
    name = "trace.csv" if strategy == "gradient" else "evaluations.csv"
    return list(csv.DictReader((out / name).open()))


@pytest.mark.parametrize("strategy", sorted(FIT_SEARCHES))
def test_every_strategy_fits_a_feasible_mixture_and_records_the_constraints(strategy, random_world, tmp_path):
    mixture = _fit(random_world, tmp_path, FIT_SEARCHES[strategy], CONSTRAINED)
    record = mixture["constraints"]
    assert record["upper"] == {"alpha": 0.5, "beta": pytest.approx(0.3), "gamma": 0.2}
    assert record["upper_from"] == {"alpha": "bound", "beta": "cap", "gamma": "pinned"}
    box = FeasibleSet.build(["alpha", "beta", "gamma"], {"alpha": (0.1, 0.5)}, {"gamma": 0.2}, {"beta": 0.3})
    assert box.violation(mixture["weights"]) is None
    assert mixture["weights"]["gamma"] == pytest.approx(0.2, abs=1e-12)
    names = list(mixture["weights"])
    for row in _logged(tmp_path, strategy):
        assert box.contains([float(row[f"w_{n}"]) for n in names]), row
    assert json.loads((tmp_path / "mixture.json").read_text())["constraints"] == json.loads(
        json.dumps(record)
    )


@pytest.mark.parametrize("strategy", ["gradient", "dirichlet", "cmaes"])
def test_constraints_that_bind_nothing_change_nothing(strategy, random_world, tmp_path):
    loose = {"bounds": {"alpha": [0.0, 1.0]}}
    plain = _fit(random_world, tmp_path / "plain", FIT_SEARCHES[strategy])
    same = _fit(random_world, tmp_path / "loose", FIT_SEARCHES[strategy], loose)
    assert "constraints" not in plain and same.pop("constraints")["upper_from"]["alpha"] == ""
    assert same == plain
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _logged(tmp_path / "plain", strategy)]
    assert strip == [
        {k: v for k, v in r.items() if k != "seconds"} for r in _logged(tmp_path / "loose", strategy)
    ]


# ----------------------------------------------------------------------------- the gradient step


@pytest.fixture(scope="module")
def loaded(random_world, tmp_path_factory):
    tree = recipe_tree(random_world, tmp_path_factory.mktemp("grad"), weights=CONSTRAINED)
    return load_problem(recipe_from_dict(tree), progress=False)


BOX3 = FeasibleSet.build(["alpha", "beta", "gamma"], {"alpha": (0.1, 0.8)}, {"gamma": 0.0}, {"beta": 0.3})
CAPPED = FeasibleSet.build(["alpha", "beta", "gamma"], {"beta": (0.0, 0.3)})  # two free experts beside it


@pytest.mark.parametrize(
    ("box", "start", "held"),
    [(BOX3, [0.0, 0.0, 0.0], False), (CAPPED, [0.0, 2.0, 0.0], True), (CAPPED, [0.0, -2.0, 0.0], False)],
)
def test_the_gradient_step_is_adam_then_the_kl_projection(loaded, box, start, held):
    """One step by hand: ∂L/∂w, the held experts' pushes released (FeasibleSet.held_gradient),
    through softmax to the logits, Adam, the KL projection; against the w the fit's trace records
    after its first step. From the second start beta sits at its cap and its gradient pushes it
    up: the release changes that step (checked), so the test compares the release itself."""
    p = loaded
    z0 = torch.from_numpy(box.project_logits(np.array(start)))
    optim = OptimSection(steps=1, batch_size=4, eval_every=1)
    run = fit_gradient(
        p.model, p.stack, p.sets, p.set_weights, optim, z0, 0, p.pad_id, p.device, False, feasible=box
    )
    batch = next(training_batches(p.sets, [0, 1], optim.batch_size, p.pad_id, 0))
    expected = {}
    for release in (False, True):
        z = z0.clone().requires_grad_(True)
        w = torch.softmax(z, dim=0)
        leaf = w.detach().requires_grad_(True)
        dev_loss(p.model, p.stack, leaf, batch, p.set_weights, to_weights=lambda v: v).backward()
        g = leaf.grad.numpy()
        if release:
            g = box.held_gradient(w.detach().numpy(), g)
        (z.grad,) = torch.autograd.grad(w, z, torch.from_numpy(g))
        adam = torch.optim.Adam([z], lr=optim.lr)
        adam.step()
        expected[release] = box.project_logits(z.detach().numpy())
    after = {key: torch.softmax(torch.from_numpy(z), 0).numpy() for key, z in expected.items()}
    assert run.trace[-1]["step"] == 1
    stepped = np.array([run.trace[-1][f"w_{n}"] for n in box.names])
    # to 1e-9, not bit for bit: the float32 gradient's last bits depend on the CPU's kernels (an
    # AVX-512 + AMX Xeon gave 8e-12), and the effect under test is > 1e-3 (below)
    np.testing.assert_allclose(stepped, after[True], rtol=1e-9, atol=1e-15)
    assert box.contains(stepped)
    assert (np.abs(after[True] - after[False]).max() > 1e-3) == held


def test_gradient_at_projected_logits_matches_finite_differences(loaded):
    """The model sees w = softmax(z) at projected z (logsumexp 0, a pin at 0 as 1e-300); the
    gradient the loop steps on is that function's, checked per logit by central differences."""
    p = loaded
    z = torch.from_numpy(BOX3.project_logits(np.array([1.0, 0.5, -2.0]))).requires_grad_(True)
    batch = next(training_batches(p.sets, [0, 1], 4, p.pad_id, 0))
    (grad,) = torch.autograd.grad(dev_loss(p.model, p.stack, z, batch, p.set_weights), z)
    eps = 1e-2
    for i in range(2):  # gamma's logit is the floor: softmax's derivative there is ~1e-300
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = eps
        with torch.no_grad():
            up = float(dev_loss(p.model, p.stack, z + step, batch, p.set_weights))
            down = float(dev_loss(p.model, p.stack, z - step, batch, p.set_weights))
        assert float(grad[i]) == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-5)


# ----------------------------------------------------------------------------- caps from train.data


# a cap in each unit: the budget, markov's size given, the others counted (2,000 samples each)
CAPS = {
    "tokens": ["weights.token_budget=150000", "weights.tokens={markov: 60000}"],
    "samples": ["weights.unit=samples", "weights.sample_budget=8000", "weights.samples={markov: 1000}"],
}


@pytest.mark.parametrize("unit", ["tokens", "samples"])
def test_caps_counted_from_train_data_equal_token_stats_counts(tiny_world, tmp_path, unit):
    from mergeopt.config import load_recipe

    data = {n: f"tiny://train/{n}.jsonl" for n in ("arith", "reverse", "brackets", "markov")}
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "device=cpu",
        f"world.cache_dir={tiny_world.parent}",
        "optim.steps=2",
        "data.max_examples=8",
        "weights.max_epochs=2",
        *CAPS[unit],
        "train.data=" + json.dumps(data),
    ]
    mixture = fit(load_recipe(REPO / "recipes" / "tiny.yaml", overrides), progress=False, log=lambda _m: None)
    record = mixture["constraints"]
    budget, given = (150_000, 60_000) if unit == "tokens" else (8_000, 1_000)
    assert mixture["unit"] == unit and record[unit]["markov"] == given
    assert record[{"tokens": "samples", "samples": "tokens"}[unit]] is None  # one unit's counts
    tokenizer = load_tokenizer(str(tiny_world / "base"))
    for name in ("arith", "reverse", "brackets"):
        size = getattr(measure(tiny_world / "train" / f"{name}.jsonl", tokenizer), unit)
        assert record[unit][name] == size
        assert record["upper"][name] == pytest.approx(min(1.0, 2 * size / budget), rel=1e-12)
    assert record["upper"]["markov"] == pytest.approx(2 * given / budget, rel=1e-12)
    assert (
        FeasibleSet.build(list(record["upper"]), caps=record["upper"]).violation(mixture["weights"]) is None
    )


def test_export_honours_the_recorded_repetition_cap(random_world, tmp_path, capsys):
    from mergeopt.errors import run_cli
    from mergeopt.export.command import main as export_main

    mixture = _fit(random_world, tmp_path / "run", FIT_SEARCHES["dirichlet"], CONSTRAINED)
    # the fit's own budget keeps every source within 2 epochs: T_i / B · 2 ≥ w_i
    args = [str(tmp_path / "run"), "--to", "doremi", "--out", str(tmp_path / "ok.json")]
    assert run_cli(export_main, [*args, "--budget-tokens", "10000"]) == 0
    beta_epochs = mixture["weights"]["beta"] * 40_000 / 1_500
    capsys.readouterr()
    assert run_cli(export_main, [*args, "--budget-tokens", "40000"]) == 2
    assert f"repeats source 'beta' (1,500 tokens recorded in mixture.json) {beta_epochs:.3g} times" in (
        capsys.readouterr().err
    )


def test_counted_caps_that_leave_no_mixture_are_one_line_and_write_nothing(tiny_world, tmp_path, capsys):
    from mergeopt.errors import run_cli
    from mergeopt.fit import main as fit_main

    data = {n: f"tiny://train/{n}.jsonl" for n in ("arith", "reverse", "brackets", "markov")}
    argv = [
        str(REPO / "recipes" / "tiny.yaml"),
        f"output_dir={tmp_path / 'out'}",
        f"world.cache_dir={tiny_world.parent}",
        "weights.max_epochs=1",
        "weights.token_budget=10000000",  # every source's cap is a few thousandths
        "train.data=" + json.dumps(data),
        "--quiet",
    ]
    assert run_cli(fit_main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and "weights: no mixture meets the constraints: the upper bounds sum to" in lines[0]
    )
    assert "arith 0.0017725 (cap)" in lines[0]
    assert not (tmp_path / "out").exists()
