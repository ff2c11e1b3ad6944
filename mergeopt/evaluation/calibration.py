"""Calibrating the merged proxy with a few real runs: a Gaussian process whose prior mean is the proxy.

The proxy ranks mixtures well but its pick still loses to the truly best one (regret 0.06-0.08 on
the committed grids), and a team can usually afford a handful of real runs. This model joins both:

    truth(w) = c + b · proxy(w) + δ(w) + ε

- ``c ~ N(c0, σ_c²)``: the level, which differs between a merged and a trained model;
- ``b ~ N(1, σ_b²)``: the trust in the proxy. ``b = 1`` takes its differences at face value,
  ``b = 0`` ignores it. Its posterior is reported (:attr:`Posterior.slope`);
- ``δ ~ GP(0, σ_δ² exp(−‖w − w'‖² / 2ℓ²))``: what the proxy misses, smooth over the simplex;
- ``ε ~ N(0, σ_ε²)``: the run-to-run noise of real training.

This is Kennedy and O'Hagan's (2000) autoregressive multi-fidelity model with the cheap fidelity
known exactly wherever it is needed (the proxy is evaluated in memory at any mixture), so no model
of the proxy itself is needed. ``c`` and ``b`` are integrated out analytically (Rasmussen and
Williams 2006, §2.7): the model is one GP with mean ``c0 + proxy(w)`` and kernel
``σ_c² + σ_b² p(w) p(w') + σ_δ² k(w, w')`` plus noise. The amplitude, length scale and noise are
MAP estimates under log-normal priors: with n ≤ 6 runs the marginal likelihood alone is flat or
degenerate (two points let it put the noise at 0 or the amplitude at infinity). The priors keep the
model sane at n = 1, and the likelihood takes over as runs come in. A proxy whose differences the
runs contradict gets a posterior slope near 0 and a larger δ: the model falls back to regression
over w. ``use_proxy=False`` is that regression alone (no proxy term, mean ``c0``), the baseline the
calibration benchmark compares against.

Units: the proxy and the truth are standardised by the proxy's spread over the candidates (its
standard deviation), so the priors are stated in proxy spreads and are free of the loss's scale.

Why not a library: scikit-learn's GaussianProcessRegressor has neither kernels on some of the inputs
(the proxy term) nor priors on hyper-parameters; BoTorch or emukit (multi-fidelity GPs) would add
several heavy dependencies for linear algebra on a few dozen points. The algebra is checked against
scikit-learn's GP in the tests, with the slope term off and the hyper-parameters fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats
from scipy.linalg import cho_factor, cho_solve

SLOPE_SD = 0.5  # σ_b: a slope in [0, 2] at 95% before any run is seen
LEVEL_SD = 2.0  # σ_c around the level c0 (proxy spreads): vague, the runs set the level
JITTER = 1e-9  # added to the kernel's diagonal for a stable Cholesky factor
# log-normal priors of the fitted hyper-parameters, (median, sd of the log), in proxy spreads
PRIORS = {
    "amplitude": (0.5, 1.0),  # σ_δ: what the proxy misses, half its spread a priori
    "lengthscale": (0.5, 0.5),  # ℓ on w: the simplex's diameter is √2
    "noise": (0.05, 1.0),  # σ_ε: real runs repeat to a few hundredths of the proxy's spread
}
HYPERS = tuple(PRIORS)


@dataclass(frozen=True)
class Hyper:
    """The model's hyper-parameters, in proxy spreads (``slope_sd`` 0 turns the proxy term off)."""

    amplitude: float
    lengthscale: float
    noise: float
    slope_sd: float = SLOPE_SD
    level_sd: float = LEVEL_SD

    @classmethod
    def prior_medians(cls, use_proxy: bool = True) -> Hyper:
        return cls(*(PRIORS[name][0] for name in HYPERS), slope_sd=SLOPE_SD if use_proxy else 0.0)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)


def kernel(wa, pa, wb, pb, hyper: Hyper) -> np.ndarray:
    """Prior covariance of the latent truth (noise excluded) between mixtures a and b."""
    rbf = np.exp(-0.5 * _sq_distances(wa, wb) / hyper.lengthscale**2)
    return hyper.level_sd**2 + hyper.slope_sd**2 * np.outer(pa, pb) + hyper.amplitude**2 * rbf


def _log_prior(hyper: Hyper) -> float:
    return float(
        sum(
            stats.norm.logpdf(np.log(getattr(hyper, name)), np.log(median), sd)
            for name, (median, sd) in PRIORS.items()
        )
    )


@dataclass(frozen=True)
class Posterior:
    """The calibrated model given the runs seen: predictions at any mixture whose proxy is known.

    All inputs and outputs are in the caller's units (the truth's); the standardisation is internal.
    """

    weights: np.ndarray  # (n, K) the runs' mixtures
    proxy: np.ndarray  # (n,) standardised proxy at the runs
    residual: np.ndarray  # (n,) standardised truth minus the prior mean
    hyper: Hyper
    center: float
    scale: float
    level: float  # c0, standardised
    use_proxy: bool
    factor: tuple = field(repr=False)  # Cholesky factor of the runs' covariance

    @property
    def n(self) -> int:
        return len(self.residual)

    def _standard(self, proxy: np.ndarray) -> np.ndarray:
        return (np.asarray(proxy, dtype=float) - self.center) / self.scale

    def _prior_mean(self, proxy_std: np.ndarray) -> np.ndarray:
        """c0 (+ the proxy), one value per mixture: without the proxy and without runs it is flat,
        and a scalar there would give predict a scalar mean for many mixtures."""
        return self.level + (proxy_std if self.use_proxy else np.zeros_like(proxy_std))

    def predict(self, weights, proxy, full_cov: bool = False):
        """Posterior mean and sd (or covariance) of the noise-free truth at each mixture."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        p = self._standard(proxy)
        mean = self._prior_mean(p)
        prior = kernel(w, p, w, p, self.hyper) if full_cov else None
        if self.n:
            cross = kernel(w, p, self.weights, self.proxy, self.hyper)
            mean = mean + cross @ cho_solve(self.factor, self.residual)
            solved = cho_solve(self.factor, cross.T)
        if full_cov:
            cov = prior - cross @ solved if self.n else prior
            return self.center + self.scale * mean, self.scale**2 * cov
        var = (
            np.full(len(p), self.hyper.level_sd**2 + self.hyper.amplitude**2) + self.hyper.slope_sd**2 * p**2
        )
        if self.n:
            var = var - np.einsum("ij,ji->i", cross, solved)
        return self.center + self.scale * mean, self.scale * np.sqrt(np.maximum(var, 0.0))

    @property
    def slope(self) -> tuple[float, float]:
        """Posterior mean and sd of b, the proxy's slope: how far its differences are trusted."""
        if not self.use_proxy:
            return 0.0, 0.0
        sd2 = self.hyper.slope_sd**2
        if not self.n:
            return 1.0, float(np.sqrt(sd2))
        mean = 1.0 + sd2 * self.proxy @ cho_solve(self.factor, self.residual)
        var = sd2 - sd2**2 * self.proxy @ cho_solve(self.factor, self.proxy)
        return float(mean), float(np.sqrt(max(var, 0.0)))

    def log_marginal_likelihood(self) -> float:
        """log p(runs | hyper-parameters), in standardised units."""
        if not self.n:
            return 0.0
        chol = self.factor[0]
        return float(
            -0.5 * self.residual @ cho_solve(self.factor, self.residual)
            - np.log(np.diag(chol)).sum()
            - 0.5 * self.n * np.log(2 * np.pi)
        )


def condition(
    weights,
    truth,
    proxy,
    hyper: Hyper,
    center: float,
    scale: float,
    use_proxy: bool = True,
    level: float | None = None,
) -> Posterior:
    """The posterior given the runs ``(weights, truth)`` with the proxy's values at them, for fixed
    hyper-parameters. ``center`` and ``scale`` standardise the proxy and the truth (see :func:`fit`).
    ``level`` (standardised) is the prior mean's level c0; by default the runs' mean offset."""
    w = np.asarray(weights, dtype=float)
    w = w if w.ndim == 2 else w.reshape(len(truth), -1)
    y = (np.asarray(truth, dtype=float) - center) / scale
    p = (np.asarray(proxy, dtype=float) - center) / scale
    if not use_proxy:
        hyper = Hyper(hyper.amplitude, hyper.lengthscale, hyper.noise, 0.0, hyper.level_sd)
    if level is None:
        level = float(np.mean(y - p) if use_proxy else np.mean(y)) if len(y) else 0.0
    residual = y - (level + (p if use_proxy else 0.0))
    cov = kernel(w, p, w, p, hyper) + (hyper.noise**2 + JITTER) * np.eye(len(y))
    factor = cho_factor(cov, lower=True) if len(y) else (np.zeros((0, 0)), True)
    return Posterior(w, p, residual, hyper, center, scale, level, use_proxy, factor)


def standardisation(candidate_proxy: Sequence[float]) -> tuple[float, float]:
    """(center, scale): the proxy's mean and standard deviation over the candidates (scale 1 if flat)."""
    values = np.asarray(candidate_proxy, dtype=float)
    scale = float(values.std())
    return float(values.mean()), scale if scale > 0 else 1.0


def fit(
    weights,
    truth,
    proxy,
    candidate_proxy: Sequence[float],
    use_proxy: bool = True,
) -> Posterior:
    """The MAP hyper-parameters given the runs, and the posterior under them.

    Deterministic: L-BFGS-B on the logs of (amplitude, length scale, noise) from the prior medians
    and a fixed set of other starts; the best of them wins.
    """
    center, scale = standardisation(candidate_proxy)
    base = Hyper.prior_medians(use_proxy)
    if len(truth) == 0:
        return condition(np.zeros((0, 1)), [], [], base, center, scale, use_proxy)

    def hyper_of(x: np.ndarray) -> Hyper:
        return Hyper(*np.exp(x), slope_sd=base.slope_sd)

    def loss(x: np.ndarray) -> float:
        hyper = hyper_of(x)
        try:
            posterior = condition(weights, truth, proxy, hyper, center, scale, use_proxy)
        except np.linalg.LinAlgError:
            return 1e10
        return -(posterior.log_marginal_likelihood() + _log_prior(hyper))

    medians = np.log([PRIORS[name][0] for name in HYPERS])
    spreads = np.array([PRIORS[name][1] for name in HYPERS])
    starts = [medians] + [medians + sign * spreads * unit for sign in (-1, 1) for unit in np.eye(3)]
    bounds = [(m - 4 * s, m + 4 * s) for m, s in zip(medians, spreads)]
    best = min(
        (optimize.minimize(loss, x0, method="L-BFGS-B", bounds=bounds) for x0 in starts),
        key=lambda result: result.fun,
    )
    return condition(weights, truth, proxy, hyper_of(best.x), center, scale, use_proxy)


def expected_improvement(mean, sd, best: float, xi: float = 0.0) -> np.ndarray:
    """E[max(best − f − xi, 0)] for f ~ N(mean, sd²), lower is better; 0 where sd is 0."""
    mean, sd = np.asarray(mean, dtype=float), np.asarray(sd, dtype=float)
    gain = best - mean - xi
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, gain / sd, 0.0)
        value = gain * stats.norm.cdf(z) + sd * stats.norm.pdf(z)
    return np.where(sd > 0, np.maximum(value, 0.0), np.maximum(gain, 0.0))


@dataclass(frozen=True)
class Decision:
    """What the calibrated model says over a candidate set (indices into it)."""

    mean: np.ndarray
    sd: np.ndarray
    pick: int  # lowest mean + caution · sd
    interval: tuple[float, float]  # 95% posterior interval of the pick's true score
    prob_best: np.ndarray  # posterior probability that each candidate is the best one
    proposals: list[int]  # what to train next, in order (batch by the kriging believer)
    improvement: list[float]  # the expected improvement of each proposal when it was chosen


def _pick(mean: np.ndarray, observed: np.ndarray, scale: float) -> int:
    """Lowest mean; a tie (within 1e-9 proxy spreads) goes to a mixture already run, then the first."""
    tied = np.flatnonzero(mean <= mean.min() + 1e-9 * scale)
    ran = [i for i in tied if observed[i]]
    return int(ran[0] if ran else tied[0])


def decide(
    posterior: Posterior,
    candidates: np.ndarray,
    candidate_proxy: np.ndarray,
    observed: Sequence[int],
    batch: int = 1,
    xi: float = 0.0,
    samples: int = 2000,
    seed: int = 0,
    allowed: np.ndarray | None = None,
    caution: float = 1.0,
) -> Decision:
    """The calibrated ranking of ``candidates``, its pick with an interval, and ``batch`` proposals.

    ``observed`` are the candidates already run (never proposed again). The first proposal maximises
    the expected improvement over the best posterior mean among the runs (with no run yet: the
    lowest posterior mean, i.e. the proxy's pick); each further one assumes the previous proposals
    came out at their posterior mean (the kriging believer), so a batch spreads out.
    ``prob_best`` comes from ``samples`` seeded draws of the joint posterior. ``allowed`` (a mask)
    limits the pick and the proposals to some candidates, e.g. those within the recipe's
    constraints; the others still inform the model as runs.

    The pick minimises ``mean + caution · sd``: with ``caution`` 1 (the default) the posterior's
    84th percentile, so a mixture nobody has trained must be predicted better than the best run by
    more than its extra uncertainty to be recommended over it; 0 picks the lowest mean. In the
    calibration benchmark the cautious pick is never worse than the lowest mean and better with a
    weak proxy, whose favourites the model still half-trusts after a few runs.
    """
    candidates = np.asarray(candidates, dtype=float)
    candidate_proxy = np.asarray(candidate_proxy, dtype=float)
    ran = np.zeros(len(candidates), dtype=bool)
    ran[list(observed)] = True
    allowed = np.ones(len(candidates), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    mean, cov = posterior.predict(candidates, candidate_proxy, full_cov=True)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    pick = _pick(np.where(allowed, mean + caution * sd, np.inf), ran, posterior.scale)
    half = stats.norm.ppf(0.975) * sd[pick]
    prob_best = np.full(len(mean), np.nan)
    if samples:
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(mean, cov, size=samples, method="eigh", check_valid="ignore")
        prob_best = np.bincount(draws.argmin(axis=1), minlength=len(mean)) / samples

    proposals: list[int] = []
    improvement: list[float] = []
    believed = posterior
    chosen = ran.copy()
    for _ in range(min(batch, int((~chosen & allowed).sum()))):
        m, s = believed.predict(candidates, candidate_proxy)
        if chosen.any():
            gain = expected_improvement(m, s, float(m[chosen].min()), xi * posterior.scale)
            gain[chosen | ~allowed] = -np.inf
            index = int(np.argmax(gain))
            improvement.append(float(gain[index]))
        else:
            index = _pick(np.where(allowed, m, np.inf), chosen, posterior.scale)
            improvement.append(float("nan"))
        proposals.append(index)
        chosen[index] = True
        rows = np.flatnonzero(chosen)
        believed_truth = np.where(
            np.isin(rows, np.flatnonzero(ran)), np.nan, m[rows]
        )  # fantasised outcomes of the proposals
        believed = _with_fantasies(posterior, candidates, candidate_proxy, rows, believed_truth)
    return Decision(mean, sd, pick, (mean[pick] - half, mean[pick] + half), prob_best, proposals, improvement)


def _with_fantasies(posterior: Posterior, candidates, candidate_proxy, rows, fantasised) -> Posterior:
    """The posterior with the runs plus the proposals observed at their believed means: the same
    hyper-parameters and the same level c0, set by the real runs. A fantasy at the predicted mean then
    leaves every mean as it was and only shrinks the sds (the kriging believer); c0 taken again over
    the runs and the fantasies moved the means, by 0.8% of the proxy's spread on the tiny grid."""
    new = ~np.isnan(fantasised)
    truth = posterior.center + posterior.scale * (
        posterior.residual + posterior.level + (posterior.proxy if posterior.use_proxy else 0.0)
    )
    proxy_seen = posterior.center + posterior.scale * posterior.proxy
    seen = posterior.weights.reshape(posterior.n, candidates.shape[1])
    return condition(
        np.vstack([seen, candidates[rows[new]]]),
        np.concatenate([truth, fantasised[new]]),
        np.concatenate([proxy_seen, candidate_proxy[rows[new]]]),
        posterior.hyper,
        posterior.center,
        posterior.scale,
        posterior.use_proxy,
        posterior.level,
    )
