"""User-facing errors and the command-line wrapper that turns them into one line and exit code 2.

A user's mistake (a bad recipe key, a missing file, mismatched checkpoints, a malformed dev set)
must read as one sentence that names the culprit, not as a traceback from deep inside torch.
Library code raises :class:`UserError`; :func:`run_cli` prints it and exits with code 2, and shows
the traceback only under ``--debug``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user can fix: bad input, not a bug in mergeopt."""

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0] if self.args else "").split())


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a ``main(argv)`` entry point; map :class:`UserError` to one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return int(main(argv) or 0)
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"mergeopt: error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("mergeopt: interrupted", file=sys.stderr)
        return 130
