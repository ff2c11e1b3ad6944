"""The gradient strategy's loop: accumulation averages micro-batches, early stopping honours patience,
the kept w is the best held-out one, and a given start mixture is where the trace begins."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergeopt.config import OptimSection
from mergeopt.loading.checkpoints import open_all
from mergeopt.merging.stacking import build_stack
from mergeopt.merging.weights import initial_logits
from mergeopt.objectives.data import load_dev_set, training_batches
from mergeopt.objectives.loss import dev_loss
from mergeopt.search import fit_gradient
from mergeopt.worlds import toy


@pytest.fixture(scope="module")
def problem(random_world):
    model = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float32).eval()
    _, experts = open_all(random_world["base"], random_world["experts"])
    stack = build_stack(model, experts, progress=False)
    tokenizer = toy.build_tokenizer()
    sets = [load_dev_set(n, p, 1.0, tokenizer, 48, 0.25, 0) for n, p in random_world["dev"].items()]
    return model, stack, sets


def run(problem, z0=None, **optim):
    model, stack, sets = problem
    z0 = torch.zeros(3, dtype=torch.float64) if z0 is None else z0
    return fit_gradient(
        model,
        stack,
        sets,
        torch.tensor([1.0, 1.0]),
        OptimSection(**optim),
        z0,
        seed=0,
        pad_id=0,
        device=torch.device("cpu"),
        progress=False,
    )


def test_step_loss_is_the_mean_over_accumulated_micro_batches(problem):
    model, stack, sets = problem
    result = run(problem, steps=1, batch_size=2, grad_accum=3, eval_every=1)
    stream = training_batches(sets, [0, 1], 2, 0, seed=0)
    z0 = torch.zeros(3, dtype=torch.float64)
    expected = (
        sum(float(dev_loss(model, stack, z0, next(stream), torch.tensor([1.0, 1.0]))) for _ in range(3)) / 3
    )
    assert result.trace[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_early_stopping_after_patience_evaluations_without_gain(problem):
    # a learning rate this small cannot improve the held-out loss by min_delta
    result = run(problem, lr=1e-9, steps=100, eval_every=3, patience=2, min_delta=1e-3)
    assert result.stopped_early
    assert result.steps_run == 3 * 2  # evaluations at steps 0 (best), 3 (stale), 6 (stale: stop)
    assert result.best_step == 0
    torch.testing.assert_close(result.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_returned_weights_are_those_of_the_best_heldout_row(problem):
    result = run(problem, lr=0.5, steps=12, eval_every=2, patience=100, min_delta=0.0)
    evaluated = [r for r in result.trace if r["heldout_loss"] == r["heldout_loss"]]
    best = min(evaluated, key=lambda r: r["heldout_loss"])
    assert best["step"] == result.best_step and result.best_heldout_loss == best["heldout_loss"]
    for i, name in enumerate(problem[1].expert_names):
        assert result.weights[i].item() == pytest.approx(best[f"w_{name}"], abs=1e-12)


def test_start_mixture_is_the_first_trace_row(problem):
    names = problem[1].expert_names
    init = {names[0]: 0.6, names[1]: 0.3, names[2]: 0.1}
    result = run(problem, z0=initial_logits(names, init), steps=2, eval_every=1)
    assert [result.trace[0][f"w_{n}"] for n in names] == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)


def test_no_heldout_keeps_the_last_weights(problem, random_world):
    model, stack, _ = problem
    tokenizer = toy.build_tokenizer()
    sets = [load_dev_set(n, p, 1.0, tokenizer, 48, 0.0, 0) for n, p in random_world["dev"].items()]
    result = run((model, stack, sets), steps=4, lr=0.3)
    assert not result.stopped_early and result.best_heldout_loss is None and result.steps_run == 4
    last = result.trace[-1]
    assert [last[f"w_{n}"] for n in stack.expert_names] == pytest.approx(result.weights.tolist(), abs=1e-12)


def test_logits_that_overflow_stop_the_fit_at_the_best_finite_mixture(problem):
    # Adam's first step of lr 1e308 leaves float64 (w_1 would be NaN): the fit keeps w_0
    result = run(problem, lr=1e308, steps=10, eval_every=1, patience=100)
    assert result.non_finite == {"step": 1, "quantity": "mixture logits", "value": "nan"}
    assert result.steps_run == 0 and result.best_step == 0
    torch.testing.assert_close(result.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    evaluated = [r for r in result.trace if r["heldout_loss"] == r["heldout_loss"]]
    assert result.best_heldout_loss == min(r["heldout_loss"] for r in evaluated)


def test_a_nan_loss_stops_the_fit_and_keeps_the_last_finite_step(problem, random_world, monkeypatch):
    from mergeopt.search import gradient

    model, stack, _ = problem
    tokenizer = toy.build_tokenizer()
    sets = [load_dev_set(n, p, 1.0, tokenizer, 48, 0.0, 0) for n, p in random_world["dev"].items()]
    calls = []

    def nan_from_the_third(*args, **kwargs):  # the loss at w_2 is NaN
        calls.append(1)
        loss = dev_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(gradient, "dev_loss", nan_from_the_third)
    result = run((model, stack, sets), steps=6, lr=0.3)
    assert result.non_finite == {"step": 2, "quantity": "training loss", "value": "nan"}
    assert result.best_step == 1 and result.steps_run == 2
    row = result.trace[1]
    assert [row[f"w_{n}"] for n in stack.expert_names] == pytest.approx(result.weights.tolist(), abs=1e-12)


def test_a_nan_loss_at_the_start_is_refused(problem, random_world, monkeypatch):
    from mergeopt.errors import UserError
    from mergeopt.search import gradient

    model, stack, _ = problem
    tokenizer = toy.build_tokenizer()
    sets = [load_dev_set(n, p, 1.0, tokenizer, 48, 0.0, 0) for n, p in random_world["dev"].items()]
    monkeypatch.setattr(gradient, "dev_loss", lambda *a, **k: dev_loss(*a, **k) * float("nan"))
    with pytest.raises(UserError, match="training loss is nan at step 0, before any finite step"):
        run((model, stack, sets), steps=3)
