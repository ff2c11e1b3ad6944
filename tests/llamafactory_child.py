"""LLaMA-Factory's own code run as ``python -c SCRIPT ARGS`` would, without importing it each time.

The export tests read mergeopt's LLaMA-Factory configs with LLaMA-Factory's own parser, loader and
processors, each in a process of its own (its import checks transformers' version and stubs
torchaudio, which must not leak into the test process). A new interpreter spends seconds of CPU
importing LLaMA-Factory (11 s on a slow 2-core EPYC), and the tests start about twenty. So each test
process starts one server on first use: a child interpreter that imports LLaMA-Factory once and
then forks a child per script. The forked child is what a new interpreter would be after the same
imports: ``sys.argv`` is ``["-c", *args]``, the script runs as a fresh ``__main__``, the test's
environment and working directory are its own, its output goes to its own descriptors 1 and 2, and
its exit code is the script's (1 with the traceback on stderr for an exception). What the imports
print (LLaMA-Factory's note that its version check is off) the server's import printed, once;
environment variables read at import time are the ones of the server's start, the test process's
at that moment.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

# what every LLaMA-Factory script here imports: its audio templates import torchaudio, which this
# path never uses (stubbed, as each script does), and its version check, switched off by its
# documented variable
_IMPORTS = """
import importlib.machinery, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
import datasets, transformers
from transformers import AutoTokenizer, HfArgumentParser, Seq2SeqTrainingArguments
import llamafactory.data.converter, llamafactory.data.data_utils, llamafactory.data.formatter
import llamafactory.data.loader, llamafactory.data.parser, llamafactory.data.template
import llamafactory.data.processor.pretrain, llamafactory.data.processor.supervised
import llamafactory.hparams
"""

_SERVER = (
    """
import os, sys
reply = os.fdopen(os.dup(1), "w", buffering=1)  # the replies' own channel
os.dup2(2, 1)  # what the imports print goes where their warnings go
"""
    + _IMPORTS
    + '''
import atexit, builtins, json, threading, traceback

def run(request):
    """In the forked child: the script as ``python -c`` runs it; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        out = open(request["stdout"], "w", buffering=1)
        err = open(request["stderr"], "w", buffering=1)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdin = open(os.devnull)
        sys.stdout, sys.stderr = out, err
        sys.argv = ["-c", *request["args"]]
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        try:
            exec(compile(request["script"], "<string>", "exec"), main.__dict__)
            code = 0
        except SystemExit as exit_:  # as the interpreter ends on it: None is 0, a message is 1
            code = 0 if exit_.code is None else exit_.code
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

assert threading.active_count() == 1, threading.enumerate()  # forking with other threads can hang
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run(request)
    reply.write(json.dumps({"pid": pid}) + "\\n")
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\\n")
'''
)

_lock = threading.Lock()
_server: subprocess.Popen | None = None
_pending = b""  # what the server wrote after the last line read
_said = None  # the server's own stderr (its imports' warnings), shown if it stops


def _started() -> subprocess.Popen:
    global _server, _pending, _said
    if _server is None or _server.poll() is not None:
        _pending, _said = b"", tempfile.TemporaryFile()
        env = {**os.environ, "DISABLE_VERSION_CHECK": "1"}
        _server = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=_said,
            env=env,
        )
        atexit.register(_stop, _server)
    return _server


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _reply(server: subprocess.Popen, timeout: float | None) -> dict:
    """The server's next line, within ``timeout`` seconds (TimeoutError) or without a limit."""
    global _pending
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in _pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([server.stdout], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(server.stdout.fileno(), 65536)
        if not chunk:
            server.wait()
            _said.seek(0)
            said = _said.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the LLaMA-Factory server stopped (exit code {server.returncode}):\n{said}")
        _pending += chunk
    line, _pending = _pending.split(b"\n", 1)
    return json.loads(line)


def run_llamafactory(script: str, *args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c script *args`` in a child that has LLaMA-Factory imported, with
    ``DISABLE_VERSION_CHECK=1``: what :func:`subprocess.run` with ``capture_output=True, text=True``
    returns (a killed child's return code is minus the signal's number)."""
    with _lock, tempfile.TemporaryDirectory() as tmp:
        server = _started()
        request = {
            "script": script,
            "args": list(args),
            "cwd": str(cwd or os.getcwd()),
            "env": {**os.environ, "DISABLE_VERSION_CHECK": "1"},
            "stdout": os.path.join(tmp, "stdout"),
            "stderr": os.path.join(tmp, "stderr"),
        }
        try:
            server.stdin.write((json.dumps(request) + "\n").encode())
            server.stdin.flush()
        except BrokenPipeError:  # it stopped: the reply below says why
            pass
        pid = _reply(server, None)["pid"]
        try:
            status = _reply(server, timeout)["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _reply(server, None)
            raise subprocess.TimeoutExpired(["python", "-c", "<script>", *args], timeout) from None
        with open(request["stdout"]) as out, open(request["stderr"]) as err:
            return subprocess.CompletedProcess(
                ["python", "-c", script, *args], status, out.read(), err.read()
            )
