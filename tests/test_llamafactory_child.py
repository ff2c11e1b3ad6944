"""tests/llamafactory_child.py: a script run in the LLaMA-Factory server's forked child gives what
``python -c`` gives in a new interpreter, so the export tests that read LLaMA-Factory's answers
there check the same thing as before they shared one import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.llamafactory_child import run_llamafactory

pytest.importorskip("llamafactory")

PARSE = """
import importlib.machinery, json, os, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
from transformers import HfArgumentParser
from llamafactory.hparams.data_args import DataArguments

(args,) = HfArgumentParser(DataArguments).parse_dict(
    {"dataset": sys.argv[1], "interleave_probs": sys.argv[2], "mix_strategy": "interleave_under"}
)
seen = [sys.argv, __name__, os.getcwd(), os.environ.get("MERGEOPT_CHILD_PROBE"), os.environ["DISABLE_VERSION_CHECK"]]
print(json.dumps([*seen, args.dataset, args.interleave_probs, args.mix_strategy]))
print("a line on stderr", file=sys.stderr)
"""


def _new_interpreter(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_a_forked_script_prints_what_a_new_interpreter_prints(tmp_path, monkeypatch):
    """Arguments, ``__main__``, working directory, the test's environment (set after the server
    started, if an earlier test started it) and LLaMA-Factory's own parse of them."""
    monkeypatch.setenv("MERGEOPT_CHILD_PROBE", str(tmp_path))
    args = ("math,code", "0.25,0.75")
    forked = run_llamafactory(PARSE, *args, cwd=tmp_path)
    fresh = _new_interpreter(PARSE, *args, cwd=tmp_path)
    assert (forked.returncode, fresh.returncode) == (0, 0), forked.stderr[-2000:] + fresh.stderr[-2000:]
    # LLaMA-Factory's import says (on stdout) that its version check is off: the server's import
    # said it, once; what the script printed is the same
    assert forked.stdout.splitlines() == fresh.stdout.splitlines()[-1:]
    assert '["math", "code"]' in forked.stdout and str(tmp_path) in forked.stdout
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "a line on stderr"


@pytest.mark.parametrize(
    "script",
    [
        "import sys; sys.exit(3)",
        "import sys; sys.exit('a message')",
        "raise ValueError('a bad record')",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "import sys; print('done'); sys.exit()",
    ],
)
def test_a_forked_script_ends_as_a_new_interpreter_ends(script):
    """The exit code (minus the signal's number for a killed child) and the last line on stderr."""
    forked, fresh = run_llamafactory(script), _new_interpreter(script)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


def test_a_script_past_its_timeout_is_killed_and_the_next_one_runs():
    """A script that never ends (it waits for a signal that no one sends)."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_llamafactory("import signal; signal.pause()", timeout=1)
    assert run_llamafactory("print('next')").stdout == "next\n"
