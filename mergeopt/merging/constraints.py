"""The feasible set of a constrained mixture, defined once: {lo ≤ w ≤ hi, Σw = 1}.

A recipe can bound each expert's weight (``weights.bounds``), pin some weights
(``weights.pinned``: lo = hi = the pin, the others share what is left) and cap repetition
(``weights.max_epochs`` R with a ``weights.token_budget`` B: source i's T training tokens can be
seen at most R times, so w_i ≤ R·T_i / B; in samples, with ``weights.sample_budget``, the same with
each source's samples). All three become one box, the intersection of the
bounds, the pins and the caps, intersected with the simplex. Every strategy searches that set and
every consumer (mixture.json, the exports) checks against it, so this module is the only place
that knows what "feasible" means.

Two projections, both exact (a monotone piecewise-linear equation solved between its sorted
breakpoints, no iteration and no tolerance):

- :meth:`FeasibleSet.project`, the Euclidean projection, w = clip(v − τ, lo, hi) with Σw = 1:
  what a zero-order candidate outside the box (a grid point past a cap) is moved to.
- :meth:`FeasibleSet.softmax`, the KL (Bregman) projection of softmax(z), w = clip(c·e^z, lo, hi)
  with Σw = 1: the feasible version of softmax. It *is* softmax when the box is [0, 1]^K.

The gradient strategy keeps Adam on the logits z and, after each step, replaces z by the logits of
``softmax(z)`` (:meth:`FeasibleSet.project_logits`), so the model is always evaluated at
w = softmax(z), a feasible point, and the gradient is softmax's own (the one autograd gives, with
nothing clipped inside the graph). Why this and not the alternatives:

- A parametrisation that clips inside the graph, w = Π(softmax(z)), has a zero gradient on every
  clipped weight: an expert held at its cap can never learn that it should come down.
- Euclidean projection after a step in logit space mixes two geometries: Adam moves the logits of
  the free experts by about the same amount, a common *factor* on their weights, and a Euclidean
  projection restores the sum by a common *offset*. The constrained optimum is then not a fixed
  point and the iterate drifts. The KL projection restores the sum by a common factor, so it undoes
  exactly what Adam does to the free experts at a constrained optimum: the optimum is a fixed point
  (tests/test_constraints.py checks that projected Adam reaches scipy's constrained optimum).
- A stick-breaking map onto the box is exact and smooth but depends on the order of the experts
  and reaches a bound only in the limit; a cap is usually binding, so the answer would sit just
  inside it.

The zero-order strategies get feasible candidates the same way: CMA-ES and SPSA map their logits
through :meth:`FeasibleSet.softmax`; the grid is a lattice of the lower-bounded simplex
(w = lo + (1 − Σlo)·c/d), its points past an upper bound projected; Dirichlet draws are mapped
onto the lower-bounded simplex the same way and kept only if they respect the upper bounds
(a Dirichlet conditioned on the box), with projections only if too few survive.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mergeopt.merging.simplex import SIMPLEX_TOLERANCE

TINY = 1e-300  # the smallest weight a logit stands for: log(0) would be -inf, which JSON cannot hold
SAMPLING_ROUNDS = 50  # rounds of Dirichlet draws before the remaining samples are projections
BOUND_TOLERANCE = 1e-12  # a weight this close to its bound is at it (the step's logits round-trip)


@dataclass(frozen=True)
class FeasibleSet:
    """{lo ≤ w ≤ hi, Σw = 1} over ``names``; ``upper_from`` says which constraint set each hi."""

    names: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    upper_from: tuple[str, ...]  # per expert: "bound", "pinned", "cap" or "" (hi = 1)

    # -- building and checking -----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        names: Sequence[str],
        bounds: Mapping[str, Sequence[float]] | None = None,
        pinned: Mapping[str, float] | None = None,
        caps: Mapping[str, float] | None = None,
    ) -> FeasibleSet:
        """The box that bounds, pins and repetition caps leave; a pin outside its bounds is refused."""
        bounds, pinned, caps = bounds or {}, pinned or {}, caps or {}
        lower, upper, why = [], [], []
        for name in names:
            lo, hi = (float(v) for v in bounds.get(name, (0.0, 1.0)))
            source = "bound" if name in bounds and hi < 1.0 else ""
            if name in pinned:
                value = float(pinned[name])
                if not lo - SIMPLEX_TOLERANCE <= value <= hi + SIMPLEX_TOLERANCE:
                    raise ValueError(
                        f"weights.pinned {name!r} is {value:g}, outside its weights.bounds [{lo:g}, {hi:g}]"
                    )
                lo, hi, source = value, value, "pinned"
            if name in caps and caps[name] < hi:
                hi, source = float(caps[name]), "cap"
            lower.append(lo)
            upper.append(hi)
            why.append(source)
        return cls(tuple(names), tuple(lower), tuple(upper), tuple(why))

    def problem(self) -> str | None:
        """Why no mixture satisfies the box, naming the culprits, or None."""
        for name, lo, hi, why in zip(self.names, self.lower, self.upper, self.upper_from):
            if lo > hi + SIMPLEX_TOLERANCE:
                limit = "repetition cap" if why == "cap" else "upper bound"
                return f"{name!r} needs at least {lo:g} but its {limit} is {hi:g}"
        if math.fsum(self.lower) > 1.0 + SIMPLEX_TOLERANCE:
            parts = ", ".join(f"{n} {lo:g}" for n, lo in zip(self.names, self.lower) if lo > 0)
            return f"the lower bounds and pins sum to {math.fsum(self.lower):.6g}, above 1 ({parts})"
        if math.fsum(self.upper) < 1.0 - SIMPLEX_TOLERANCE:
            parts = ", ".join(
                f"{n} {hi:g}{f' ({why})' if why else ''}"
                for n, hi, why in zip(self.names, self.upper, self.upper_from)
            )
            return f"the upper bounds sum to {math.fsum(self.upper):.6g}, below 1 ({parts})"
        return None

    @property
    def trivial(self) -> bool:
        """Every weight free in [0, 1]: the plain simplex, searched exactly as without constraints."""
        return all(lo <= 0.0 for lo in self.lower) and all(hi >= 1.0 for hi in self.upper)

    def violation(self, weights: Mapping[str, float] | Sequence[float]) -> str | None:
        """The first weight outside its bounds (within the simplex tolerance), in words, or None."""
        values = [weights[n] for n in self.names] if isinstance(weights, Mapping) else list(weights)
        for name, w, lo, hi, why in zip(self.names, values, self.lower, self.upper, self.upper_from):
            if not lo - SIMPLEX_TOLERANCE <= w <= hi + SIMPLEX_TOLERANCE:
                what = {"pinned": " (pinned)", "cap": " (the upper limit is its repetition cap)"}.get(why, "")
                return f"the weight of {name!r} is {w:.6g}, outside [{lo:g}, {hi:g}]{what}"
        return None

    def contains(self, w: Sequence[float]) -> bool:
        w = np.asarray(w, dtype=np.float64)
        return bool(
            abs(float(w.sum()) - 1.0) <= SIMPLEX_TOLERANCE
            and np.all(w >= self._lo - SIMPLEX_TOLERANCE)
            and np.all(w <= self._hi + SIMPLEX_TOLERANCE)
        )

    @property
    def _lo(self) -> np.ndarray:
        return np.asarray(self.lower, dtype=np.float64)

    @property
    def _hi(self) -> np.ndarray:
        return np.asarray(self.upper, dtype=np.float64)

    # -- projections -----------------------------------------------------------------------------
    def _nonempty(self) -> None:
        if (problem := self.problem()) is not None:  # callers check first; this is a bug, not input
            raise ValueError(f"cannot project onto an empty set: {problem}")

    def project(self, v: np.ndarray) -> np.ndarray:
        """Euclidean projection onto the feasible set, row by row: argmin ||w − v||², exact."""
        self._nonempty()
        v = np.asarray(v, dtype=np.float64)
        rows = np.atleast_2d(v)
        t = _solve(rows, np.ones_like(rows), self._lo, self._hi)
        out = np.clip(rows + t[:, None], self._lo, self._hi)
        return out.reshape(v.shape)

    def softmax(self, z: np.ndarray) -> np.ndarray:
        """The feasible softmax: the KL projection of softmax(z) onto the set, clip(c·e^z, lo, hi)."""
        self._nonempty()
        z = np.asarray(z, dtype=np.float64)
        rows = np.atleast_2d(z)
        scaled = np.maximum(np.exp(rows - rows.max(axis=1, keepdims=True)), TINY)
        c = _solve(np.zeros_like(rows), scaled, self._lo, self._hi)
        out = np.clip(c[:, None] * scaled, self._lo, self._hi)
        return out.reshape(z.shape)

    def project_logits(self, z: np.ndarray) -> np.ndarray:
        """Logits z' with softmax(z') = self.softmax(z) and logsumexp(z') = 0 (weights floored at 1e-300)."""
        return np.log(np.maximum(self.softmax(z), TINY))

    def held_gradient(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        """∂L/∂w with the push of every expert the step must hold at its bound replaced by τ.

        d = clip(τ − g, ·) with Σd = 0, 0 ≤ d_i at a lower bound, d_i ≤ 0 at an upper bound and
        d_i = 0 when pinned, is the Euclidean projection of −g onto the set's tangent cone at w (τ
        exact: a monotone piecewise-linear equation, as :func:`_solve`). An expert whose d_i is
        clipped to 0 is held; its entry becomes τ, the free experts' common value at a KKT point.
        At the constrained optimum every entry is then τ and the logits' gradient is 0. Why a
        hierarchical step needs it: :mod:`mergeopt.search.gradient`."""
        w, g = np.asarray(w, dtype=np.float64), np.asarray(g, dtype=np.float64)
        at_lo, at_hi = w <= self._lo + BOUND_TOLERANCE, w >= self._hi - BOUND_TOLERANCE
        moving = ~(at_lo & at_hi)
        if not moving.any():
            return np.zeros_like(g)
        lo = np.where(at_lo & moving, 0.0, -np.inf)  # the tangent cone's limits on d
        hi = np.where(at_hi & moving, 0.0, np.inf)
        knots = np.unique(g[moving])  # φ(τ) = Σ clip(τ − g_i) is linear between these
        phi = np.array([np.clip(t - g[moving], lo[moving], hi[moving]).sum() for t in knots])
        k = int(np.searchsorted(phi, 0.0, side="left"))  # φ(min g) ≤ 0 ≤ φ(max g)
        if k == 0 or phi[k] == phi[k - 1]:
            tau = knots[max(k - 1, 0)]
        else:
            tau = knots[k - 1] - phi[k - 1] * (knots[k] - knots[k - 1]) / (phi[k] - phi[k - 1])
        held = ~moving | (at_lo & (tau - g <= 0.0)) | (at_hi & (tau - g >= 0.0))
        return np.where(held, tau, g)

    def centre(self) -> np.ndarray:
        """The most uniform feasible mixture (both projections of the uniform one): a start."""
        k = len(self.names)
        return self.project(np.full(k, 1.0 / k))

    # -- candidates for the zero-order strategies ------------------------------------------------
    @property
    def _free(self) -> np.ndarray:
        return np.flatnonzero(self._hi - self._lo > SIMPLEX_TOLERANCE)

    def _from_free(self, shares: np.ndarray) -> np.ndarray:
        """Rows of shares over the free experts -> mixtures lo + (1 − Σlo)·share on the free ones."""
        out = np.tile(self._lo, (len(shares), 1))
        out[:, self._free] += (1.0 - self._lo.sum()) * shares
        return out

    def lattice(self, divisions: int) -> np.ndarray:
        """The step-1/divisions lattice of the lower-bounded simplex over the free experts, points
        past an upper bound projected, duplicates dropped (first kept): the constrained grid."""
        free = len(self._free)
        if free == 0:
            return self._lo[None, :].copy()
        counts = [c for c in itertools.product(range(divisions + 1), repeat=free) if sum(c) == divisions]
        points = self._from_free(np.array(counts, dtype=np.float64) / divisions)
        outside = ~np.all(points <= self._hi + SIMPLEX_TOLERANCE, axis=1)
        points[outside] = self.project(points[outside])
        _, first = np.unique(np.round(points, 12), axis=0, return_index=True)
        return points[np.sort(first)]

    @property
    def free(self) -> tuple[int, ...]:
        """The experts with room between their bounds (not pinned), in order: what a draw shares out."""
        return tuple(int(i) for i in self._free)

    def sample(
        self,
        rng: np.random.Generator,
        alpha: float,
        count: int,
        shares: Callable[[np.random.Generator, int], np.ndarray] | None = None,
    ) -> np.ndarray:
        """``count`` draws of Dirichlet(α) over the free experts, mapped onto the lower-bounded
        simplex and kept when within the upper bounds (a Dirichlet conditioned on the box), in
        rounds; if ``SAMPLING_ROUNDS`` rounds keep too few, the rest are projected draws.
        ``shares(rng, n)``: n rows of shares over the free experts drawn otherwise (a hierarchical
        draw, :func:`mergeopt.search.dirichlet.draw_feasible`), conditioned the same way."""
        free = len(self._free)
        if free <= 1:
            return np.tile(self.project(self._lo), (count, 1))
        if shares is None:
            shares = lambda rng, n: rng.dirichlet(np.full(free, alpha), size=n)  # noqa: E731
        kept, rejected = [], []
        for _ in range(SAMPLING_ROUNDS):
            draws = self._from_free(shares(rng, count))
            inside = np.all(draws <= self._hi + SIMPLEX_TOLERANCE, axis=1)
            kept.extend(draws[inside])
            rejected.extend(draws[~inside])
            if len(kept) >= count:
                return np.array(kept[:count])
        missing = count - len(kept)
        return np.array([*kept, *self.project(np.array(rejected[:missing]))])


def repetition_caps(max_epochs: float, budget: int, sizes: Mapping[str, int]) -> dict[str, float]:
    """w_i ≤ R·T_i / B: a source of T_i tokens (samples) is repeated at most R times in a budget of
    B tokens (samples), w being shares of the same unit."""
    return {name: max_epochs * t / budget for name, t in sizes.items()}


def _solve(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row, the t with Σ_i clip(a_i + b_i·t, lo_i, hi_i) = 1 (b ≥ 0), exactly.

    The sum g(t) is nondecreasing and piecewise linear with breakpoints where a term reaches lo_i
    or hi_i; it is evaluated at every breakpoint, and t is interpolated on the one linear piece
    where g crosses 1. The caller guarantees Σlo ≤ 1 ≤ Σhi.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        knots = np.concatenate([(lo - a) / b, (hi - a) / b], axis=1)
    knots = np.sort(np.where(np.isfinite(knots), knots, np.nan), axis=1)  # NaN (b = 0) sorts last
    valid = np.sum(~np.isnan(knots), axis=1)
    g = np.clip(a[:, None, :] + b[:, None, :] * knots[:, :, None], lo, hi).sum(axis=2)
    below = np.sum(g <= 1.0, axis=1)  # g is nondecreasing: these lead the row
    under = np.sum(g < 1.0, axis=1)
    rows = np.arange(len(a))
    i_lo = np.maximum(below - 1, 0)
    i_hi = np.minimum(under, np.maximum(valid - 1, 0))
    t_lo, t_hi = knots[rows, i_lo], knots[rows, i_hi]
    g_lo, g_hi = g[rows, i_lo], g[rows, i_hi]
    rise = g_hi - g_lo
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(rise > 0, t_lo + (1.0 - g_lo) * (t_hi - t_lo) / rise, t_lo)
    return np.nan_to_num(t)  # a row with no breakpoint at all is constant: any t will do
