"""The calibration model (mergeopt.evaluation.calibration) against reference computations.

- With the proxy term and the level term off, the posterior and the marginal likelihood are
  scikit-learn's GaussianProcessRegressor's, for the same fixed kernel.
- With the residual GP off, the proxy's slope is the closed-form Bayesian linear regression's.
- Expected improvement equals a Monte Carlo estimate and its noise-free limit.
- The fitted model learns the proxy's slope from the runs, the decision follows the proxy with no
  run, proposals are never runs already made, and everything is identical for the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from mergeopt.evaluation import calibration as cal

sklearn_gp = pytest.importorskip("sklearn.gaussian_process")
kernels = pytest.importorskip("sklearn.gaussian_process.kernels")


def _simplex(rng: np.random.Generator, n: int, k: int = 3) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n)


def _smooth(w: np.ndarray) -> np.ndarray:
    return np.sin(3 * w[:, 0]) + w[:, 1] ** 2 - 0.5 * w[:, 2]


def test_posterior_equals_scikit_learn_without_the_proxy_term():
    rng = np.random.default_rng(0)
    w, w_new = _simplex(rng, 7), _simplex(rng, 5)
    y = _smooth(w) + 0.01 * rng.standard_normal(7)
    hyper = cal.Hyper(amplitude=0.7, lengthscale=0.4, noise=0.1, slope_sd=0.0, level_sd=0.0)
    posterior = cal.condition(w, y, np.zeros(7), hyper, center=0.0, scale=1.0, use_proxy=False)
    mean, sd = posterior.predict(w_new, np.zeros(5))

    gp = sklearn_gp.GaussianProcessRegressor(
        kernels.ConstantKernel(0.7**2, "fixed") * kernels.RBF(0.4, "fixed"),
        alpha=0.1**2 + cal.JITTER,
        optimizer=None,
    )
    gp.fit(w, y - y.mean())  # our prior mean is the runs' mean level
    ref_mean, ref_sd = gp.predict(w_new, return_std=True)
    np.testing.assert_allclose(mean, ref_mean + y.mean(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sd, ref_sd, rtol=1e-8, atol=1e-10)
    assert posterior.log_marginal_likelihood() == pytest.approx(gp.log_marginal_likelihood_value_, rel=1e-10)


def test_slope_is_bayesian_linear_regression_when_the_residual_gp_is_off():
    rng = np.random.default_rng(1)
    w = _simplex(rng, 9)
    proxy = rng.standard_normal(9)
    truth = 0.3 + 0.6 * proxy + 0.05 * rng.standard_normal(9)
    hyper = cal.Hyper(amplitude=1e-6, lengthscale=0.5, noise=0.05, slope_sd=0.5, level_sd=0.0)
    posterior = cal.condition(w, truth, proxy, hyper, center=0.0, scale=1.0)
    # y - level = (b - 1) p + ε with b ~ N(1, 0.5²): the textbook posterior of b
    p = proxy
    r = truth - np.mean(truth - p) - p
    precision = 1 / 0.5**2 + p @ p / 0.05**2
    expected_mean = 1 + (p @ r / 0.05**2) / precision
    mean, sd = posterior.slope
    assert mean == pytest.approx(expected_mean, rel=1e-5)
    assert sd == pytest.approx(precision**-0.5, rel=1e-4)


def test_expected_improvement_matches_monte_carlo_and_its_limits():
    rng = np.random.default_rng(2)
    mean, sd, best = np.array([0.0, 0.5, -0.2]), np.array([0.3, 1.0, 0.05]), 0.1
    draws = mean + sd * rng.standard_normal((400_000, 3))
    monte_carlo = np.maximum(best - draws, 0).mean(axis=0)
    np.testing.assert_allclose(cal.expected_improvement(mean, sd, best), monte_carlo, rtol=1e-2)
    np.testing.assert_allclose(cal.expected_improvement(mean, np.zeros(3), best), [0.1, 0.0, 0.3])


def test_fit_learns_the_proxys_slope():
    rng = np.random.default_rng(3)
    w = _simplex(rng, 40)
    proxy = _smooth(w)
    trusted = cal.fit(w[:12], 2.0 + 0.8 * proxy[:12], proxy[:12], proxy)
    slope, slope_sd = trusted.slope
    assert abs(slope - 0.8) < 2 * slope_sd + 0.05
    mean, _ = trusted.predict(w[12:], proxy[12:])
    spread = (2.0 + 0.8 * proxy).std()
    assert np.abs(mean - (2.0 + 0.8 * proxy[12:])).max() < 0.1 * spread  # unseen mixtures predicted
    # a proxy that has nothing to do with the truth: the runs take the trust away
    noise = rng.standard_normal(40)
    ignored = cal.fit(w[:12], proxy[:12], noise[:12], noise)
    assert abs(ignored.slope[0]) < 0.5 < trusted.slope[0]


def test_no_run_follows_the_proxy_and_proposals_are_new():
    rng = np.random.default_rng(4)
    w = _simplex(rng, 30)
    proxy = _smooth(w)
    prior = cal.fit(w[:0], [], [], proxy)
    decision = cal.decide(prior, w, proxy, [], batch=3)
    assert decision.pick == decision.proposals[0] == int(np.argmin(proxy))
    assert len(set(decision.proposals)) == 3
    runs = [int(np.argmin(proxy)), 3, 7]
    posterior = cal.fit(w[runs], proxy[runs] + 0.1, proxy[runs], proxy)
    decision = cal.decide(posterior, w, proxy, runs, batch=4, samples=500)
    assert not set(decision.proposals) & set(runs)
    assert len(set(decision.proposals)) == 4
    assert decision.interval[0] < decision.mean[decision.pick] < decision.interval[1]
    assert decision.prob_best.sum() == pytest.approx(1.0)
    assert all(g >= 0 for g in decision.improvement)


def test_same_inputs_same_decision():
    rng = np.random.default_rng(5)
    w = _simplex(rng, 25)
    proxy = _smooth(w)
    runs = [0, 5, 9, 11]
    truth = proxy[runs] ** 2

    def once():
        posterior = cal.fit(w[runs], truth, proxy[runs], proxy)
        return posterior.hyper, cal.decide(posterior, w, proxy, runs, batch=2, samples=300, seed=7)

    (h1, d1), (h2, d2) = once(), once()
    assert h1 == h2
    np.testing.assert_array_equal(d1.mean, d2.mean)
    np.testing.assert_array_equal(d1.prob_best, d2.prob_best)
    assert d1.proposals == d2.proposals


def test_runs_are_interpolated_up_to_the_noise():
    rng = np.random.default_rng(6)
    w = _simplex(rng, 20)
    proxy = _smooth(w)
    truth = 1.0 + proxy + 0.3 * w[:, 0]
    runs = list(range(8))
    posterior = cal.fit(w[runs], truth[runs], proxy[runs], proxy)
    mean, sd = posterior.predict(w[runs], proxy[runs])
    noise = posterior.hyper.noise * posterior.scale
    assert np.abs(mean - truth[runs]).max() < 3 * noise + 1e-6
    assert (sd <= noise + 1e-9).all()  # a run's own value is known up to the noise


def test_the_cautious_pick_prefers_what_is_known():
    rng = np.random.default_rng(7)
    w = _simplex(rng, 30)
    proxy = _smooth(w)
    runs = [0, 1, 2]
    truth = proxy[runs] + np.array([0.5, -0.4, 0.3])  # what the proxy misses: uncertain elsewhere
    posterior = cal.fit(w[runs], truth, proxy[runs], proxy)
    boldest = cal.decide(posterior, w, proxy, runs, batch=0, samples=0, caution=0.0)
    assert boldest.pick == int(np.argmin(boldest.mean))
    cautious = cal.decide(posterior, w, proxy, runs, batch=0, samples=0, caution=1.0)
    assert cautious.pick == int(np.argmin(cautious.mean + cautious.sd))
    wary = cal.decide(posterior, w, proxy, runs, batch=0, samples=0, caution=1e6)
    assert wary.pick in runs  # only the runs are known to within their noise


@pytest.mark.parametrize("use_proxy", [True, False])
def test_the_batch_believes_each_proposal_at_its_predicted_mean(use_proxy):
    """The kriging believer: the second proposal maximises the expected improvement of a model that
    saw the first at its posterior mean, which leaves every mean as it was and shrinks each
    variance by the rank-one update var(x) - cov(x, x1)² / (var(x1) + σ_ε²). The level c0 was
    taken again over the runs and the fantasy, which moved the means and the improvements by ~1%."""
    rng = np.random.default_rng(8)
    w = _simplex(rng, 40)
    proxy = _smooth(w)
    runs = [0, 5, 9]
    truth = 0.7 * proxy[runs] + w[runs, 0] + 0.3
    posterior = cal.fit(w[runs], truth, proxy[runs], proxy, use_proxy)
    decision = cal.decide(posterior, w, proxy, runs, batch=2, samples=0)
    mean, cov = posterior.predict(w, proxy, full_cov=True)
    first = decision.proposals[0]
    noise = (posterior.hyper.noise * posterior.scale) ** 2
    var = np.diag(cov) - cov[:, first] ** 2 / (cov[first, first] + noise)
    gain = cal.expected_improvement(mean, np.sqrt(np.maximum(var, 0.0)), mean[[*runs, first]].min())
    gain[[*runs, first]] = -np.inf
    assert decision.proposals[1] == int(np.argmax(gain))
    assert decision.improvement[1] == pytest.approx(gain.max(), rel=1e-7)


def test_without_the_proxy_and_without_runs_the_prior_is_one_value_per_mixture():
    """The regression alone before any run: a flat prior (c0 = 0, one sd everywhere), one mean per
    mixture. Its prior mean was a scalar, and decide failed with a TypeError on len()."""
    rng = np.random.default_rng(3)
    w = _simplex(rng, 6)
    proxy = _smooth(w)
    posterior = cal.fit(np.zeros((0, 3)), [], [], proxy, use_proxy=False)
    mean, sd = posterior.predict(w, proxy)
    assert mean.shape == sd.shape == (6,)
    np.testing.assert_allclose(mean, posterior.center, rtol=0, atol=0)
    np.testing.assert_allclose(
        sd, posterior.scale * np.hypot(cal.LEVEL_SD, cal.PRIORS["amplitude"][0]), rtol=1e-12
    )
    decision = cal.decide(posterior, w, proxy, [], batch=2, samples=10)
    assert decision.mean.shape == (6,) and len(decision.proposals) == 2
