"""Experiment tracking: each tracker's run, read back with its own library, holds the fit's numbers.

Every test runs a real short fit on the random world with ``logging.backends`` set, then reads
what was written with the tracker's own reader (TensorBoard's EventAccumulator, MLflow's client,
W&B's protobuf records of its offline file) and compares the numbers with the run's trace.csv,
evaluations.csv and mixture.json. The resume tests kill a fit at a named step or evaluation
(MERGEOPT_FAULT) and check that the resumed run continues the same tracked run, each step or
evaluation in it once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mergeopt.config import recipe_from_dict
from mergeopt.errors import USER_ERROR_EXIT_CODE, UserError, run_cli
from mergeopt.fit import fit
from mergeopt.fit import main as fit_main
from mergeopt.reporting import trackers, tracking
from mergeopt.runtime.resume import RunState
from tests.conftest import EXPERTS, REPO, recipe_tree, repo_pythonpath, run_forked, run_in_process

OPTIM = {"steps": 6, "batch_size": 4, "eval_every": 2, "eval_batch_size": 16, "patience": 100}
TERMS = [{"kind": "loss", "dev": "all"}, {"kind": "loss", "dev": "arith"}]  # two series, labels with a ':'
GRID = {"search": {"strategy": "grid", "grid": {"divisions": 2}}, "objective": {"terms": TERMS}}


@pytest.fixture(autouse=True)
def own_wandb_service():
    """W&B publishes its service in WANDB_SERVICE for child processes to share. A fit run as a
    subprocess must start its own (sharing this process's kept a killed fit's run open), and no
    later test's subprocess should inherit it."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


def _tree(world, out: Path, backends, **sections) -> dict:
    tree = recipe_tree(world, out)
    tree["optim"] = {**tree["optim"], **OPTIM}
    tree.update(sections)
    tree["logging"] = {"backends": list(backends), **sections.get("logging", {})}
    return tree


def _fit(world, out: Path, backends, **sections) -> dict:
    recipe = recipe_from_dict(_tree(world, out, backends, **sections))
    return fit(recipe, progress=False, log=lambda _m: None)


def _recipe_file(world, tmp_path: Path, out: Path, backends, **sections) -> str:
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(_tree(world, out, backends, **sections)))
    return str(path)


# ----------------------------------------------------------------------------- readers
# Each returns {metric: [(step, value), ...]} in the order the tracker holds them.


def read_board(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()  # applies purge_step: a resumed run's first attempt is hidden from that step on
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    return read_board(out / "logs" / "tensorboard" / out.name)


def read_mlflow(out: Path):
    """The one run in the run's local MLflow store: its info, params and every metric's history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'logs' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("mergeopt")
    [run] = client.search_runs([experiment.experiment_id])
    history = {}
    for key in run.data.metrics:
        points = client.get_metric_history(run.info.run_id, key)
        history[key] = [(m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]
    return run, history


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of CRC-checked chunks) holding wandb.proto's Record messages. W&B's client has no
    reader for offline runs, so the test reads the format itself and checks every checksum."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad chunk at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb(out: Path) -> list[dict]:
    """Each offline run file under the run's logs, oldest first: its run id, history and summary."""
    if "wandb" in sys.modules:  # run.finish() can return before W&B's service wrote the file's last
        sys.modules["wandb"].teardown()  # records; its shutdown writes them (as a fit's exit does)
    runs = []
    for path in sorted((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"id": path.stem.removeprefix("run-"), "history": {}, "summary": {}, "config": {}}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run["id"]
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        run["history"].setdefault(key, []).append((int(row["_step"]), value))
            elif kind == "summary":
                run["summary"].update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
        runs.append(run)
    return runs


READERS = {
    "tensorboard": read_tensorboard,
    "mlflow": lambda out: read_mlflow(out)[1],
    "wandb": lambda out: {k: v for run in read_wandb(out) for k, v in run["history"].items()},
}
SUMMARY_READERS = {  # the run's closing values: {metric: value}
    "tensorboard": lambda out: {k: v[-1][1] for k, v in read_tensorboard(out).items()},
    "mlflow": lambda out: read_mlflow(out)[0].data.metrics,
    "wandb": lambda out: read_wandb(out)[-1]["summary"],
}


# ----------------------------------------------------------------------------- checks


def assert_series(logged: dict, metric: str, expected: dict[int, float]) -> None:
    """The metric holds exactly the expected steps, each once, at the expected values."""
    points = logged.get(metric, [])
    steps = [step for step, _ in points]
    assert len(steps) == len(set(steps)), f"{metric}: a step logged twice: {steps}"
    assert sorted(steps) == sorted(expected), metric
    for step, value in points:
        assert value == pytest.approx(expected[step], rel=1e-6, abs=1e-9), (metric, step)


def _column(table: pd.DataFrame, column: str, step: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(table[step], table[column]) if not math.isnan(v)}


def assert_trace(logged: dict, out: Path) -> None:
    """Every number of trace.csv is in the tracker at its step: loss, held-out loss, w per expert."""
    trace = pd.read_csv(out / "trace.csv")
    assert_series(logged, "loss", _column(trace, "loss", "step"))
    assert_series(logged, "heldout_loss", _column(trace, "heldout_loss", "step"))
    for name in EXPERTS:
        assert_series(logged, f"w/{name}", _column(trace, f"w_{name}", "step"))
    assert len(logged["w/alpha"]) == len(trace)  # one point per step, none missing or repeated


def assert_evaluations(logged: dict, out: Path) -> None:
    """Every real evaluation of evaluations.csv is in the tracker at its index."""
    table = pd.read_csv(out / "evaluations.csv")
    assert_series(logged, "value", _column(table, "value", "index"))
    assert_series(logged, "score/loss_all", _column(table, "loss:all", "index"))
    assert_series(logged, "score/loss_arith", _column(table, "loss:arith", "index"))
    for name in EXPERTS:
        assert_series(logged, f"w/{name}", _column(table, f"w_{name}", "index"))


def assert_summary(summary: dict, mixture: dict) -> None:
    assert summary["final/dev_loss"] == pytest.approx(mixture["dev_loss"], rel=1e-6)
    assert summary["final/heldout_loss"] == pytest.approx(mixture["heldout_loss"], rel=1e-6)
    for name, weight in mixture["weights"].items():
        assert summary[f"mixture/{name}"] == pytest.approx(weight, rel=1e-6)


# ----------------------------------------------------------------------------- one backend each


def recipe_in_tensorboard(out: Path, mixture: dict, world: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard" / out.name))
    events.Reload()
    [text] = events.Tensors("recipe/text_summary")
    recipe = yaml.safe_load(text.tensor_proto.string_val[0].decode().strip("`").removeprefix("yaml"))
    assert recipe["optim"]["steps"] == OPTIM["steps"]
    [text] = events.Tensors("mixture/text_summary")
    assert (
        json.loads(text.tensor_proto.string_val[0].decode().strip("`").removeprefix("json"))
        == mixture["weights"]
    )


def recipe_in_mlflow(out: Path, mixture: dict, world: dict) -> None:
    run, _ = read_mlflow(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.steps"] == str(OPTIM["steps"])
    assert run.data.params["model.experts.beta"] == world["experts"]["beta"]
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "mixture.json"
    assert artifact.is_relative_to(out / "logs")  # nothing is written outside the run's logs
    assert json.loads(artifact.read_text())["weights"] == mixture["weights"]


def recipe_in_wandb(out: Path, mixture: dict, world: dict) -> None:
    [run] = read_wandb(out)  # offline: the run is a file under the run's logs
    assert run["config"]["optim"]["steps"] == OPTIM["steps"]
    assert run["summary"]["search/steps"] == OPTIM["steps"]


RECIPE_CHECKS = {"tensorboard": recipe_in_tensorboard, "mlflow": recipe_in_mlflow, "wandb": recipe_in_wandb}


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", "wandb"])
def test_gradient_fit_is_logged_step_by_step(random_world, tmp_path, backend):
    pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    mixture = _fit(random_world, out, [backend])
    assert_trace(READERS[backend](out), out)
    assert_summary(SUMMARY_READERS[backend](out), mixture)
    RECIPE_CHECKS[backend](out, mixture, random_world)


def test_a_wandb_run_the_caller_has_open_is_left_alone(random_world, tmp_path):
    wandb = pytest.importorskip("wandb")
    settings = wandb.Settings(console="off", silent=True)
    caller = wandb.init(mode="offline", dir=str(tmp_path), project="caller", settings=settings)
    out = tmp_path / "run"
    _fit(random_world, out, ["wandb"])
    caller.log({"after_the_fit": 1.0})  # still open: a finished run refuses this
    caller.finish()
    [run] = read_wandb(out)
    assert run["id"] != caller.id and _steps(run, "w/alpha") == list(range(OPTIM["steps"] + 1))


def test_zero_order_evaluations_are_logged_in_every_backend(random_world, tmp_path):
    for package in tracking.PACKAGES.values():
        pytest.importorskip(package)
    out = tmp_path / "grid"
    mixture = _fit(random_world, out, ["tensorboard", "mlflow", "wandb"], **GRID)
    for backend, read in READERS.items():
        assert_evaluations(read(out), out)
        summary = SUMMARY_READERS[backend](out)
        assert_summary(summary, mixture)
        assert summary["search/value"] == pytest.approx(mixture["search"]["value"], rel=1e-6)


# ----------------------------------------------------------------------------- resume


RESUMABLE = {"optim": {**OPTIM, "steps": 8, "checkpoint_every": 2}}


def _stopped_and_resumed(world, tmp_path, backends, fault: str, **sections) -> Path:
    """A fit that stops at ``fault`` (a forked process), then the same command again, to the end."""
    pytest.importorskip("mergeopt.runtime.faults")  # MERGEOPT_FAULT: the named stopping points
    for backend in backends:
        pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    recipe = _recipe_file(world, tmp_path, out, backends, **sections)
    stopped = run_forked("fit", recipe, "--quiet", fault=fault)
    assert stopped.returncode in (-signal.SIGKILL, 143), stopped.stderr
    resumed = run_in_process("fit", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    return out


def _steps(run: dict, metric: str) -> list[int]:
    return [step for step, _ in run["history"].get(metric, [])]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"project": "other"},
            "logging.project differs: 'mergeopt' in the checkpoint's tracked runs, 'other' now",
        ),
        ({"dir": "elsewhere"}, "logging.dir differs: "),
    ],
)
def test_a_resume_that_would_split_the_tracked_run_is_one_line(
    random_world, tmp_path, capsys, change, message
):
    """The resumed fit reopens its MLflow and W&B runs by id: under another project MLflow went on in
    the first one's experiment and W&B logged the rest in the new project (two halves for wandb
    sync); in another logging.dir the ids were not there and new runs lacked the first steps."""
    pytest.importorskip("mergeopt.runtime.faults")
    backends = ["mlflow", "wandb"]
    for backend in backends:
        pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, backends, **RESUMABLE)
    stopped = run_forked("fit", recipe, "--quiet", fault="sigterm@step:5")
    assert stopped.returncode == 143, stopped.stderr
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    changed = [
        f"logging.{key}={tmp_path / value if key == 'dir' else value}" for key, value in change.items()
    ]
    capsys.readouterr()
    assert run_cli(fit_main, [recipe, *changed, "--quiet"]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "--restart" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    assert not (tmp_path / "elsewhere").exists()
    # the same logging section resumes, as before
    assert run_in_process("fit", recipe, "--quiet").returncode == 0


def test_a_backend_that_joins_on_a_resume_says_it_lacks_the_earlier_steps(random_world, tmp_path):
    """A fit stopped with TensorBoard alone and resumed with MLflow too: the MLflow run starts at
    the checkpoint, and nothing said so. One warning line says it now; a resume with the same
    backends says nothing."""
    pytest.importorskip("mergeopt.runtime.faults")
    for backend in ("tensorboard", "mlflow"):
        pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, ["tensorboard"], **RESUMABLE)
    stopped = run_forked("fit", recipe, "--quiet", fault="sigterm@step:5")
    assert stopped.returncode == 143, stopped.stderr
    joined = run_in_process("fit", recipe, "logging.backends=[tensorboard, mlflow]", "--quiet")
    assert joined.returncode == 0, joined.stderr
    warnings = [line for line in joined.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "mergeopt: warning: logging.backends: mlflow joins on this resume: its run holds what the fit "
        "logs from the checkpoint on (the earlier steps and evaluations are in trace.csv and evaluations.csv)"
    ], joined.stderr
    again = tmp_path / "again"
    recipe = _recipe_file(random_world, tmp_path, again, ["tensorboard"], **RESUMABLE)
    assert run_forked("fit", recipe, "--quiet", fault="sigterm@step:5").returncode == 143
    same = run_in_process("fit", recipe, "--quiet")
    assert same.returncode == 0 and "joins on this resume" not in same.stderr, same.stderr


def test_a_backend_added_on_the_resume_of_an_untracked_fit_says_so(random_world, tmp_path):
    """A fit stopped with no backend and resumed with TensorBoard: its run starts at the checkpoint
    as much as a backend added beside another one does, and the warning line says so."""
    pytest.importorskip("mergeopt.runtime.faults")
    pytest.importorskip(tracking.PACKAGES["tensorboard"])
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, [], **RESUMABLE)
    stopped = run_forked("fit", recipe, "--quiet", fault="sigterm@step:5")
    assert stopped.returncode == 143, stopped.stderr
    joined = run_in_process("fit", recipe, "logging.backends=[tensorboard]", "--quiet")
    assert joined.returncode == 0, joined.stderr
    assert "logging.backends: tensorboard joins on this resume" in joined.stderr, joined.stderr


def test_a_backend_left_off_for_one_attempt_continues_its_run(random_world, tmp_path):
    """Stopped with MLflow, resumed with TensorBoard alone and stopped again, resumed with both: the
    TensorBoard attempt rewrote tracking.json without MLflow's run id, and the last attempt opened a
    second MLflow run. The id is kept, and the one run continues."""
    pytest.importorskip("mergeopt.runtime.faults")
    for backend in ("tensorboard", "mlflow"):
        pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, ["mlflow"], **RESUMABLE)
    assert run_forked("fit", recipe, "--quiet", fault="sigterm@step:3").returncode == 143
    board = run_forked("fit", recipe, "logging.backends=[tensorboard]", "--quiet", fault="sigterm@step:5")
    assert board.returncode == 143, board.stderr
    both = run_in_process("fit", recipe, "logging.backends=[tensorboard, mlflow]", "--quiet")
    assert both.returncode == 0, both.stderr
    run, history = read_mlflow(out)  # one run
    assert run.info.status == "FINISHED" and history["loss"][0][0] == 0


def test_a_backend_left_off_beside_another_tracked_one_continues_its_run(random_world, tmp_path):
    """Stopped with MLflow and W&B, resumed with W&B alone and stopped again, resumed with both: the
    W&B attempt rewrote tracking.json with W&B's run id alone, and the last attempt opened a second
    MLflow run. MLflow's id is kept beside W&B's, and its one run continues."""
    pytest.importorskip("mergeopt.runtime.faults")
    for backend in ("mlflow", "wandb"):
        pytest.importorskip(tracking.PACKAGES[backend])
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, ["mlflow", "wandb"], **RESUMABLE)
    assert run_forked("fit", recipe, "--quiet", fault="sigterm@step:3").returncode == 143
    alone = run_forked("fit", recipe, "logging.backends=[wandb]", "--quiet", fault="sigterm@step:5")
    assert alone.returncode == 143, alone.stderr
    both = run_in_process("fit", recipe, "--quiet")
    assert both.returncode == 0, both.stderr
    run, history = read_mlflow(out)  # one run
    assert run.info.status == "FINISHED" and history["loss"][0][0] == 0


def test_after_kill_9_the_resumed_fit_logs_each_step_once(random_world, tmp_path):
    # killed after step 4, before its checkpoint: steps 4 to 8 run again
    backends = ["tensorboard", "mlflow", "wandb"]
    out = _stopped_and_resumed(random_world, tmp_path, backends, "sigkill@step:5", **RESUMABLE)
    assert_trace(read_tensorboard(out), out)  # the first attempt's step 4 is purged
    run, history = read_mlflow(out)  # one run; the step 4 it held is not logged again
    assert_trace(history, out)
    assert run.info.status == "FINISHED"
    # W&B: both offline files hold the same run; the resumed one from the checkpoint's step on. The
    # killed attempt's file holds what W&B flushed before the kill (here nothing: its 15 s did not pass)
    first, second = read_wandb(out)
    assert first["id"] == second["id"]
    assert _steps(second, "w/alpha") == list(range(4, 9))
    assert set(_steps(first, "w/alpha")) <= set(range(5))
    trace = pd.read_csv(out / "trace.csv")
    for step, value in first["history"].get("w/alpha", []) + second["history"]["w/alpha"]:
        assert value == pytest.approx(trace["w_alpha"][step], rel=1e-6)


def test_after_sigterm_the_two_wandb_files_hold_each_step_once(random_world, tmp_path):
    # SIGTERM at step 5: the state after step 4 is saved, the W&B run finished (its file written whole)
    out = _stopped_and_resumed(random_world, tmp_path, ["wandb"], "sigterm@step:5", **RESUMABLE)
    first, second = read_wandb(out)
    assert first["id"] == second["id"]
    assert _steps(first, "w/alpha") == list(range(5)) and _steps(second, "w/alpha") == list(range(5, 9))
    both = {k: first["history"].get(k, []) + v for k, v in second["history"].items()}
    assert_trace(both, out)


def test_a_resumed_search_logs_no_replayed_evaluation_again(random_world, tmp_path):
    # killed as evaluation 4 starts: 3 journaled, replayed on resume, not logged again
    backends = ["tensorboard", "mlflow", "wandb"]
    out = _stopped_and_resumed(random_world, tmp_path, backends, "sigkill@evaluation:4", **GRID)
    assert_evaluations(read_tensorboard(out), out)
    assert_evaluations(read_mlflow(out)[1], out)
    _, second = read_wandb(out)
    assert _steps(second, "value") == list(range(3, len(pd.read_csv(out / "evaluations.csv"))))


def test_a_resumed_attempt_started_in_the_second_of_the_first_sorts_after_it(tmp_path):
    """TensorBoard reads a run's event files in name order, and a name starts with its second: a
    resumed attempt's file must sort after the first attempt's, or the first's later steps would
    hide the resumed ones. The file of an attempt made in this very second is there already."""
    pytest.importorskip("tensorboard")
    import socket
    import time

    folder = tmp_path / "tensorboard" / "run"
    folder.mkdir(parents=True)
    first = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.999999.0"
    first.write_bytes(b"")
    board = trackers.TensorBoard(tmp_path, "run", "seed: 0\n", str(tmp_path / "run"), resuming=True)
    board.log({"loss": 1.0}, step=3)
    board.close("finished")
    names = sorted(f.name for f in folder.glob("events.*"))
    assert len(names) == 2 and names[0] == first.name


# ----------------------------------------------------------------------------- fits sharing one logging.dir


def _shared_tree(world, out: Path, logs: Path, **sections) -> dict:
    """The recipe of a fit into ``out`` that logs to TensorBoard and MLflow in the shared ``logs``."""
    tree = _tree(world, out, ["mlflow", "tensorboard"], **sections)
    tree["logging"]["dir"] = str(logs)
    return tree


def test_two_output_dirs_with_one_run_name_are_two_runs_in_every_tracker(random_world, tmp_path):
    """sA/run and sB/run both default to the run name "run": the second gets run-2 (its log line
    says so) in TensorBoard, where one folder would have hidden the first run, and in MLflow; a
    killed and resumed second fit keeps writing into run-2."""
    for package in ("tensorboard", "mlflow"):
        pytest.importorskip(package)
    logs, first, second = tmp_path / "shared", tmp_path / "sA" / "run", tmp_path / "sB" / "run"
    lines: list[str] = []
    fit(recipe_from_dict(_shared_tree(random_world, first, logs)), progress=False, log=lines.append)
    board = logs / "tensorboard"
    assert f"logging to tensorboard: {board / 'run'} (tensorboard --logdir {board})" in lines
    recipe = tmp_path / "second.yaml"
    recipe.write_text(yaml.safe_dump(_shared_tree(random_world, second, logs, **RESUMABLE)))
    stopped = run_forked("fit", str(recipe), fault="sigkill@step:5")
    assert stopped.returncode == -signal.SIGKILL, stopped.stderr
    said = [line for line in stopped.stdout.splitlines() if line.startswith("logging to tensorboard")]
    assert said == [
        f"logging to tensorboard: {board / 'run-2'} (tensorboard --logdir {board}; "
        f"run there holds the run of {first.resolve()})"
    ]
    assert run_in_process("fit", str(recipe), "--quiet").returncode == 0
    assert sorted(p.name for p in board.iterdir()) == ["run", "run-2"]
    assert_trace(read_board(board / "run"), first)  # the first run, whole
    assert_trace(read_board(board / "run-2"), second)  # each step once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{logs / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mergeopt").experiment_id])
    named = {r.info.run_name: r.data.tags["mergeopt.output_dir"] for r in runs}
    assert named == {"run": str(first.resolve()), "run-2": str(second.resolve())}


def _report(results, call: Callable[[], str]) -> None:
    """What ``call`` returns, or its error's first line, into the parent's queue."""
    try:
        results.put(call())
    except Exception as err:
        results.put(f"{type(err).__name__}: {err}".splitlines()[0])


def _claim_folder(root: str, output_dir: str, start, names) -> None:
    """One process of the test below: a TensorBoard backend opened as the others open theirs."""
    start.wait()
    _report(names, lambda: trackers.TensorBoard(Path(root), "fit", "", output_dir).run_name)


def _open_store(root: str, output_dir: str, start, errors) -> None:
    """One process of the test below: an MLflow run on the shared store, opened and finished ("")."""
    tree = {
        "output_dir": output_dir,
        "model": {"base": "b", "experts": {"a": "x", "b": "y"}},
        "data": {"dev": [{"name": "d", "path": "p"}]},
        "logging": {"backends": ["mlflow"], "dir": root},
    }
    recipe = recipe_from_dict(tree)

    def opened_and_finished() -> str:
        trackers.MLflow(Path(root), Path(output_dir).name, recipe, None).close("finished")
        return ""

    start.wait()
    _report(errors, opened_and_finished)


def _at_once(target, root: Path, count: int) -> list[str]:
    """``target(root, OUTPUT_DIR, barrier, queue)`` in ``count`` processes released together;
    what each put in the queue."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # mlflow and tensorboard only: no OpenMP in them
    start, results = context.Barrier(count), context.Queue()
    children = [
        context.Process(target=target, args=(str(root), str(root.parent / f"s{i}" / "fit"), start, results))
        for i in range(count)
    ]
    for child in children:
        child.start()
    got = [results.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
    return got


def test_fits_starting_together_on_one_new_mlflow_store_all_log(tmp_path):
    """A sweep or a Slurm array sharing logging.dir: MLflow creates a new store's tables at the
    first access, and several processes doing it at once failed ("table ... already exists")."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    root = tmp_path / "shared"
    assert _at_once(_open_store, root, 4) == [""] * 4
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mergeopt").experiment_id])
    assert sorted(r.data.tags["mergeopt.output_dir"] for r in runs) == [
        str(tmp_path / f"s{i}" / "fit") for i in range(4)
    ]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_fits_starting_together_with_one_run_name_get_a_tensorboard_folder_each(tmp_path):
    pytest.importorskip("tensorboard")
    root = tmp_path / "shared"
    assert sorted(_at_once(_claim_folder, root, 4)) == ["fit", "fit-2", "fit-3", "fit-4"]
    owners = {(root / "tensorboard" / n / trackers.OWNER).read_text().strip() for n in ("fit", "fit-4")}
    assert len(owners) == 2  # each folder names the output_dir it belongs to


def test_an_unreachable_mlflow_server_is_one_line_and_exit_2_without_the_long_retries(random_world, tmp_path):
    """MLflow's retries (7, backoff doubling from 2 s) held the fit about 4 minutes before the
    error. A bound but not listening socket refuses connections; 60 s is a generous bound for a
    new interpreter that loads the tiny world and fails at its tracker."""
    import socket
    import subprocess

    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
        out = tmp_path / "run"
        logging_section = {"mlflow_tracking_uri": uri}
        recipe = _recipe_file(random_world, tmp_path, out, ["tensorboard", "mlflow"], logging=logging_section)
        env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
        for key in trackers.FAIL_FAST:
            env.pop(key, None)
        done = subprocess.run(
            [sys.executable, "-m", "mergeopt.fit", recipe, "--quiet"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
    assert done.returncode == USER_ERROR_EXIT_CODE
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("mergeopt: error: logging.backends: mlflow could not start") and uri in line
    assert not out.exists()  # nothing written: not even the TensorBoard folder claimed before


@pytest.mark.parametrize("uri", ["http:/127.0.0.1:5000", "htp:/127.0.0.1:5000"])
def test_a_mistyped_mlflow_uri_is_refused_before_the_model_is_loaded(
    random_world, tmp_path, monkeypatch, capsys, uri
):
    """A URI without "://" was taken for a local path and left alone until the run opened, after the
    world's build, the base model's loading and the experts' stacking."""
    pytest.importorskip("mlflow")
    import mergeopt.fit

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker's URI was refused")

    monkeypatch.setattr(mergeopt.fit, "load_problem", loaded)
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, ["mlflow"], logging={"mlflow_tracking_uri": uri})
    capsys.readouterr()
    assert run_cli(fit_main, [recipe, "--quiet"]) == USER_ERROR_EXIT_CODE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mergeopt: error: logging.backends: mlflow could not start"), line
    assert not out.exists()


def test_a_local_mlflow_store_is_not_contacted_before_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    for uri in ["mlruns", str(tmp_path / "store"), (tmp_path / "f").as_uri(), f"sqlite:///{tmp_path}/s.db"]:
        trackers.contact_mlflow(uri, "p")
    assert list(tmp_path.iterdir()) == []  # nothing created: the run makes its store when it opens


def test_the_short_mlflow_retries_are_for_the_first_request_and_only_where_unset(monkeypatch):
    """The run's later requests keep MLflow's retries (a server busy for a minute loses no step),
    and a user's own MLFLOW_HTTP_REQUEST_* setting is kept throughout."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "45")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    with trackers.fail_fast():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "45"
        assert (
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
            == trackers.FAIL_FAST["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        )
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "45"


# ----------------------------------------------------------------------------- no tracker, no library, rank > 0


def test_no_backend_writes_no_logs(random_world, tmp_path):
    out = tmp_path / "run"
    _fit(random_world, out, [])
    assert not (out / "logs").exists()


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", "wandb"])
def test_a_missing_library_is_one_line_and_exit_2_before_any_work(
    random_world, tmp_path, monkeypatch, capsys, backend
):
    monkeypatch.setitem(sys.modules, tracking.PACKAGES[backend], None)  # `import X` fails as if absent
    out = tmp_path / "run"
    recipe = _recipe_file(random_world, tmp_path, out, [backend])
    assert run_cli(fit_main, [recipe, "--quiet"]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"pip install {tracking.PACKAGES[backend]}" in err and "logging.backends" in err
    assert not out.exists()  # refused before anything was loaded or written


def test_rank_other_than_0_logs_nothing(random_world, tmp_path, monkeypatch):
    from mergeopt.runtime import distributed

    monkeypatch.setattr(distributed, "process_rank_and_size", lambda: (1, 2))
    out = tmp_path / "run"
    recipe = recipe_from_dict(_tree(random_world, out, ["tensorboard", "mlflow", "wandb"]))
    with tracking.tracked(recipe, RunState(out, {}), resuming=False, log=lambda _m: None) as tracker:
        assert tracker.backends == []
        tracker.step({"step": 0, "loss": 1.0, "heldout_loss": math.nan, "w_alpha": 1.0})
    assert not out.exists()


def test_recipe_logging_section_errors_are_one_line():
    tree = {
        "model": {"base": "b", "experts": {"a": "x", "b": "y"}},
        "data": {"dev": [{"name": "d", "path": "p"}]},
    }
    for section, message in [
        (
            {"backends": ["tensorbord"]},
            "logging.backends.0: Input should be 'tensorboard', 'mlflow' or 'wandb'",
        ),
        ({"backends": ["mlflow", "mlflow"]}, "logging.backends: names a backend twice: mlflow"),
        ({"wandb_mode": "cloud"}, "logging.wandb_mode"),
        ({"project_name": "x"}, "logging.project_name: unknown key"),
        # W&B's rules, refused with the recipe rather than by wandb.init after the model is loaded
        ({"backends": ["wandb"], "project": "team/mix"}, "logging.project: 'team/mix' is not a W&B project"),
        ({"backends": ["wandb"], "project": "a:b#c"}, r"it contains # :"),
        ({"backends": ["wandb"], "project": "x" * 129}, "129 characters, W&B takes 128 at most"),
        ({"backends": ["mlflow"], "project": " "}, "logging.project: is empty"),
        ({"backends": ["wandb"], "project": ""}, "logging.project: is empty"),
        # the run's TensorBoard folder under logging.dir: ../x wrote outside it, a/b nested folders
        ({"backends": ["tensorboard"], "run_name": "../x"}, r"logging.run_name: '../x' is not a run name"),
        (
            {"backends": ["tensorboard"], "run_name": "a/b"},
            r"'a/b' is not a run name: it names the run's TensorBoard folder",
        ),
        ({"backends": ["tensorboard"], "run_name": ".."}, r"'..' is not a run name"),
        ({"backends": ["tensorboard"], "run_name": " "}, r"' ' is not a run name"),
    ]:
        with pytest.raises(UserError, match=message):
            recipe_from_dict({**tree, "logging": section})
    assert recipe_from_dict({**tree, "logging": {"backends": "mlflow"}}).logging.backends == ("mlflow",)
    # MLflow takes what W&B refuses (a Databricks experiment is a path); so do recipes without W&B
    for backends in (["mlflow"], ["tensorboard"], []):
        logging = {"backends": backends, "project": "/Shared/team/mix"}
        assert recipe_from_dict({**tree, "logging": logging}).logging.project == "/Shared/team/mix"
    assert recipe_from_dict({**tree, "logging": {"backends": ["wandb"], "project": "x" * 128}})
    assert recipe_from_dict({**tree, "logging": {"backends": ["tensorboard"], "run_name": "mix-v2.1"}})
    named = {"backends": ["mlflow", "wandb"], "run_name": "team/mix"}  # not a folder: any name
    assert recipe_from_dict({**tree, "logging": named}).logging.run_name == "team/mix"


def test_evaluator_observes_each_new_evaluation_as_its_row():
    from mergeopt.search import Evaluator

    observed = []
    evaluator = Evaluator(
        ["a", "b"], lambda w: {"loss:all": float(w[0])}, lambda s: s["loss:all"], observe=observed.append
    )
    evaluator.prefetch([np.array([1.0, 0.0]), np.array([0.5, 0.5])], "grid")
    evaluator.scores(np.array([1.0, 0.0]), "grid")  # a cache hit: not observed again
    rows = evaluator.rows()
    assert observed == [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_a_tracker_that_fails_is_dropped_and_the_others_go_on():
    class Recording:
        name, run_id = "recording", None

        def __init__(self):
            self.logged, self.status = [], None

        def log(self, metrics, step):
            self.logged.append((step, dict(metrics)))

        def close(self, status):
            self.status = status

    class Broken(Recording):
        name = "broken"

        def log(self, metrics, step):
            raise OSError("disk full")

    broken, recording = Broken(), Recording()
    tracker = tracking.Tracker([broken, recording])
    with pytest.warns(UserWarning, match="logging to broken failed .OSError: disk full.; the fit goes on"):
        tracker.step({"step": 0, "loss": 2.5, "heldout_loss": math.nan, "w_a": 0.25, "w_b": 0.75})
    tracker.step({"step": 1, "loss": 2.0, "heldout_loss": 1.5, "w_a": 0.5, "w_b": 0.5})
    tracker.close("finished")
    assert broken.status == "failed" and recording.status == "finished"
    assert recording.logged == [
        (0, {"loss": 2.5, "w/a": 0.25, "w/b": 0.75}),  # a NaN (no held-out evaluation) is not logged
        (1, {"loss": 2.0, "heldout_loss": 1.5, "w/a": 0.5, "w/b": 0.5}),
    ]


def test_a_checkpoint_resumes_with_other_trackers(tmp_path):
    # which trackers watch a run is not part of what it computes: adding one on resume is allowed
    before = {"seed": 0, "optim": {"steps": 8}, "logging": {"backends": []}}
    RunState(tmp_path, before).start()
    RunState(tmp_path, {**before, "logging": {"backends": ["mlflow"]}}).check_matches()
    with pytest.raises(UserError, match="optim.steps differs"):
        RunState(tmp_path, {**before, "optim": {"steps": 9}}).check_matches()


@pytest.mark.parametrize("mistake", ["logging.dir under a file", "mlflow server not answering"])
def test_a_tracker_that_cannot_start_is_refused_before_any_model_is_loaded(
    random_world, tmp_path, monkeypatch, mistake
):
    """It was refused only once the base model was loaded and the experts stacked (minutes on a
    large model): the trackers open after the loading."""
    import socket

    import mergeopt.fit as fit_module

    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")

    def loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the tracker was checked")

    monkeypatch.setattr(fit_module, "load_problem", loading)
    out = tmp_path / "run"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        if mistake == "logging.dir under a file":
            (tmp_path / "file").write_text("not a directory\n")
            backends, logging_section = ["tensorboard"], {"dir": str(tmp_path / "file" / "logs")}
            expected = f"logging.backends: tensorboard cannot write to {tmp_path / 'file' / 'logs'}: "
        else:
            uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
            backends, logging_section = ["mlflow"], {"mlflow_tracking_uri": uri}
            expected = "logging.backends: mlflow could not start ("
        with pytest.raises(UserError) as refused:
            _fit(random_world, out, backends, logging=logging_section)
    assert str(refused.value).startswith(expected)
    assert not out.exists()
