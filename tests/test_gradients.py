"""dloss/dz from autograd against central finite differences, and gradient reaches only z.

The model runs in float64, but LlamaRMSNorm computes in float32 whatever the input dtype, so the
loss carries float32 rounding (~1e-7). Experts sit far from the base (noise 0.3) and eps = 1e-3
keep the finite difference well above that noise and its truncation error well below rtol.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.data import collate, load_dev_set
from mergeopt.objectives.loss import dev_loss
from mergeopt.worlds import toy
from tests.conftest import perturbed


@pytest.fixture(scope="module")
def problem64(random_world):
    base = AutoModelForCausalLM.from_pretrained(random_world["base"], dtype=torch.float64).eval()
    experts = {n: perturbed(base, 100 + i, scale=0.3).double().state_dict() for i, n in enumerate("abc")}
    stack = build_stack(base, experts, dtype=torch.float64, progress=False)
    tokenizer = toy.build_tokenizer()
    sets = [load_dev_set(n, p, 1.0, tokenizer, 48, 0.0, 0) for n, p in random_world["dev"].items()]
    items = [(i, ex) for i, s in enumerate(sets) for ex in s.fit[:4]]
    return base, stack, collate(items, pad_id=0)


def test_gradient_matches_central_finite_differences(problem64):
    model, stack, batch = problem64
    set_weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    z = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    loss = dev_loss(model, stack, z, batch, set_weights)
    (grad,) = torch.autograd.grad(loss, z)

    eps = 1e-3
    numeric = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            step = torch.zeros(3, dtype=torch.float64)
            step[i] = eps
            up = dev_loss(model, stack, z + step, batch, set_weights)
            down = dev_loss(model, stack, z - step, batch, set_weights)
            numeric[i] = (up - down) / (2 * eps)
    assert grad.abs().max() > 1e-6, "gradient vanished: the check would be vacuous"
    torch.testing.assert_close(grad, numeric, rtol=1e-3, atol=1e-6)


def test_only_the_logits_receive_gradient(problem64):
    model, stack, batch = problem64
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    dev_loss(model, stack, z, batch, torch.ones(2, dtype=torch.float64)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(t.grad is None and not t.requires_grad for t in stack.deltas.values())


def test_target_weights_select_the_domain(problem64):
    """With a_s = (1, 0) the loss is the first set's mean token loss alone."""
    model, stack, batch = problem64
    z = torch.zeros(3, dtype=torch.float64)
    only_first = dev_loss(model, stack, z, batch, torch.tensor([1.0, 0.0]))
    rows = batch.set_index == 0
    from mergeopt.objectives.data import Batch

    first = Batch(
        batch.input_ids[rows], batch.attention_mask[rows], batch.scored[rows], batch.set_index[rows]
    )
    alone = dev_loss(model, stack, z, first, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(only_first, alone, atol=1e-10, rtol=0)
