"""Mixture sets and the mixture sampler: exact lattice counts, seeded Dirichlet/Beta draws, and
empirical domain shares that match w, in samples or in tokens (weights.unit)."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import scipy.stats
import torch

from mergeopt.config import MixtureSetSection
from mergeopt.objectives.data import Example
from mergeopt.search.mixtures import dirichlet_samples, mixture_set, simplex_lattice
from mergeopt.worlds.training_data import draw_probabilities, mixture_examples, token_batches

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
    stream = mixture_examples(domains, weights, seed=0)
    draws = [(i, int(ex.input_ids[0])) for (i, ex), _ in zip(stream, range(6000))]
    assert all(token == i + 1 for i, token in draws)  # the domain index names the example's domain
    shares = np.bincount([i for i, _ in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(shares, weights, atol=0.02)
    again = [
        (i, int(ex.input_ids[0]))
        for (i, ex), _ in zip(mixture_examples(domains, weights, seed=0), range(200))
    ]
    assert again == draws[:200]


def _lengths(token: int, lengths: list[int]) -> list[Example]:
    return [Example(torch.full((n,), token), torch.ones(n, dtype=torch.bool)) for n in lengths]


# three domains whose examples hold 2, 6 (mean of 4 and 8) and 12 tokens
UNEVEN = [_lengths(1, [2] * 5), _lengths(2, [4, 8] * 3), _lengths(3, [12] * 4)]
MEANS = [2.0, 6.0, 12.0]


def _token_shares(probabilities: list[float], draws: int = 20_000) -> np.ndarray:
    tokens = np.zeros(3)
    for (i, ex), _ in zip(mixture_examples(UNEVEN, probabilities, seed=1), range(draws)):
        tokens[i] += ex.input_ids.numel()
    return tokens / tokens.sum()


def test_token_unit_draws_so_each_domain_gets_its_share_of_the_tokens():
    weights = [0.2, 0.3, 0.5]
    probabilities = draw_probabilities(weights, UNEVEN, "tokens")
    per_token = np.array(weights) / np.array(MEANS)  # p_i is proportional to w_i / m_i
    np.testing.assert_allclose(probabilities, per_token / per_token.sum(), rtol=1e-12)
    np.testing.assert_allclose(_token_shares(probabilities), weights, atol=0.01)


def test_sample_unit_draws_the_weights_and_so_gives_long_domains_more_tokens():
    weights = [0.2, 0.3, 0.5]
    assert draw_probabilities(weights, UNEVEN, "samples") == weights
    expected = np.array(weights) * np.array(MEANS)  # t_i is proportional to w_i m_i
    shares = _token_shares(weights)
    np.testing.assert_allclose(shares, expected / expected.sum(), atol=0.01)
    assert abs(shares[0] - weights[0]) > 0.1  # the two units are far apart on these domains


@pytest.mark.parametrize("unit", ["tokens", "samples"])
def test_a_one_hot_mixture_is_the_same_in_either_unit(unit):
    assert draw_probabilities([0.0, 1.0, 0.0], UNEVEN, unit) == [0.0, 1.0, 0.0]


def test_one_hot_sampler_walks_each_epoch_without_repeats():
    domain = [Example(torch.tensor([i, i]), torch.ones(2, dtype=torch.bool)) for i in range(5)]
    seen = [
        int(ex.input_ids[0])
        for (_, ex), _ in zip(mixture_examples([domain, _domain(9, 2, 2)], [1.0, 0.0], 1), range(10))
    ]
    assert sorted(seen[:5]) == sorted(seen[5:]) == list(range(5))


def test_token_batches_hold_the_budget_and_count_each_domains_tokens():
    domains = [_domain(1, 10, 3), _domain(2, 10, 7)]
    stream = mixture_examples(domains, [0.5, 0.5], 0)
    for (batch, per_domain), _ in zip(token_batches(stream, 40, 0, 2), range(20)):
        tokens = int(batch.attention_mask.sum())
        assert 40 <= tokens < 40 + 7
        assert sum(per_domain) == tokens
        ids = batch.input_ids[batch.attention_mask.bool()]
        assert per_domain == [int((ids == 1).sum()), int((ids == 2).sum())]
