"""SIGINT and SIGTERM as a flag the loops check, so a fit, a training run or an export stops where its
state is consistent instead of wherever the signal lands.

:func:`interruptible` turns the signals into a flag (a second one stops at once); the loops call
:func:`check_interrupt` between steps or evaluations, where the state is saved and
:class:`~mergeopt.errors.Interrupted` ends the run with a message saying how to continue
(:func:`saying_where_saved`). Under torchrun the ranks agree on the flag before they stop
(:func:`check_interrupt_together`, :func:`stop_if_any_rank_interrupted`): a rank that stopped alone
left the others waiting in a collective. What is saved, and how a run resumes from it, is
:mod:`mergeopt.runtime.resume`'s.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mergeopt.errors import SIGNAL_EXIT, Interrupted
from mergeopt.runtime import distributed

_pending: list[int] = []  # signals received inside interruptible(), oldest first


def pending_interrupt() -> bool:
    return bool(_pending)


def pending_signal() -> int | None:
    """The first signal received (None when none has)."""
    return _pending[0] if _pending else None


def check_interrupt(where: str) -> None:
    """Raise :class:`Interrupted` if a signal arrived; loops call this where state is consistent."""
    if _pending:
        raise Interrupted(_pending[0], where)


def check_interrupt_together() -> bool:
    """Whether any rank received a signal, agreed by every rank at this point (one all-reduce of one
    number; a single process reads its own flag). The gradient loop calls it between steps, saves,
    then :func:`stop_together`: with each rank reading its own flag, a signal that reached one rank
    just after its check stopped the other alone, which then saved nothing or waited for it."""
    flag = torch.tensor([1.0 if _pending else 0.0], dtype=torch.float64)
    return bool(distributed.all_reduce_sum(flag).item() > 0)


def stop_together(where: str) -> None:
    """Raise :class:`Interrupted` on every rank after :func:`check_interrupt_together` said so, with
    the rank's own signal (SIGTERM on a rank that received none), once every rank is here: rank 0
    saves the state before it comes, and a rank that left first ended the job (torchrun's agent
    stops the others when one exits), so rank 0 received a second signal halfway through the save."""
    distributed.all_reduce_sum(torch.zeros(1, dtype=torch.float64))  # every rank waits for rank 0's save
    raise Interrupted(_pending[0] if _pending else signal.SIGTERM, where)


def stop_if_any_rank_interrupted(where: str) -> None:
    """Before a step every rank makes alike (a real zero-order evaluation, a closing evaluation): all
    raise :class:`Interrupted` if any received a signal (one all-reduce; a single process reads its
    own flag). A rank reading its own flag alone left while the others went on into the step's
    collectives and waited for it."""
    if check_interrupt_together():
        stop_together(where)


def check_interrupt_alone(where: str) -> None:
    """:func:`check_interrupt` in a single process: long loops inside one step (stacking, one
    evaluation's batches) stop within a second. Under torchrun the ranks must stop together, at the
    points where they already agree (between steps and evaluations), so there it does nothing, also
    while a rank scores a mixture alone (:func:`~mergeopt.runtime.distributed.this_rank_only`): the
    ranks then agree after the round; stopped halfway, its evaluation was a RuntimeError on every rank."""
    if distributed.process_rank_and_size()[1] == 1:
        check_interrupt(where)


@contextmanager
def _handling(handler) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block, the previous handlers restored after.
    Signal handlers belong to the main thread: elsewhere the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNAL_EXIT}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT/SIGTERM set a flag inside the block (the main thread only); a second one interrupts at once."""

    def handler(signum, _frame):
        if _pending:  # the second signal: stop now
            raise KeyboardInterrupt
        _pending.append(signum)

    try:
        with _handling(handler):
            yield
    finally:
        if threading.current_thread() is threading.main_thread():  # the flag is the main thread's
            _pending.clear()


@contextmanager
def interrupts_at_once(where: str) -> Iterator[None]:
    """Inside, SIGINT/SIGTERM raise :class:`Interrupted` at once instead of setting the flag.

    For one long library call that has no loop of ours to check the flag in (transformers
    dequantising a GGUF file takes most of a minute) and whose partial work is thrown away anyway
    (it writes into a staging directory): waiting for it to return would ignore Ctrl-C for that long.
    """
    check_interrupt(where)  # a signal that came before the block

    def handler(signum, _frame):
        _pending.append(signum)
        raise Interrupted(signum, where)

    with _handling(handler):
        yield


@contextmanager
def saying_where_saved(
    directory: Path, advice: str = "Rerun the same command to continue."
) -> Iterator[None]:
    """An :class:`Interrupted` raised inside says where the state is saved and how to go on
    (rank 0 only, under torchrun)."""
    try:
        yield
    except Interrupted as stop:
        if Path(directory).is_dir():
            stop.hint = f"the state is saved in {directory}. {advice}"
        else:  # stopped before it had anything worth resuming (a world build, loading, stacking)
            stop.hint = "nothing was saved yet. Rerun the same command to start again."
        stop.silent = not distributed.is_main()
        raise
