"""A torchrun rank asks for SIGTERM when its agent dies (mergeopt.runtime.launcher); nothing else does.

The whole path, a real torchrun whose agent is killed with SIGKILL, is in tests/test_distributed.py;
these check the request itself, each in a new interpreter, so the test process keeps its own settings.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, repo_pythonpath

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

_ASK_AND_READ = """
import ctypes
from mergeopt.runtime import launcher
asked = launcher.end_with_the_launcher()
libc, got = ctypes.CDLL(None), ctypes.c_int(-1)
assert libc.prctl(2, ctypes.byref(got), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
print(asked, got.value)
"""


def _ask(environ: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update(environ, PYTHONPATH=repo_pythonpath())
    done = subprocess.run(
        [sys.executable, "-c", _ASK_AND_READ], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_rank_torchrun_started_asks_for_sigterm_when_its_agent_dies():
    import signal

    assert _ask({"TORCHELASTIC_RUN_ID": "none"}) == f"True {int(signal.SIGTERM)}"


@pytest.mark.parametrize("run_id", [None, "", " "])
def test_a_process_torchrun_did_not_start_keeps_running_when_its_parent_goes(run_id):
    """A shell's ``nohup mergeopt fit ... &`` counts on it; WORLD_SIZE alone (a hand-made group) too."""
    environ = {"WORLD_SIZE": "1"} | ({} if run_id is None else {"TORCHELASTIC_RUN_ID": run_id})
    assert _ask(environ) == "False 0"


def test_an_agent_that_dies_while_the_rank_asks_is_noticed():
    """The parent's pid changed between the two reads: the kernel will send nothing, so the rank
    signals itself (here into a stand-in for os.kill, and PR_SET_PDEATHSIG in a forked child)."""
    import multiprocessing
    import signal

    def child(queue):
        from mergeopt.runtime import launcher

        parents = iter([4242, 1])
        sent = []
        launcher.os.getppid = lambda: next(parents)
        launcher.os.kill = lambda pid, signum: sent.append((pid, signum))
        asked = launcher.end_with_the_launcher({"TORCHELASTIC_RUN_ID": "x"})
        queue.put((asked, sent, os.getpid()))

    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
    process.start()
    asked, sent, pid = queue.get(timeout=60)
    process.join(60)
    assert asked is True and sent == [(pid, signal.SIGTERM)]


_RANK_STARTS_ONE = """
import os, subprocess, sys
done = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
print(done.stdout.strip() or done.stderr)
"""


@pytest.mark.parametrize(("rank_run_id", "expected"), [("job-1", "False 0"), ("outer-job", "True")])
def test_a_process_a_rank_started_does_not_ask(rank_run_id, expected):
    """The variable is inherited by whatever a rank starts, but only the agent's child is a rank: a
    ``mergeopt`` that a rank's script starts (in the background, as its last act, say) got SIGTERM
    when that script ended normally. A rank of a torchrun nested in another job's rank still asks."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update(PYTHONPATH=repo_pythonpath(), TORCHELASTIC_RUN_ID=rank_run_id)
    child = _ASK_AND_READ.replace(
        "launcher.end_with_the_launcher()", "launcher.end_with_the_launcher({'TORCHELASTIC_RUN_ID': 'job-1'})"
    )
    done = subprocess.run(
        [sys.executable, "-c", _RANK_STARTS_ONE, child],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(expected), done.stdout
