"""The three trackers a fit can log to, each through its own library's writer.

:mod:`mergeopt.reporting.tracking` fans a fit's events out to these and says what is logged and
when; here is how each tracker is opened, resumed, shared and closed: TensorBoard's run folders
claimed per output_dir (a second output_dir with the same run name gets ``NAME-2``), MLflow's
SQLite store created under a file lock and its first request cut short
(:func:`fail_fast`), W&B offline unless asked. Each class has the members the fan-out
calls: ``name``, ``run_id``, ``where()``, ``log(metrics, step)``, ``finish(summary, step,
mixture)`` and ``close(status)``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mergeopt.config import Recipe
from mergeopt.runtime import file_locks
from mergeopt.runtime.resume import recipe_tree


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted keys (lists indexed), values as text: MLflow's params."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix.rstrip("."): json.dumps(tree) if tree is None or tree == [] else str(tree)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _after_earlier_event_files(folder: Path) -> None:
    """Wait, if need be, until a new event file sorts after the ones in ``folder``.

    TensorBoard reads a run's event files in name order, and a name starts with the second it was
    made in (then host, pid). A resumed attempt's file must come after the interrupted one's, or its
    purge_step would hide nothing and the first attempt's later steps would hide the resumed ones:
    an attempt resumed within the second its predecessor started needs this wait (at most 1 s)."""
    stamps = [int(m[1]) for f in folder.glob("events.out.tfevents.*") if (m := _EVENT_STAMP.match(f.name))]
    wait = max(stamps) + 1 - time.time() if stamps else 0.0
    if 0 < wait <= 2:  # not for a clock that went back further than that
        time.sleep(wait)


_EVENT_STAMP = re.compile(r"events\.out\.tfevents\.(\d+)\.")


OWNER = "mergeopt-output-dir.txt"  # in a TensorBoard run folder: the output_dir whose run it holds


def _owner(folder: Path) -> str | None:
    """The output_dir that claimed ``folder``: "" while its claim is being written, None if unclaimed."""
    try:
        return (folder / OWNER).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _free_for(folder: Path, output_dir: str, resuming: bool) -> bool:
    """Whether this run may write in ``folder``: its own, or unclaimed and holding no other run's events.

    A folder with events and no claim was written before mergeopt claimed folders: a resumed run
    takes it (its first attempt's, most likely), a new one leaves it alone."""
    owner = _owner(folder)
    if owner is not None:
        return owner == output_dir
    return resuming or not any(folder.glob("events.out.tfevents.*"))


def _made_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones made, outermost first (to undo a claim)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


class TensorBoard:
    """torch's SummaryWriter; created at the first step logged, with that step as purge_step.

    Several fits may share one ``logging.dir`` with the same run name (the default, the last folder
    of output_dir, is often ``fit``). TensorBoard shows one run per folder and the new writer's
    purge_step 0 would hide the earlier run, so each output_dir claims its folder
    (``mergeopt-output-dir.txt`` in it, made with O_EXCL so that two fits starting together cannot
    both win) and a run whose name is taken by another output_dir gets ``NAME-2``, ``NAME-3``...
    The same output_dir (a resumed or restarted fit) keeps its folder.
    """

    name = "tensorboard"
    run_id = None

    def __init__(self, root: Path, wanted: str, recipe_text: str, output_dir: str, resuming: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class = SummaryWriter
        self._recipe_text = recipe_text
        self._writer = None
        self.wanted, self._made = wanted, []
        for n in itertools.count(1):
            self.run_name = wanted if n == 1 else f"{wanted}-{n}"
            self.dir = root / "tensorboard" / self.run_name
            if _free_for(self.dir, output_dir, resuming) and self._claim(output_dir):
                break

    def _claim(self, output_dir: str) -> bool:
        """Write this output_dir into the folder's claim unless another process claimed it first."""
        made = _made_dirs(self.dir)
        try:
            with (self.dir / OWNER).open("x", encoding="utf-8") as claim:
                claim.write(output_dir + "\n")
            self._made = [*made, self.dir / OWNER]
        except FileExistsError:  # ours (kept), or another fit's that won the race since the check
            return _owner(self.dir) == output_dir
        return True

    def where(self) -> str:
        board = f"tensorboard --logdir {self.dir.parent}"
        if self.run_name == self.wanted:
            return f"{self.dir} ({board})"
        holder = _owner(self.dir.parent / self.wanted) or "an earlier fit"
        return f"{self.dir} ({board}; {self.wanted} there holds the run of {holder})"

    def _open(self, purge_step: int | None):
        if self._writer is None:
            _after_earlier_event_files(self.dir)
            self._writer = self._writer_class(str(self.dir), purge_step=purge_step)
            self._writer.add_text("recipe", f"```yaml\n{self._recipe_text}```", purge_step or 0)
        return self._writer

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self._open(purge_step=step)  # a resumed run hides the first attempt's events from here on
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # a killed run keeps what it logged

    def finish(self, summary: Mapping[str, float], step: int, mixture: dict) -> None:
        writer = self._open(purge_step=None)
        for key, value in summary.items():
            writer.add_scalar(key, value, step)
        writer.add_text("mixture", f"```json\n{json.dumps(mixture['weights'], indent=2)}\n```", step)

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            return
        for path in reversed(self._made):  # a fit stopped before its first step (a tracker that could
            with contextlib.suppress(OSError):  # not start) leaves no folder behind
                if path.name == OWNER:
                    path.unlink()
                else:
                    path.rmdir()


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow announces creating its database tables at INFO on stderr; a fit says where it logs itself."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """An OS lock (flock) beside a SQLite store, held while a fit opens its run there.

    MLflow creates a new store's tables and runs its migrations at the first access without a
    lock of its own: two fits starting together on one fresh ``mlflow.db`` (a sweep, a Slurm
    array sharing ``logging.dir``) both did, and one failed ("table ... already exists"). Once
    created, SQLite serializes their writes itself. A server (http://...) needs no lock."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = uri.removeprefix("sqlite:///").partition("?")[0]
    if db in ("", ":memory:"):
        return contextlib.nullcontext()
    unguarded = "two fits creating this new store's tables at once would fail"
    return file_locks.held(f"{db}.lock", Path(db).parent, unguarded)


FAIL_FAST = {  # MLflow's own HTTP settings for the first request to a server (see fail_fast)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """MLflow's HTTP retries cut short for the first request, where the user has not set them.

    MLflow retries a failed request 7 times with a backoff doubling from 2 s (about 4 minutes)
    and waits 120 s for an answer: right while a run logs, but a mistyped or unreachable
    ``mlflow_tracking_uri`` would hold the fit that long before its one-line error. MLflow reads
    these variables at each request, so the run's later requests keep MLflow's defaults."""
    unset = {key: value for key, value in FAIL_FAST.items() if key not in os.environ}
    os.environ.update(unset)
    try:
        yield
    finally:
        for key in unset:
            os.environ.pop(key, None)


def contact_mlflow(uri: str, project: str) -> None:
    """The first request to a tracking server, under :func:`fail_fast`: it asks for the project's
    experiment and creates nothing there. A local store (``sqlite:``, ``file:``, a path) is created
    when the run opens, so it is left alone here. A URI is told by its scheme, not by ``://``: a
    mistyped one (``http:/host:5000``, ``htp:/host``) is contacted, and refused, here too."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file", "sqlite") or len(scheme) == 1:  # a path (C:\\ on Windows), a local store
        return
    from mlflow.tracking import MlflowClient

    with _quiet_mlflow(), fail_fast():
        MlflowClient(tracking_uri=uri).get_experiment_by_name(project)


class MLflow:
    """An MlflowClient on one run (no global active run); on resume it skips the steps the store holds."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, root: Path, run_name: str, recipe: Recipe, resumed_id: str | None):
        from mlflow.tracking import MlflowClient

        section = recipe.logging
        local = section.mlflow_tracking_uri is None
        if local:
            root.mkdir(parents=True, exist_ok=True)
        self.uri = section.mlflow_tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        artifacts = (root / "mlflow-artifacts").resolve().as_uri() if local else None
        with _quiet_mlflow(), _store_lock(self.uri):  # MlflowClient creates a new SQLite store's tables
            self.client = MlflowClient(tracking_uri=self.uri)
            with fail_fast():  # the first contact: a store that cannot be reached fails here
                experiment = self.client.get_experiment_by_name(section.project)
            self._last: dict[str, int] = {}  # metric -> last step the store holds (a resumed run)
            self.run_id = resumed_id if resumed_id and self._reopen(resumed_id) else None
            if self.run_id is None:
                experiment_id = self._experiment_id(experiment, section.project, artifacts)
                self.run_id = self._new_run(experiment_id, run_name, recipe)

    def _experiment_id(self, experiment, project: str, artifacts: str | None) -> str:
        """The project's experiment, created if new: on a server another fit may create it at the
        same moment (a local store's lock rules that out), and then its experiment is the one."""
        from mlflow.exceptions import MlflowException

        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(project, artifact_location=artifacts)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(project)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _new_run(self, experiment_id: str, run_name: str, recipe: Recipe) -> str:
        """A run tagged with its output_dir, the recipe as its params."""
        from mlflow.entities import Param

        tags = {"mergeopt.output_dir": str(Path(recipe.output_dir).resolve())}
        run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, v[:500]) for k, v in flatten(recipe_tree(recipe)).items()]
        for first in range(0, len(params), 100):  # log_batch takes 100 params at most
            self.client.log_batch(run_id, params=params[first : first + 100])
        return run_id

    def _reopen(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # deleted, or another store: a new run
            return False
        for key in run.data.metrics:
            self._last[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        self.client.update_run(run_id, status="RUNNING")
        return True

    def where(self) -> str:
        db = self.uri.removeprefix("sqlite:///")
        shown = f"mlflow ui --backend-store-uri {self.uri}" if db != self.uri else self.uri
        return f"run {self.run_id} ({shown})"

    def _metrics(self, metrics: Mapping[str, float], step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._last.get(k, -1)]

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        batch = self._metrics(metrics, step)
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, summary: Mapping[str, float], step: int, mixture: dict) -> None:
        self.client.log_batch(self.run_id, metrics=self._metrics(summary, step))
        self.client.log_dict(self.run_id, mixture, "mixture.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


class Wandb:
    """wandb.init in offline mode unless the recipe says online; the resumed run keeps its id."""

    name = "wandb"

    def __init__(self, root: Path, run_name: str, recipe: Recipe, resumed_id: str | None):
        import wandb

        section = recipe.logging
        root.mkdir(parents=True, exist_ok=True)
        self.offline = section.wandb_mode == "offline"
        self.run = wandb.init(
            dir=str(root),
            project=section.project,
            name=run_name,
            id=resumed_id,
            resume="allow" if resumed_id else None,
            reinit="create_new",  # a run the caller has open stays open and is not written to
            mode=section.wandb_mode,
            config=recipe_tree(recipe),
            # console="off": W&B leaves stdout and stderr alone (the progress bars, the summary)
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )
        self.run_id = self.run.id
        self.dir = root / "wandb"

    def where(self) -> str:
        return f"{self.dir} (wandb sync {self.dir})" if self.offline else str(self.run.url)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float], step: int, mixture: dict) -> None:
        self.run.summary.update(dict(summary))

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
