"""The chunked loss against autograd through whole float32 logits: losses and every gradient, with
and without a low-rank update of the output layer (a LoRA expert on ``lm_head``: logits + u Vᵀ)."""

import pytest
import torch
import torch.nn.functional as F

from mergeopt.objectives.head_loss import IGNORE_INDEX, ChunkedCrossEntropy, Head


def reference(hidden, weight, bias, targets, head: Head, low_hidden=None, low_weight=None):
    z = F.linear(hidden, weight, bias)
    if low_hidden is not None:
        z = z + low_hidden @ low_weight.T
    z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return F.cross_entropy(z, targets, reduction="none", ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("low_rank", [0, 3], ids=["plain", "low-rank"])
@pytest.mark.parametrize("head", [Head(), Head(scale=0.5), Head(scale=2.0, softcap=3.0)], ids=str)
@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
def test_chunked_loss_and_gradients_equal_the_whole_logits(head, chunk, low_rank):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 11, 6, 13
    inputs = [
        torch.randn(n, h, generator=gen, dtype=torch.float64),
        torch.randn(v, h, generator=gen, dtype=torch.float64),
        torch.randn(v, generator=gen, dtype=torch.float64),
    ]
    if low_rank:  # u (n × r) and V (v × r): the update's u Vᵀ
        inputs += [
            torch.randn(n, low_rank, generator=gen, dtype=torch.float64),
            torch.randn(v, low_rank, generator=gen, dtype=torch.float64),
        ]
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[2, 7]] = IGNORE_INDEX
    upstream = torch.rand(n, generator=gen, dtype=torch.float64)
    got, want = ([x.clone().requires_grad_(True) for x in inputs] for _ in range(2))
    losses = ChunkedCrossEntropy.apply(*got[:3], targets, head, chunk, *got[3:])
    (losses * upstream).sum().backward()
    expected = reference(*want[:3], targets, head, *want[3:])
    (expected * upstream).sum().backward()
    torch.testing.assert_close(losses, expected.float(), atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias", "u", "V"), got, want):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    """The last chunk's gradient factor is handed over once; a retained graph must not reuse a freed one."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)
    losses = ChunkedCrossEntropy.apply(hidden, weight, None, targets, Head(), 2)
    losses.sum().backward(retain_graph=True)
    first = weight.grad.clone()
    losses.sum().backward()
    torch.testing.assert_close(weight.grad, 2 * first)


def test_no_gradient_factor_is_kept_without_grad():
    hidden, weight = torch.randn(5, 4), torch.randn(7, 4)
    with torch.no_grad():
        losses = ChunkedCrossEntropy.apply(hidden, weight, None, torch.zeros(5, dtype=torch.long), Head(), 2)
    assert losses.grad_fn is None


def test_no_tokens_give_zero_gradients():
    """A rank's empty share of a batch under torchrun: no loss, and zero (not missing) gradients."""
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    losses = ChunkedCrossEntropy.apply(hidden, weight, bias, torch.zeros(0, dtype=torch.long), Head(), 2)
    losses.sum().backward()
    assert losses.shape == (0,)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(
        bias.grad, torch.zeros_like(bias)
    )


def test_no_tokens_give_zero_gradients_of_the_low_rank_terms():
    low_hidden = torch.zeros(0, 2, requires_grad=True)
    low_weight = torch.randn(7, 2, requires_grad=True)
    hidden, weight = torch.zeros(0, 4), torch.randn(7, 4)
    targets = torch.zeros(0, dtype=torch.long)
    ChunkedCrossEntropy.apply(
        hidden, weight, None, targets, Head(), 2, low_hidden, low_weight
    ).sum().backward()
    assert torch.equal(low_weight.grad, torch.zeros_like(low_weight)) and low_hidden.grad.shape == (0, 2)
