"""Experiment tracking: the fit's curves, as it runs, in TensorBoard, MLflow or Weights & Biases.

trace.csv and evaluations.csv appear when a fit ends, in mergeopt's own format. People who
fine-tune with torchtune or axolotl watch their runs live in one of these three trackers and
compare runs there, so a fit with ``logging.backends`` set writes to them too, through each
library's own writer, with no network unless the recipe asks for it:

* ``tensorboard``: event files in ``DIR/tensorboard/RUN_NAME`` (``tensorboard --logdir DIR/tensorboard``);
* ``mlflow``: a local SQLite store ``DIR/mlflow.db``, artifacts in ``DIR/mlflow-artifacts``
  (``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``), or ``logging.mlflow_tracking_uri``;
* ``wandb``: an offline run in ``DIR/wandb`` (``wandb sync DIR/wandb`` uploads it), or online.

``DIR`` is ``logging.dir``, by default ``OUTPUT_DIR/logs``. What is logged: per gradient step the
step's training ``loss``, the ``heldout_loss`` on evaluation steps and each expert's weight
``w/NAME`` (the step number is the trace's); per real zero-order evaluation, at its index in
evaluations.csv, each term's ``score/LABEL``, the objective ``value`` (not for the experts scored
before a normalisation over them exists) and ``w/NAME``; at the end the recommended mixture
(``mixture/NAME``), the final losses (``final/...``), the search's counts (``search/...``) and the
rank check's statistics (``rank/...``), plus the recipe as parameters (MLflow params, W&B config,
TensorBoard text). Names keep letters, digits, ``_-./`` and spaces (the characters MLflow takes
on every platform); any other becomes ``_`` (a term ``loss:all`` is ``score/loss_all``), in
every tracker alike.

Only rank 0 logs under torchrun. A tracker that fails mid-run is dropped with a warning: hours
of fitting are not lost to a full disk or a crashed W&B service; one that cannot open (a bad
URI, no W&B login online) stops the fit in one line before the search starts.

A resumed fit continues the same tracked run: the MLflow and W&B run ids are kept in the
checkpoint (``tracking.json``). The gradient strategy reruns the steps from its last checkpoint
to the interruption; TensorBoard hides the first attempt's events from that step on (the event
file's ``purge_step``), MLflow skips the steps its store already holds, and W&B, whose offline
files its client cannot read back, writes them again in the resumed run's own offline file
(``wandb sync`` uploads the run's files in order). W&B flushes that file every 15 s and when the
run finishes, which a fit stopped by SIGINT or SIGTERM does; after a ``kill -9`` the first file
holds only what was flushed, so W&B may lack the steps before the checkpoint (trace.csv has
them). Zero-order evaluations replayed from the checkpoint are not logged again; an evaluation is
logged before it is journaled, so one interrupted between the two is logged twice, and
TensorBoard and MLflow drop that copy as above.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from mergeopt.config import LoggingSection, Recipe
from mergeopt.errors import UserError
from mergeopt.runtime import distributed
from mergeopt.runtime.resume import Interrupted, RunState, recipe_tree

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> import name
_NOT_PORTABLE = re.compile(r"[^\w\-. /]")


def check_installed(section: LoggingSection) -> None:
    """Refuse, in one line before any work, a backend whose library is not installed."""
    missing = [b for b in section.backends if importlib.util.find_spec(PACKAGES[b]) is None]
    if missing:
        packages = " ".join(PACKAGES[b] for b in missing)
        raise UserError(
            f"logging.backends names {', '.join(missing)}, not installed here: pip install {packages} "
            "(or pip install 'mergeopt[tracking]' for all three)"
        )


def log_dir(recipe: Recipe) -> Path:
    """Where the trackers write: logging.dir, by default OUTPUT_DIR/logs."""
    return Path(recipe.logging.dir) if recipe.logging.dir else Path(recipe.output_dir) / "logs"


def metric_name(name: str) -> str:
    return _NOT_PORTABLE.sub("_", name)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted keys (lists indexed), values as text: MLflow's params."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix.rstrip("."): json.dumps(tree) if tree is None or tree == [] else str(tree)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


# ----------------------------------------------------------------------------- backends


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


class _TensorBoard:
    """torch's SummaryWriter; created at the first step logged, with that step as purge_step."""

    name = "tensorboard"
    run_id = None

    def __init__(self, root: Path, run_name: str, recipe_text: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class = SummaryWriter
        self.dir = root / "tensorboard" / run_name
        self._recipe_text = recipe_text
        self._writer = None

    def where(self) -> str:
        return f"{self.dir} (tensorboard --logdir {self.dir.parent})"

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


class _MLflow:
    """An MlflowClient on one run (no global active run); on resume it skips the steps the store holds."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, root: Path, run_name: str, recipe: Recipe, resumed_id: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        section = recipe.logging
        local = section.mlflow_tracking_uri is None
        if local:
            root.mkdir(parents=True, exist_ok=True)
        self.uri = section.mlflow_tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        with _quiet_mlflow():
            self.client = MlflowClient(tracking_uri=self.uri)
            self._last: dict[str, int] = {}  # metric -> last step the store holds (a resumed run)
            self.run_id = resumed_id if resumed_id and self._reopen(resumed_id, MlflowException) else None
            if self.run_id is None:
                experiment = self.client.get_experiment_by_name(section.project)
                if experiment is not None:
                    experiment_id = experiment.experiment_id
                else:
                    artifacts = (root / "mlflow-artifacts").resolve().as_uri() if local else None
                    experiment_id = self.client.create_experiment(
                        section.project, artifact_location=artifacts
                    )
                tags = {"mergeopt.output_dir": str(Path(recipe.output_dir).resolve())}
                run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
                self.run_id = run.info.run_id
                params = [Param(k, v[:500]) for k, v in _flatten(recipe_tree(recipe)).items()]
                for first in range(0, len(params), 100):  # log_batch takes 100 params at most
                    self.client.log_batch(self.run_id, params=params[first : first + 100])

    def _reopen(self, run_id: str, missing: type[Exception]) -> bool:
        try:
            run = self.client.get_run(run_id)
        except missing:  # deleted, or another store: a new run
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


class _Wandb:
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


# ----------------------------------------------------------------------------- the fan-out


class Tracker:
    """The fit's events (a gradient step, a zero-order evaluation, the end) to every open backend.

    With no backend every method does nothing, so the search code calls it unconditionally. A
    backend that raises while logging is dropped with a warning and the fit goes on.
    """

    def __init__(self, backends: list | None = None):
        self.backends = list(backends or [])

    def _each(self, call: Callable[[Any], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as err:  # a tracker's failure is not the fit's
                self.backends.remove(backend)
                with contextlib.suppress(Exception):
                    backend.close("failed")
                warnings.warn(
                    f"logging to {backend.name} failed ({type(err).__name__}: {err}); the fit goes on without it",
                    stacklevel=2,
                )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.backends:
            metrics = {metric_name(k): float(v) for k, v in metrics.items() if _finite(v)}
            self._each(lambda backend: backend.log(metrics, step))

    def step(self, row: Mapping[str, Any]) -> None:
        """One row of the gradient trace: step, loss, heldout_loss (NaN when not measured), w_NAME."""
        metrics = {"loss": row["loss"], "heldout_loss": row["heldout_loss"]}
        metrics.update({f"w/{k[2:]}": v for k, v in row.items() if k.startswith("w_")})
        self._log(metrics, int(row["step"]))

    def evaluation(self, row: Mapping[str, Any]) -> None:
        """One real zero-order evaluation: index, phase, w_NAME, each term's score, value if known."""
        metrics = {"value": row.get("value", math.nan)}
        for key, value in row.items():
            if key.startswith("w_"):
                metrics[f"w/{key[2:]}"] = value
            elif key not in ("index", "phase", "value", "seconds"):
                metrics[f"score/{key}"] = value
        self._log(metrics, int(row["index"]))

    def finish(self, mixture: dict, extra: Mapping[str, float] | None = None) -> None:
        """The recommended mixture and the run's closing numbers, as summary values, with ``extra``
        ones (the measured peak of GPU memory, :mod:`mergeopt.memory.measured`)."""
        if not self.backends:
            return
        summary = {f"mixture/{n}": w for n, w in mixture["weights"].items()}
        summary.update(extra or {})
        keys = ("dev_loss", "heldout_loss", "uniform_dev_loss", "uniform_heldout_loss")
        summary.update({f"final/{k}": mixture[k] for k in keys})
        summary.update({f"final/expert_dev_loss/{n}": v for n, v in mixture["expert_dev_loss"].items()})
        summary.update({f"search/{k}": v for k, v in mixture["search"].items() if _finite(v)})
        summary.update({f"rank/{k}": v for k, v in mixture.get("rank", {}).items() if _finite(v)})
        summary = {metric_name(k): float(v) for k, v in summary.items() if _finite(v)}
        search = mixture["search"]  # the closing values sit at the last step or evaluation index
        step = search["steps"] if "steps" in search else search["evaluations"] - 1
        self._each(lambda backend: backend.finish(summary, step, mixture))

    def close(self, status: str) -> None:
        self._each(lambda backend: backend.close(status))
        self.backends = []


def _open(kind: str, root: Path, run_name: str, recipe: Recipe, resumed_id: str | None):
    if kind == "tensorboard":
        return _TensorBoard(root, run_name, yaml.safe_dump(recipe_tree(recipe), sort_keys=False))
    if kind == "mlflow":
        return _MLflow(root, run_name, recipe, resumed_id)
    return _Wandb(root, run_name, recipe, resumed_id)


@contextlib.contextmanager
def tracked(
    recipe: Recipe, checkpoint: RunState, resuming: bool, log: Callable[[str], None] = print
) -> Iterator[Tracker]:
    """The recipe's trackers for the duration of a fit (none on ranks other than 0).

    A resumed run reopens the runs whose ids the checkpoint holds. The runs end as finished,
    interrupted (SIGINT/SIGTERM: resumable) or failed, with the block.
    """
    section = recipe.logging
    if not section.backends or not distributed.is_main():
        yield Tracker()
        return
    root = log_dir(recipe)
    run_name = section.run_name or Path(recipe.output_dir).resolve().name
    saved = checkpoint.load_tracking() if resuming else {}
    tracker = Tracker()
    try:
        for kind in section.backends:
            backend = _open(kind, root, run_name, recipe, saved.get(kind))
            tracker.backends.append(backend)
            log(f"logging to {kind}: {backend.where()}")
    except Exception as err:
        tracker.close("failed")
        if isinstance(err, UserError):
            raise
        raise UserError(f"logging.backends: {kind} could not start ({type(err).__name__}: {err})") from err
    ids = {b.name: b.run_id for b in tracker.backends if b.run_id is not None}
    if ids:
        checkpoint.save_tracking(ids)
    status = "failed"
    try:
        yield tracker
        status = "finished"
    except Interrupted:
        status = "interrupted"
        raise
    finally:
        tracker.close(status)
