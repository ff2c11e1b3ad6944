"""The simplex parametrisation: softmax with temperature, its inverse, the uniform start."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeopt.merging.weights import as_mapping, initial_logits, logits_for, weights_from_logits


def test_softmax_with_temperature_matches_the_formula():
    z = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    for t in (0.25, 1.0, 3.0):
        expected = torch.exp(z / t) / torch.exp(z / t).sum()
        torch.testing.assert_close(weights_from_logits(z, t), expected, atol=1e-15, rtol=0)


def test_uniform_start_and_given_start():
    names = ["a", "b", "c", "d"]
    torch.testing.assert_close(
        weights_from_logits(initial_logits(names, None)), torch.full((4,), 0.25, dtype=torch.float64)
    )
    init = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    for t in (0.5, 2.0):
        w = weights_from_logits(initial_logits(names, init, t), t)
        assert as_mapping(names, w) == pytest.approx(init, abs=1e-12)


@settings(deadline=None)  # timing varies on a shared CPU; the property is what is tested
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8), st.floats(0.1, 5.0))
def test_logits_for_inverts_softmax(raw, temperature):
    w = torch.tensor(raw, dtype=torch.float64)
    w = w / w.sum()
    back = weights_from_logits(logits_for(w, temperature), temperature)
    torch.testing.assert_close(back, w, atol=1e-12, rtol=0)
    assert abs(back.sum().item() - 1) < 1e-12
