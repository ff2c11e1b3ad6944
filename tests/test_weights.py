"""The simplex parametrisation: softmax, its inverse, the start every strategy shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeopt.merging.weights import (
    as_mapping,
    initial_logits,
    logits_for,
    start_weights,
    weights_from_logits,
)


def test_softmax_matches_the_formula():
    z = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(weights_from_logits(z), torch.exp(z) / torch.exp(z).sum(), atol=1e-15, rtol=0)


def test_uniform_start_and_given_start():
    names = ["a", "b", "c", "d"]
    torch.testing.assert_close(
        weights_from_logits(initial_logits(names, None)), torch.full((4,), 0.25, dtype=torch.float64)
    )
    np.testing.assert_array_equal(start_weights(names, None), np.full(4, 0.25))
    init = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    w = weights_from_logits(initial_logits(names, init))
    assert as_mapping(names, w) == pytest.approx(init, abs=1e-12)
    np.testing.assert_allclose(start_weights(names, init), [0.1, 0.2, 0.3, 0.4], rtol=0, atol=1e-15)
    # the recipe checks init sums to 1 within a tolerance; the start is exactly normalised
    assert start_weights(["a", "b"], {"a": 0.3, "b": 0.7000001}).sum() == pytest.approx(1.0, abs=1e-15)


@settings(deadline=None)  # timing varies on a shared CPU; the property is what is tested
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8))
def test_logits_for_inverts_softmax(raw):
    w = torch.tensor(raw, dtype=torch.float64)
    w = w / w.sum()
    back = weights_from_logits(logits_for(w))
    torch.testing.assert_close(back, w, atol=1e-12, rtol=0)
    assert abs(back.sum().item() - 1) < 1e-12
