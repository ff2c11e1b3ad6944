"""The one door every zero-order strategy goes through to score a mixture: cache, budget, log.

A real evaluation of a mixture w is a full dev-set evaluation of the merged model (seconds to
minutes), so it must never happen twice and never beyond the budget the user set. The
:class:`Evaluator` caches the *scores* of each w (not the scalar value: the value function can
change after the K single experts are scored, for min-max normalisation), counts real evaluations
against the budget, raises :class:`BudgetExhausted` when a new one would exceed it (strategies
catch it and stop cleanly), and logs every real evaluation in order for trace.csv. Strategies
return a :class:`SearchResult` built from it, so every strategy reports the best w that was really
evaluated, never a prediction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from mergeopt.config.objective import RESERVED_COLUMNS
from mergeopt.errors import Interrupted, UserError
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.groups import Groups
from mergeopt.merging.simplex import SIMPLEX_TOLERANCE
from mergeopt.runtime import distributed, faults
from mergeopt.runtime.interrupts import pending_interrupt, stop_if_any_rank_interrupted, stop_together

ScoreFn = Callable[[np.ndarray], Mapping[str, float]]
ValueFn = Callable[[Mapping[str, float]], float]

ROUND_DECIMALS = 12  # two mixtures equal to 12 decimals are one mixture for the cache
ALL_PROCESSES = -1  # an evaluation whose data every rank shared


class BudgetExhausted(Exception):
    """A new real evaluation was asked for with no budget left; strategies stop on it."""


class NonFiniteScore(UserError):
    """A real evaluation gave a NaN or infinite score. A fit's search stops on it and keeps the best
    finite mixture (:func:`mergeopt.search.zero_order.run_search`); anywhere else it is a user error.
    ``record`` is what mixture.json says about it."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


@dataclass
class SearchResult:
    """The best really evaluated mixture of a search, with the log of every real evaluation."""

    names: tuple[str, ...]
    weights: np.ndarray
    value: float
    scores: dict[str, float]
    evaluations: int  # real evaluations in the log (earlier ones, e.g. the K experts, included)
    log: list[dict]
    info: dict = field(default_factory=dict)

    def mixture(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, self.weights)}


class Evaluator:
    """Scores mixtures through a cache keyed by (key, w rounded to 12 decimals), within a budget.

    ``budget`` counts real evaluations over the evaluator's whole life (cache hits are free);
    ``None`` means unlimited. ``key`` separates cache entries
    of different objectives sharing one ``cache`` dict (e.g. the merge-method description).
    Strategies run inside :meth:`running`, which adds their own cap and a progress bar.
    """

    def __init__(
        self,
        names: Sequence[str],
        score: ScoreFn,
        value: ValueFn,
        budget: int | None = None,
        key: str = "",
        progress: bool = False,
        cache: dict | None = None,
        journal: Callable[[dict], None] | None = None,
        replay: Sequence[dict] = (),
        together: bool = False,
        observe: Callable[[dict], None] | None = None,
        feasible: FeasibleSet | None = None,
        groups: Groups | None = None,
    ):
        self.names = tuple(names)
        # the recipe's constraints (None: the whole simplex): strategies draw their candidates from
        # it, and the result is the best feasible mixture (the experts a normalisation scores are not)
        self.feasible = feasible
        self.groups = groups  # a hierarchical mixture's groups: the Dirichlet strategies draw by them
        self.score_fn = score
        self.value_fn = value
        self.budget = budget
        self.key = key
        self.progress = progress
        self.cache: dict = {} if cache is None else cache
        self._log: list[dict] = []  # real evaluations: phase, w, scores, seconds
        self._seen: dict = {}  # every mixture this evaluator answered, in order: cache key -> (w, scores)
        self._bar = None
        self._strategy_cap: int | None = None
        self.journal = journal  # called with each real evaluation as it happens (the checkpoint)
        # called before the journal with each new (not replayed) evaluation's row, as rows() makes
        # it, its value left out while the value function waits for the experts (experiment trackers)
        self.observe = observe
        self._replay = list(replay)  # a resumed run's logged evaluations, answered in order
        self.replayed = 0
        # torchrun with a sharded stack: every rank takes part in scoring each mixture (its layers
        # gather across the ranks), on its share of the data, instead of the ranks splitting a batch
        self.together = together

    # -- budget -------------------------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        return len(self._log)

    @property
    def cap(self) -> int | None:
        """The cap on real evaluations in force: the evaluator's budget and the running strategy's."""
        caps = [c for c in (self.budget, self._strategy_cap) if c is not None]
        return min(caps) if caps else None

    @property
    def remaining(self) -> int | None:
        cap = self.cap
        return None if cap is None else max(0, cap - self.evaluations)

    # -- evaluation ---------------------------------------------------------------------------
    def cache_key(self, w: np.ndarray) -> tuple:
        return (self.key, tuple(np.round(np.asarray(w, dtype=np.float64), ROUND_DECIMALS).tolist()))

    def is_cached(self, w: np.ndarray) -> bool:
        return self.cache_key(w) in self.cache

    def uncached(self, points: Sequence[np.ndarray]) -> int:
        """How many distinct mixtures among ``points`` a real evaluation is still needed for."""
        return len({self.cache_key(w) for w in points} - set(self.cache))

    def scores(self, w: np.ndarray, phase: str) -> dict[str, float]:
        """The per-term scores at w: from the cache, or one real evaluation logged under ``phase``."""
        w = self._check_simplex(w)
        key = self.cache_key(w)
        real = key not in self.cache
        if not real:
            scores = self.cache[key]
        else:
            if self.remaining == 0:
                raise BudgetExhausted(f"budget of {self.cap} evaluations used up")
            replayed = self._from_replay(w, phase)
            if replayed is not None:
                scores, seconds, process = replayed
            else:
                faults.reached("evaluation", self.evaluations + 1)  # tests only (MERGEOPT_FAULT)
                stop_if_any_rank_interrupted(f"evaluation {self.evaluations + 1}")
                start = time.perf_counter()
                scores = self._checked(self._score(w), w)
                seconds = time.perf_counter() - start
                # one evaluation outside a batch: under torchrun every rank scores a share of its data
                process = ALL_PROCESSES if distributed.rank_and_size()[1] > 1 else 0
            self._record(key, w, phase, scores, seconds, process, fresh=replayed is None)
        if key not in self._seen:
            self._seen[key] = (w, scores)
        if real:
            self._advance_bar()
        return dict(scores)

    def prefetch(self, mixtures: Sequence[np.ndarray], phase: str | Sequence[str]) -> int:
        """Really evaluate, as one batch, the mixtures not cached yet (in order, up to the budget).

        Strategies call this with the mixtures they are about to ask for one by one (a grid, a
        CMA-ES generation); the calls that follow are cache hits, so a strategy reads the same
        with or without it. The batch is what several processes share: under torchrun each rank
        scores every world-size-th mixture on the whole dev set and the ranks exchange the
        scores, so each evaluation runs on one rank. The log keeps the batch's order either way.
        ``phase`` labels the log rows: one label, or one per mixture. Returns the number of real
        evaluations made.
        """
        phases = [phase] * len(mixtures) if isinstance(phase, str) else list(phase)
        todo, labels, keys = [], [], set()
        for w, label in zip(mixtures, phases, strict=True):
            w = self._check_simplex(w)
            key = self.cache_key(w)
            if key not in self.cache and key not in keys:
                keys.add(key)
                todo.append(w)
                labels.append(label)
        if self.remaining is not None:
            todo = todo[: self.remaining]
        replayed = []
        while todo and (answer := self._from_replay(todo[0], labels[0])) is not None:
            replayed.append((todo.pop(0), labels.pop(0), *answer))
        for w, phase, scores, seconds, process in replayed:
            self._record(self.cache_key(w), w, phase, scores, seconds, process, fresh=False)
            self._seen.setdefault(self.cache_key(w), (w, scores))
            self._advance_bar()
        if todo:
            stop_if_any_rank_interrupted(f"evaluation {self.evaluations + 1}")
        for (w, scores, seconds, process), phase in zip(self._score_batch(todo), labels):
            key = self.cache_key(w)
            self._record(key, w, phase, scores, seconds, process, fresh=True)
            self._seen.setdefault(key, (w, scores))
            self._advance_bar()
        return len(replayed) + len(todo)

    def _from_replay(self, w: np.ndarray, phase: str) -> tuple[dict[str, float], float, int] | None:
        """The logged answer to the next request of a resumed run (None when the log is used up)."""
        if not self._replay:
            return None
        entry = self._replay[0]
        if (
            self.cache_key(np.asarray(entry["w"], dtype=np.float64)) != self.cache_key(w)
            or entry["phase"] != phase
        ):
            raise UserError(
                f"the checkpoint's evaluation {self.evaluations + 1} ({entry['phase']} at {entry['w']}) is not what "
                f"this run asks for ({phase} at {w.tolist()}): the run is not the one checkpointed; pass --restart"
            )
        self._replay.pop(0)
        self.replayed += 1
        scores = {str(k): float(v) for k, v in entry["scores"].items()}
        return scores, float(entry["seconds"]), int(entry.get("process", 0))

    def _record(
        self, key, w: np.ndarray, phase: str, scores: dict, seconds: float, process: int, fresh: bool
    ) -> None:
        self.cache[key] = scores
        entry = {"phase": phase, "w": w, "scores": scores, "seconds": seconds, "process": process}
        self._log.append(entry)
        if fresh and self.observe is not None:
            row = self._row(len(self._log) - 1, entry)
            with suppress(RuntimeError):  # normalised over the experts, not all scored yet
                row["value"] = float(self.value_fn(scores))
            self.observe(row)
        if fresh and self.journal is not None:
            self.journal({**entry, "w": w.tolist()})

    def per_process(self, processes: int) -> list[int]:
        """Real evaluations each process scored (an evaluation split over every rank counts for each).

        A run resumed on fewer ranks replays evaluations that a rank it no longer has scored: the
        list is as long as the largest rank of any attempt (it raised IndexError at the end of the
        search, at every rerun)."""
        ranks = [entry["process"] for entry in self._log if entry["process"] != ALL_PROCESSES]
        counts = [0] * max([processes, *(rank + 1 for rank in ranks)])
        for entry in self._log:
            for rank in range(processes) if entry["process"] == ALL_PROCESSES else [entry["process"]]:
                counts[rank] += 1
        return counts

    def _score_batch(
        self, todo: list[np.ndarray]
    ) -> Iterator[tuple[np.ndarray, dict[str, float], float, int]]:
        """(w, scores, seconds, process) of each mixture in order, as they are scored.

        The candidates are dealt out in rounds of one per rank; after each round the ranks exchange
        the scores (and whether a signal arrived), so every rank records, journals and stops at the
        same point. With one process a round is one candidate.
        """
        rank, size = distributed.rank_and_size()
        if self.together and size > 1:
            yield from self._score_together(todo)
            return
        for first in range(0, len(todo), size):
            chunk = todo[first : first + size]
            # tests only (MERGEOPT_FAULT): each evaluation of the round is a fault point, or with 3
            # ranks sigterm@evaluation:5 never fired (the rounds start at evaluations 1, 4, 7, ...)
            for index in range(self.evaluations + 1, self.evaluations + 1 + len(chunk)):
                faults.reached("evaluation", index)
            mine = None
            if rank < len(chunk):
                start = time.perf_counter()
                try:
                    with distributed.this_rank_only():
                        mine = ("ok", dict(self._score(chunk[rank])), time.perf_counter() - start)
                except Exception as err:  # re-raised on every rank below, so none waits forever
                    if size == 1:
                        raise
                    mine = ("error", err if isinstance(err, UserError) else RuntimeError(repr(err)))
            gathered = distributed.all_gather_objects((mine, pending_interrupt()))
            for result, _ in gathered[: len(chunk)]:
                if result[0] == "error":
                    raise result[1]
            for j, w in enumerate(chunk):
                result = gathered[j][0]
                yield w, self._checked(result[1], w), result[2], j
            if any(flag for _, flag in gathered):
                # every rank stops here, whichever of them received the signal, once rank 0 has
                # journaled the round (its caller records each score before asking for the next)
                stop_together(f"evaluation {self.evaluations}")

    def _score_together(
        self, todo: list[np.ndarray]
    ) -> Iterator[tuple[np.ndarray, dict[str, float], float, int]]:
        """Each mixture scored by every rank at once, on its share of the data (the scores are
        already the whole data's: the ranks add up their sums inside; a metric term is scored by
        every rank on all its records). After each the ranks exchange their scores and whether a
        signal arrived: all record rank 0's scores (a generation could round differently on
        another rank) and all stop at the same mixture."""
        for w in todo:
            faults.reached("evaluation", self.evaluations + 1)  # tests only (MERGEOPT_FAULT)
            start = time.perf_counter()
            scores = self._checked(dict(self.score_fn(w.copy())), w)
            gathered = distributed.all_gather_objects((scores, pending_interrupt()))
            yield w, gathered[0][0], time.perf_counter() - start, ALL_PROCESSES
            if any(flag for _, flag in gathered):
                stop_together(f"evaluation {self.evaluations}")

    def _score(self, w: np.ndarray) -> Mapping[str, float]:
        """One real evaluation; a signal that stops it halfway (its batches check, in a single
        process) is reported as this evaluation's number, and nothing of it is recorded."""
        try:
            return self.score_fn(w.copy())
        except Interrupted as stop:
            raise Interrupted(stop.signum, f"evaluation {self.evaluations + 1}") from None

    def __call__(self, w: np.ndarray, phase: str = "") -> float:
        """The value (lower is better) at w under the current value function."""
        return self.value(self.scores(w, phase))

    def value(self, scores: Mapping[str, float]) -> float:
        value = float(self.value_fn(scores))
        if not math.isfinite(value):
            raise UserError(f"the objective value is {value} for scores {dict(scores)}")
        return value

    def set_value(self, value: ValueFn) -> None:
        """Replace the value function (e.g. once the K experts fix a min-max normalisation)."""
        self.value_fn = value

    # -- results ------------------------------------------------------------------------------
    def best(self) -> tuple[np.ndarray, float, dict[str, float]]:
        """The best mixture answered so far under the current value function (first one on ties);
        under constraints the best feasible one."""
        best = None
        for w, scores in self._seen.values():
            if self.feasible is not None and not self.feasible.contains(w):
                continue  # e.g. an expert scored for a normalisation, outside the bounds
            value = self.value(scores)
            if best is None or value < best[1]:
                best = (w.copy(), value, dict(scores))
        if best is None:
            raise RuntimeError(f"no {'feasible ' if self._seen else ''}mixture has been evaluated yet")
        return best

    def seen(self) -> list[tuple[np.ndarray, dict[str, float]]]:
        """Every mixture answered so far (really evaluated or found in a shared cache), in order."""
        return [(w.copy(), dict(scores)) for w, scores in self._seen.values()]

    def rows(self) -> list[dict]:
        """One row per real evaluation, values from the current value function: the trace."""
        rows = []
        for i, entry in enumerate(self._log):
            row = self._row(i, entry)
            row["value"] = self.value(entry["scores"])
            row["seconds"] = entry["seconds"]
            rows.append(row)
        return rows

    def _row(self, index: int, entry: dict) -> dict:
        row = {"index": index, "phase": entry["phase"]}
        row.update({f"w_{n}": float(v) for n, v in zip(self.names, entry["w"])})
        row.update(entry["scores"])
        return row

    def result(self, info: dict | None = None) -> SearchResult:
        w, value, scores = self.best()
        log = self.rows()
        return SearchResult(self.names, w, value, scores, len(log), log, dict(info or {}))

    # -- a strategy's run ----------------------------------------------------------------------
    @contextmanager
    def running(
        self, desc: str, budget: int | None, own: int | None, progress: bool | None = None
    ) -> Iterator[int | None]:
        """Cap the evaluations of one strategy run, show its progress bar; yields the evaluations left.

        ``budget`` (search.budget) counts every real evaluation, those made before the strategy
        (e.g. the K experts) too; without one the strategy may make ``own`` more (None: no cap).
        The evaluator's own budget, if tighter, still holds. The cap ends with the run. The bar
        (shown if ``progress``; None: the evaluator's flag) advances on each real evaluation and
        shows the best value so far.
        """
        self._strategy_cap = (
            budget if budget is not None else (None if own is None else self.evaluations + own)
        )
        remaining = self.remaining
        total = remaining if own is None else own if remaining is None else min(own, remaining)
        self._bar = tqdm(
            total=total, desc=desc, unit="eval", disable=not (self.progress if progress is None else progress)
        )
        try:
            yield remaining
        finally:
            self._bar.close()
            self._bar, self._strategy_cap = None, None

    def _advance_bar(self) -> None:
        if self._bar is None or self._bar.disable:
            return
        self._bar.update(1)
        with suppress(RuntimeError):  # nothing feasible scored yet (the experts of a normalisation)
            self._bar.set_postfix(best=f"{self.best()[1]:.5g}", refresh=False)

    # -- checks -------------------------------------------------------------------------------
    def _check_simplex(self, w: np.ndarray) -> np.ndarray:
        w = np.array(w, dtype=np.float64).reshape(-1)
        if w.shape != (len(self.names),):
            raise ValueError(f"a mixture needs {len(self.names)} weights, got shape {w.shape}")
        if not (np.all(w >= 0) and abs(float(w.sum()) - 1.0) <= SIMPLEX_TOLERANCE):
            raise ValueError(
                f"mixture {w.tolist()} is not on the simplex (w ≥ 0, Σw = 1 ± {SIMPLEX_TOLERANCE:g})"
            )
        return w

    def _checked(self, scores: Mapping[str, float], w: np.ndarray) -> dict[str, float]:
        mixture = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, w))
        checked = {}
        for name, raw in scores.items():
            if name in RESERVED_COLUMNS or name.startswith("w_"):
                raise ValueError(f"score name {name!r} collides with a trace column")
            value = float(raw)
            if not math.isfinite(value):
                record = {
                    "evaluation": self.evaluations + 1,
                    "score": str(name),
                    "value": str(value),
                    "weights": {n: float(v) for n, v in zip(self.names, w)},
                }
                raise NonFiniteScore(f"score {name!r} is {value} at w = ({mixture})", record)
            checked[str(name)] = value
        return checked
