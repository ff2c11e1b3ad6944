"""Fault injection: a run that signals itself at a named point, so resume tests never race a clock.

A test that kills a fit "after a while" passes or fails with the machine's speed: on a fast one the
fit ends before the kill lands, on a slow one the kill lands before the first checkpoint. So the
tests name the moment instead, in the environment of the process they start:

    MERGEOPT_FAULT=sigkill@step:3          the gradient strategy, at the end of step 3
                                           (before that step's checkpoint, if one is due)
    MERGEOPT_FAULT=sigterm@evaluation:5    a zero-order search, as its 5th evaluation starts
    MERGEOPT_FAULT=sigterm@closing:2       a fit, as its 2nd closing evaluation starts (the uniform mixture)
    MERGEOPT_FAULT=sigint@train.beta:7     `mergeopt train`, run "beta", at the end of step 7
    MERGEOPT_FAULT=sigstop@step:3          stops there, holding what it holds (a test's second
                                           process meets its lock), until SIGCONT or SIGKILL
    MERGEOPT_FAULT=sigint@world:2          a tiny world's build, at the end of a training step 2
    MERGEOPT_FAULT=sigint@baseline:3       a rank check, after its baselines' 3rd leave-one-out fit

The process sends itself the signal with ``os.kill``: SIGKILL ends it on the spot, as ``kill -9``
does; SIGTERM and SIGINT go through the same handler a real signal does (:mod:`mergeopt.runtime.interrupts`).
Under torchrun every rank reaches the same point and signals itself. Unset (always, for users),
:func:`reached` costs one environment lookup.
"""

from __future__ import annotations

import os
import re
import signal

from mergeopt.errors import UserError

VARIABLE = "MERGEOPT_FAULT"
SIGNALS = {
    "sigkill": signal.SIGKILL,
    "sigterm": signal.SIGTERM,
    "sigint": signal.SIGINT,
    "sigstop": signal.SIGSTOP,
}
_SPEC = re.compile(r"(?P<signal>sig[a-z]+)@(?P<point>[A-Za-z0-9_.\-]+):(?P<index>\d+)")


def parse(spec: str) -> tuple[int, str, int]:
    """``"sigkill@step:3"`` -> (SIGKILL, "step", 3); a malformed value is a one-line error."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match["signal"] not in SIGNALS:
        raise UserError(
            f"{VARIABLE}={spec!r} is not SIGNAL@POINT:N with SIGNAL one of {', '.join(SIGNALS)} "
            "(e.g. sigkill@step:3)"
        )
    return SIGNALS[match["signal"]], match["point"], int(match["index"])


def reached(point: str, index: int) -> None:
    """Called by a loop at ``point`` number ``index``; signals this process if the fault names it."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    signum, at, n = parse(spec)
    if at == point and n == index:
        os.kill(os.getpid(), signum)
