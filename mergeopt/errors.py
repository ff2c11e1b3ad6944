"""User-facing errors and interrupts, and the one handler that turns them into a line and an exit code.

A user's mistake (a bad recipe key, a missing file, mismatched checkpoints, a malformed dev set)
must read as one sentence that names the culprit, not as a traceback from deep inside torch.
Library code raises :class:`UserError`; :func:`run_cli` prints it and exits with code 2, and shows
the traceback only under ``--debug``. A SIGINT or SIGTERM that a run caught and saved its state for
arrives as :class:`Interrupted`, and exits with the shell's 128 + N after saying how to continue.
"""

from __future__ import annotations

import difflib
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user can fix: bad input, not a bug in mergeopt."""

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0] if self.args else "").split())


def did_you_mean(typed: str, known: Iterable[str]) -> str:
    """`` (did you mean 'fit'?)`` with the closest of ``known`` to a mistyped name, else ''."""
    close = difflib.get_close_matches(typed, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state is saved. ``exit_code`` follows the shell's 128 + N.

    The command that caught it sets ``hint`` (how to continue) and ``silent`` (a non-zero rank
    under torchrun says nothing, so the message is printed once).
    """

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        self.exit_code = SIGNAL_EXIT.get(signum, 130)
        self.hint = "Rerun the same command to continue."
        self.silent = False
        super().__init__(f"{signal.Signals(signum).name} at {where}")


def _say(line: str) -> None:
    """Write one line to stderr in a single write, newline included: ``print`` writes the text and
    the newline separately, so under torchrun the ranks' lines ran into each other on a shared pipe."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _close_progress_bars() -> None:
    """Close the progress bars a stopped command left open: their line has no newline yet, and
    tqdm would close them at exit, after the last line, which then ran into the bar and was drawn
    over. Closed first, each bar ends its line and the command's last line stands alone."""
    tqdm = sys.modules.get("tqdm.std")  # never imported here just to find no bar
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the interpreter's last flush at exit would
    otherwise print a second error about the same broken pipe (the recipe of Python's signal docs)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def warn(message: str) -> None:
    """One ``mergeopt: warning: ...`` line on stderr: the run goes on (or has finished), but the user
    must hear about something degenerate in it. Under torchrun only rank 0 says it: every rank reads
    the same recipe and inputs, and eight GPUs printed each warning eight times (an error is still
    said by every rank: the rank that found it stops)."""
    if _torchrun_rank() > 0:
        return
    _say("mergeopt: warning: " + " ".join(message.split()))


def _torchrun_rank() -> int:
    """``RANK`` as torchrun sets it (0 outside torchrun; a malformed value is refused at start-up by
    :func:`mergeopt.inputs.environment`, and reads as 0 here)."""
    import os

    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a ``main(argv)`` entry point: a :class:`UserError` is one line on stderr and exit code 2, an
    interrupt is a line and 128 + N, a reader that closed stdout (``| head``) 141 without a line; the
    traceback of a user error shows only with ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return int(main(argv) or 0)
    except BrokenPipeError:  # `mergeopt fit ... | head`: the reader left, as SIGPIPE ends a shell tool
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except UserError as err:
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        _say(f"mergeopt: error: {err}")
        return USER_ERROR_EXIT_CODE
    except Interrupted as stop:
        _close_progress_bars()
        if not stop.silent:
            _say(f"mergeopt: interrupted ({stop}); {stop.hint}")
        return stop.exit_code
    except KeyboardInterrupt:
        _close_progress_bars()
        _say("mergeopt: interrupted")
        return 130
