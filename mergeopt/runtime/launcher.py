"""A torchrun rank ends when its launcher dies, instead of running on without a console.

torchrun's agent starts each rank in a session of its own and passes SIGINT and SIGTERM on to it,
but ``kill -9`` of the agent (an OOM killer, a user's ``kill -9``, a job scheduler that ends the
wrong process) passes nothing on: the ranks ran on to the end of the fit, held their GPUs, and
published a result nobody was waiting for. On Linux a process can ask the kernel for a signal when
its parent dies (``prctl(PR_SET_PDEATHSIG)``); a rank started by torchrun asks for SIGTERM, so it
stops as it would if torchrun had passed SIGTERM on: it saves its state at the next step and exits,
and rerunning the command resumes it. Only a process torchrun (or another torch elastic launcher,
such as ``accelerate launch``) started asks: the variable ``TORCHELASTIC_RUN_ID`` says so, and its
parent was started without it (a process a rank started inherits the variable but its parent is
the rank). A plain process, or one whose parent is a shell, keeps running when that parent goes
(``nohup`` users count on it). Elsewhere than Linux nothing is asked and the old behaviour stays.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def started_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """torch elastic's agent (torchrun, ``accelerate launch``) sets this in every rank it starts."""
    return bool(environ.get("TORCHELASTIC_RUN_ID", "").strip())


def _parent_is_a_rank(parent: int, environ: Mapping[str, str]) -> bool:
    """Whether ``parent`` was itself started with this run's ``TORCHELASTIC_RUN_ID``: a rank (or a
    process a rank started), not torchrun's agent, which is started without it (or, nested in
    another job, with that job's). Every process a rank starts inherits the variable, so without
    this a ``mergeopt`` a rank's script starts, say in the background as its last act, would get
    SIGTERM when that script ends normally. An environment that cannot be read counts as the agent's.
    """
    try:
        raw = Path(f"/proc/{parent}/environ").read_bytes()
    except OSError:
        return False
    ours = f"TORCHELASTIC_RUN_ID={environ.get('TORCHELASTIC_RUN_ID', '')}".encode()
    return ours in raw.split(b"\0")


def end_with_the_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Ask for SIGTERM when the parent (torchrun's agent) dies; True when the kernel agreed.

    The kernel sends the signal when the thread that started this process ends; torchrun's agent
    starts its ranks from its main thread, so that is when the agent ends. A parent that died while
    this call was made is caught by the parent's pid changing under it (SIGTERM is then sent at
    once); one that died before it, while the interpreter was starting, is not. The parent's pid
    alone cannot tell: in a container torchrun's agent may itself be pid 1.
    """
    if not sys.platform.startswith("linux") or not started_by_torchrun(environ):
        return False
    parent = os.getppid()
    if _parent_is_a_rank(parent, environ):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols, libc's among them
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no libc to load (a static interpreter): keep the old way
        return False
    if os.getppid() != parent:  # the agent died between the two reads: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True
