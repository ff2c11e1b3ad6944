"""What the merged proxy is measured against in every rank report: a free baseline and two that use real runs.

A proxy earns its cost only if it ranks mixtures better than what a team gets without it:

* ``interpolation``: each mixture's score predicted as Σ_i w_i · s(θ_i), the straight line between
  the experts' own scores. It costs nothing beyond the K experts the proxy needs anyway, and it is
  what "mix the experts' numbers" amounts to.
* ``lightgbm_loo``: RegMix's regression (LightGBM on the mixture weights), fitted on the other
  n - 1 real runs of the grid and asked for the held-out one (leave-one-out), with the booster the
  surrogate strategy fits (:func:`mergeopt.search.surrogate.fit_surrogate`, its default settings).
* ``mixing_law_loo``: the Data Mixing Laws form s(w) = c + k · exp(Σ_j t_j w_j) (Ye et al., 2024),
  fitted by scipy's least squares on the other n - 1 runs, leave-one-out.

The two regressions see n - 1 real runs per prediction: they say what the grid's runs alone could
tell, which the proxy must beat to be worth its K experts, and how far (issue 16's calibration joins
the two). Each returns one predicted score per grid mixture, scored by the same rank statistics as
the proxy.

Their fits (one per run, per metric, per regression) are independent, so on a large grid they run
in a pool of processes (``rank.workers``): the same predictions, bit for bit, since every fit is
the same single-threaded computation wherever it runs.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mergeopt.errors import UserError
from mergeopt.runtime import faults

NAMES = ("interpolation", "lightgbm_loo", "mixing_law_loo")
LABELS = {
    "proxy": "merged proxy",
    "interpolation": "interpolation Σ w_i s(θ_i)",
    "lightgbm_loo": "LightGBM, leave-one-out",
    "mixing_law_loo": "mixing law c + k·exp(t·w), leave-one-out",
}
NEEDS = {
    "proxy": "the K experts",
    "interpolation": "the K experts",
    "lightgbm_loo": "n - 1 real runs",
    "mixing_law_loo": "n - 1 real runs",
}


def interpolation(weights: np.ndarray, expert_scores: np.ndarray) -> np.ndarray:
    """Σ_i w_i s(θ_i) for each mixture (rows of ``weights``, n × K) from the K experts' scores."""
    weights = np.asarray(weights, dtype=np.float64)
    expert_scores = np.asarray(expert_scores, dtype=np.float64)
    if expert_scores.shape != (weights.shape[1],):
        raise ValueError(f"{expert_scores.shape[0]} expert scores for {weights.shape[1]} experts")
    return weights @ expert_scores


def leave_one_out(
    weights: np.ndarray,
    truth: np.ndarray,
    fit,
    fitted: Callable[[], object] | None = None,
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """Each run's score predicted by ``fit(weights, truth)`` (which returns a function of w) on the
    others; ``fitted()`` is called after each fit (a progress bar's update). ``rows``: only those
    runs' predictions (a pool's share of the runs)."""
    weights, truth = np.asarray(weights, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    rows = range(len(truth)) if rows is None else rows
    predicted = np.empty(len(rows))
    for j, i in enumerate(rows):
        keep = np.arange(len(truth)) != i
        predicted[j] = fit(weights[keep], truth[keep])(weights[i : i + 1])[0]
        if fitted is not None:
            fitted()
    return predicted


def lightgbm_loo(
    weights: np.ndarray,
    truth: np.ndarray,
    seed: int,
    fitted: Callable[[], object] | None = None,
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """Each run's score predicted by LightGBM fitted on the other runs (the surrogate's settings)."""
    from mergeopt.config import SurrogateSearch
    from mergeopt.search.surrogate import fit_surrogate

    def fit(w: np.ndarray, y: np.ndarray):
        return lambda x: fit_surrogate(w, {"s": y}, SurrogateSearch(), seed).predict(x)["s"]

    return leave_one_out(weights, truth, fit, fitted, rows)


EXPONENT_CLIP = 50.0  # t·w is clipped to ±50 so that exp never overflows while the fit wanders


def mixing_law_start(weights: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(c, k, t) to start from: c one score range below every score, t from a line through log(y - c).

    The line is fitted on the rows scaled to sum to 1. Mixture weights sum to 1, so the intercept
    column equals the sum of the weight columns and the least squares takes the minimum-norm
    solution; rows written to six decimals sum to 1 ± 1e-6 instead, which made the design barely
    regular and its intercept about 1e6 (exp overflowed). The exponent is clipped like the law's.
    """
    c = float(y.min()) - max(float(np.ptp(y)), 1e-6)
    on_simplex = weights / weights.sum(axis=1, keepdims=True)
    design = np.column_stack([np.ones(len(y)), on_simplex])
    coef, *_ = np.linalg.lstsq(design, np.log(y - c), rcond=None)
    scale = math.exp(min(max(float(coef[0]), -EXPONENT_CLIP), EXPONENT_CLIP))
    return np.concatenate([[c, scale], coef[1:]])


def mixing_law(params: np.ndarray, w: np.ndarray) -> np.ndarray:
    """c + k·exp(t·w) for each row of ``w``, with params = (c, k, t_1, …, t_K)."""
    return params[0] + params[1] * np.exp(np.clip(w @ params[2:], -EXPONENT_CLIP, EXPONENT_CLIP))


def mixing_law_jacobian(params: np.ndarray, w: np.ndarray) -> np.ndarray:
    """∂/∂(c, k, t) of :func:`mixing_law` at each row of ``w`` (n × (K + 2)): 1, exp(t·w) and
    k·exp(t·w)·w_j, with 0 for t where t·w is clipped (the clipped law does not move with t there).

    Given to the least squares in place of finite differences, which cost K + 2 evaluations of the
    law per iteration: the leave-one-out took 1.6 to 1.8 times less time on the tiny grid and 2.3 to 2.6 times
    less on 64 RegMix runs over 17 domains, its predictions within 4e-5 of the finite differences'
    and ranked alike (benchmarks/results/baselines.md)."""
    exponent = w @ params[2:]
    scale = np.exp(np.clip(exponent, -EXPONENT_CLIP, EXPONENT_CLIP))
    inside = np.abs(exponent) < EXPONENT_CLIP
    return np.column_stack([np.ones(len(w)), scale, (params[1] * scale * inside)[:, None] * w])


def fit_mixing_law(weights: np.ndarray, y: np.ndarray):
    """The least-squares c + k·exp(t·w) through (weights, y); returns the fitted function of w.

    Started from a line through log(y - c) with c below every score; the signs of t let a score fall
    or rise with each weight, and the least squares may cross k = 0 where a score is concave in w.
    """
    from scipy.optimize import least_squares

    weights, y = np.asarray(weights, dtype=np.float64), np.asarray(y, dtype=np.float64)
    start = mixing_law_start(weights, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fitted = least_squares(
            lambda p: mixing_law(p, weights) - y,
            start,
            jac=lambda p: mixing_law_jacobian(p, weights),
            method="trf",
            max_nfev=2000,
        )
    params = fitted.x
    return lambda w: mixing_law(params, np.atleast_2d(np.asarray(w, dtype=np.float64)))


def mixing_law_loo(
    weights: np.ndarray,
    truth: np.ndarray,
    fitted: Callable[[], object] | None = None,
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """Each run's score predicted by the mixing law fitted on the other runs."""
    return leave_one_out(weights, truth, fit_mixing_law, fitted, rows)


def _loo_share(name: str, weights: np.ndarray, truth: np.ndarray, seed: int, rows: list[int]) -> np.ndarray:
    """One pool task: regression ``name``'s leave-one-out predictions of ``rows``."""
    if name == "lightgbm_loo":
        return lightgbm_loo(weights, truth, seed, rows=rows)
    return mixing_law_loo(weights, truth, rows=rows)


# A pool's start (a fork server importing scipy, LightGBM and mergeopt's search, about 3 s) pays once
# the fits are long enough: each costs about what its runs x experts cost. Measured on 2 CPUs
# (benchmarks/results/baselines.md): the tiny grid's report, 200 fits x 20 runs x 4 experts =
# 16,000, took 5.0 s here and 0.68x as long in a pool (0.85x in an earlier run); RegMix's 256 fits x
# 64 runs x 17 domains = 278,528 ran 2.1x faster in one (1.5x earlier), 1,024 fits 1.8x (2.0x).
POOL_MIN_WORK = 100_000
# what each worker needs, imported once by the fork server rather than by every worker
PRELOAD = ["mergeopt.evaluation.baselines", "mergeopt.search.surrogate", "scipy.optimize", "lightgbm"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it), shared with the other
    ranks on its node under torchrun (``LOCAL_WORLD_SIZE``): each rank makes the same fits."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cpus // ranks)


def _main_is_safe() -> bool:
    """Whether new worker processes can start here without running the caller's script again: a
    worker imports the main module (Python's spawn and forkserver do), which is harmless for
    mergeopt's own command, a notebook or the REPL, but reruns a script without
    ``if __name__ == "__main__":``."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__file__", None) is None:
        return True
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("mergeopt"):
        return True
    return Path(main.__file__).name == "mergeopt"


def loo_workers(requested: int | None, fits: int, runs: int, experts: int) -> int:
    """Processes for ``fits`` leave-one-out fits on ``runs`` runs of ``experts`` weights each:
    ``requested`` (``rank.workers``), or by default the usable CPUs once fits x runs x experts
    reaches :data:`POOL_MIN_WORK` and workers can start safely (:func:`_main_is_safe`), else one."""
    if requested is not None:
        return max(1, min(requested, fits))
    if fits * runs * experts < POOL_MIN_WORK or not _main_is_safe():
        return 1
    return min(usable_cpus(), fits)


def _pooled(
    jobs: list[tuple[str, str]],
    weights: np.ndarray,
    truths: Mapping[str, np.ndarray],
    seed: int,
    workers: int,
    fitted: Callable[[int], object],
) -> dict[tuple[str, str], np.ndarray]:
    """Every (regression, metric) job's predictions, its runs split into shares over ``workers``
    processes. They come from a fork server (spawned elsewhere), never forked from this process:
    LightGBM's OpenMP runtime hangs in a child forked after the parent used it. ``fitted(n)`` is
    called as a share of ``n`` fits comes back; the workers ignore SIGINT (a Ctrl-C reaches the
    terminal's whole process group): this process decides, stopping them when it is interrupted.
    """
    n = len(weights)
    per = max(1, math.ceil(len(jobs) * n / (4 * workers)))  # about four shares per worker
    shares = [(job, list(range(start, min(start + per, n)))) for job in jobs for start in range(0, n, per)]
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
    else:
        context = multiprocessing.get_context("spawn")
    from mergeopt.runtime.interrupts import check_interrupt_alone  # torch: not on this module's import

    out = {job: np.empty(n) for job in jobs}
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint) as pool:
            futures = {}
            try:
                # the fork server and the workers start here; a Ctrl-C meanwhile is raised as the
                # block ends (by a handler that raises): inside this try, so the workers are stopped
                with _sigint_held():
                    for (name, metric), rows in shares:
                        future = pool.submit(_loo_share, name, weights, truths[metric], seed, rows)
                        futures[future] = ((name, metric), rows)
                pending = set(futures)
                while pending:  # every half second: a signal to this process is honoured between shares
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        job, rows = futures[future]
                        out[job][rows] = future.result()
                        fitted(len(rows))
                    check_interrupt_alone(STOPPED_AT)
            except BaseException:  # stopped (a signal): the shares left are not waited for
                _stop_workers(pool)
                raise
    except (BrokenProcessPool, EOFError) as err:  # EOFError: the fork server died as it started
        # a Ctrl-C reaches the fork server too, which dies of it while it imports PRELOAD (about 3 s)
        check_interrupt_alone(STOPPED_AT)
        raise UserError(
            "the baselines' leave-one-out workers stopped before their fits were done (killed, or a "
            'script that calls mergeopt without `if __name__ == "__main__":`); set rank.workers: 1 to '
            "fit them in this process"
        ) from err
    return out


STOPPED_AT = "the baselines' leave-one-out fits"


def _ignore_sigint() -> None:
    """A pool worker's start: SIGINT (a Ctrl-C sent to the whole process group) is the parent's to
    honour; a worker raising KeyboardInterrupt mid-fit ended the command without saying where its
    state is."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _sigint_held():
    """SIGINT blocked in this thread while the pool's processes start, so that they start with it
    blocked: the fork server imports :data:`PRELOAD` (about 3 s) before it ignores SIGINT, and a
    Ctrl-C then (sent to the terminal's whole process group) printed its KeyboardInterrupt
    traceback under the command's one line. A Ctrl-C meanwhile waits, and reaches this process
    when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no fork server either
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the shares not started and end the workers, so a stopped command does not first wait
    for the fits under way (a share is a quarter of a worker's fits: minutes on a large grid)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def skipped(n: int, k: int) -> dict[str, str]:
    """The baselines a grid of ``n`` runs over ``k`` experts cannot support, with the reason."""
    out = {}
    if n - 1 < k + 2:
        out["mixing_law_loo"] = f"{n - 1} runs per fit, fewer than its {k + 2} parameters"
    from mergeopt.config import SurrogateSearch

    split = 2 * SurrogateSearch().min_child_samples  # fewer rows than that: no tree can split
    if n - 1 < split:  # the other runs' mean, (S - y_i)/(n - 1): Spearman exactly -1, whatever the runs
        out["lightgbm_loo"] = (
            f"{n - 1} run{'s' if n - 1 != 1 else ''} per fit, fewer than the {split} a LightGBM split needs "
            f"(2 x min_child_samples): each prediction would be the mean of the other runs, which ranks "
            "them exactly against the truth"
        )
    return out


def baseline_predictions(
    weights: np.ndarray,
    truths: Mapping[str, np.ndarray],
    expert_scores: Mapping[str, np.ndarray],
    seed: int,
    progress: bool = False,
    asked: Sequence[str] = NAMES,
    workers: int | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """({baseline: {metric: predicted score per grid row}}, {baseline: why it was skipped}).

    ``truths`` and ``expert_scores`` are keyed by metric: the grid's true scores (n per metric) and
    the K experts' own scores (the proxy at each one-hot mixture). ``asked`` names the baselines to
    compute (the recipe's rank.baselines); the others are skipped, saying so. ``progress`` shows a
    bar over the regressions' fits (one per run and metric each: minutes on a large grid).
    ``workers`` (``rank.workers``): processes for those fits (:func:`loo_workers`); the predictions
    are the same with any number.
    """
    from tqdm.auto import tqdm

    from mergeopt.runtime.interrupts import check_interrupt_alone  # torch: not on this module's import

    weights = np.asarray(weights, dtype=np.float64)
    left_out = {name: why for name, why in skipped(len(weights), weights.shape[1]).items() if name in asked}
    left_out.update({name: "left out by rank.baselines" for name in NAMES if name not in asked})
    predictions: dict[str, dict[str, np.ndarray]] = {}
    if "interpolation" not in left_out:
        predictions["interpolation"] = {m: interpolation(weights, expert_scores[m]) for m in truths}
    regressions = [name for name in ("lightgbm_loo", "mixing_law_loo") if name not in left_out]
    total = len(regressions) * len(truths) * len(weights)
    workers = loo_workers(workers, total, *weights.shape) if total else 1
    with tqdm(
        total=total, desc="baselines, leave-one-out", unit="fit", disable=not progress or not total
    ) as bar:
        made = 0

        def fitted(count: int = 1) -> None:
            """After each fit: the bar, and a SIGINT/SIGTERM honoured (a single process; minutes on a
            large grid, which a Ctrl-C waited out before the command published as if not asked to stop)."""
            nonlocal made
            bar.update(count)
            for _ in range(count):
                made += 1
                faults.reached("baseline", made)  # tests only (MERGEOPT_FAULT)
            check_interrupt_alone(STOPPED_AT)

        if workers > 1:
            jobs = [(name, metric) for name in regressions for metric in truths]
            pooled = _pooled(jobs, weights, truths, seed, workers, fitted)
            for (name, metric), predicted in pooled.items():
                predictions.setdefault(name, {})[metric] = predicted
            return predictions, left_out
        if "lightgbm_loo" in regressions:
            predictions["lightgbm_loo"] = {
                m: lightgbm_loo(weights, y, seed, fitted) for m, y in truths.items()
            }
        if "mixing_law_loo" in regressions:
            predictions["mixing_law_loo"] = {m: mixing_law_loo(weights, y, fitted) for m, y in truths.items()}
    return predictions, left_out
