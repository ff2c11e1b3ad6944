"""Mixture sets and the mixture sampler: exact lattice counts, seeded Dirichlet/Beta draws, and
empirical domain shares that match w."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import scipy.stats
import torch

from mergeopt.config import MixtureSetSection
from mergeopt.objectives.data import Example
from mergeopt.search.mixtures import dirichlet_samples, mixture_set, simplex_lattice
from mergeopt.worlds.train import mixture_examples, token_batches

NAMES = ["a", "b", "c", "d"]


@pytest.mark.parametrize("k, m", [(2, 4), (3, 3), (4, 3), (4, 10)])
def test_lattice_has_every_point_once(k, m):
    points = simplex_lattice(NAMES[:k], m)
    assert len(points) == comb(m + k - 1, k - 1)
    assert len({tuple(p.values()) for p in points}) == len(points)
    for p in points:
        assert abs(sum(p.values()) - 1) < 1e-12
        assert all(abs(v * m - round(v * m)) < 1e-9 for v in p.values())


def test_interior_lattice_excludes_the_faces():
    points = simplex_lattice(NAMES, 6, interior_only=True)
    assert len(points) == comb(6 - 1, 4 - 1)  # compositions of 6 into 4 positive parts
    assert all(min(p.values()) > 0 for p in points)


def test_dirichlet_is_seeded_and_on_the_simplex():
    a = dirichlet_samples(NAMES, 0.5, 50, seed=3)
    assert a == dirichlet_samples(NAMES, 0.5, 50, seed=3)
    assert a != dirichlet_samples(NAMES, 0.5, 50, seed=4)
    assert all(abs(sum(p.values()) - 1) < 1e-12 and min(p.values()) >= 0 for p in a)


def test_two_expert_dirichlet_is_the_beta_distribution_of_m3():
    draws = np.array([p["a"] for p in dirichlet_samples(["a", "b"], 2.0, 4000, seed=0)])
    assert scipy.stats.kstest(draws, scipy.stats.beta(2.0, 2.0).cdf).pvalue > 0.01


def test_list_keeps_the_recipe_order():
    spec = MixtureSetSection(kind="list", weights=({"a": 0.2, "b": 0.8}, {"b": 0.5, "a": 0.5}))
    assert mixture_set(spec, ["a", "b"], seed=0) == [{"a": 0.2, "b": 0.8}, {"a": 0.5, "b": 0.5}]


def _domain(token: int, n: int, length: int) -> list[Example]:
    return [Example(torch.full((length,), token), torch.ones(length, dtype=torch.bool)) for _ in range(n)]


def test_sampler_shares_match_the_weights_and_are_seeded():
    domains = [_domain(1, 7, 4), _domain(2, 5, 4), _domain(3, 3, 4)]
    weights = [0.5, 0.3, 0.2]
    draws = [int(ex.input_ids[0]) for ex, _ in zip(mixture_examples(domains, weights, seed=0), range(6000))]
    shares = np.bincount(draws, minlength=4)[1:] / len(draws)
    np.testing.assert_allclose(shares, weights, atol=0.02)
    again = [int(ex.input_ids[0]) for ex, _ in zip(mixture_examples(domains, weights, seed=0), range(200))]
    assert again == draws[:200]


def test_one_hot_sampler_walks_each_epoch_without_repeats():
    domain = [Example(torch.tensor([i, i]), torch.ones(2, dtype=torch.bool)) for i in range(5)]
    seen = [
        int(ex.input_ids[0])
        for ex, _ in zip(mixture_examples([domain, _domain(9, 2, 2)], [1.0, 0.0], 1), range(10))
    ]
    assert sorted(seen[:5]) == sorted(seen[5:]) == list(range(5))


def test_token_batches_hold_the_budget():
    domains = [_domain(1, 10, 3), _domain(2, 10, 7)]
    for batch, _ in zip(token_batches(mixture_examples(domains, [0.5, 0.5], 0), 40, pad_id=0), range(20)):
        tokens = int(batch.attention_mask.sum())
        assert 40 <= tokens < 40 + 7
