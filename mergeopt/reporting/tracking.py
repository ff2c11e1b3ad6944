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
URI, no W&B login online) stops the fit in one line before the search starts, within seconds for
an unreachable MLflow server (:func:`mergeopt.reporting.trackers.fail_fast`).

Fits may share one ``logging.dir`` (a sweep, a Slurm array): a new SQLite store is created under
a file lock, and a TensorBoard run folder belongs to one output_dir, so a second output_dir with
the same run name gets ``NAME-2`` in every tracker (:mod:`mergeopt.reporting.trackers`).

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
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergeopt.config import LoggingSection, Recipe
from mergeopt.errors import Interrupted, UserError, warn
from mergeopt.reporting import trackers
from mergeopt.runtime import distributed
from mergeopt.runtime.resume import RunState, recipe_tree

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


def check_can_start(recipe: Recipe) -> None:
    """Refuse, in one line before any work, a tracker that could not start: a logging directory
    under a file, an MLflow tracking server that does not answer (or a URI MLflow cannot use).

    The trackers open only once the model is loaded (a run in the tracker belongs to a fit that got
    that far), so without this check a mistyped ``mlflow_tracking_uri`` was said after the world's
    build, the base model's loading and the experts' stacking: minutes on a large model."""
    section = recipe.logging
    local = [b for b in section.backends if b != "mlflow" or section.mlflow_tracking_uri is None]
    if local:
        root = log_dir(recipe)
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise UserError(
                f"logging.backends: {local[0]} cannot write to {root}: {existing} is not a directory"
            )
    if "mlflow" in section.backends and section.mlflow_tracking_uri is not None:
        try:
            trackers.contact_mlflow(section.mlflow_tracking_uri, section.project)
        except Exception as err:
            raise UserError(
                f"logging.backends: mlflow could not start ({type(err).__name__}: {err})"
            ) from err


def _where(recipe: Recipe) -> dict[str, str | None]:
    """What places a tracked run: kept with its run ids, so that a resume continues it there."""
    section = recipe.logging
    return {
        "logging.project": section.project,
        "logging.dir": str(log_dir(recipe).resolve()),
        "logging.mlflow_tracking_uri": section.mlflow_tracking_uri,
    }


def check_resumed(recipe: Recipe, checkpoint: RunState) -> None:
    """Refuse, in one line before the model is loaded, a resume that would split a tracked run.

    A resumed fit reopens the MLflow and W&B runs by the ids its checkpoint keeps. With another
    ``logging.project`` MLflow went on in the first project's experiment and W&B wrote the rest of
    the run under the new project (``wandb sync`` then uploads two halves); with another
    ``logging.dir`` or MLflow store the run id was not found there and a new run held only the
    steps from the checkpoint on. Checkpoints written before the place was kept are not checked."""
    saved = checkpoint.load_tracking()
    kept = saved.get("where")
    reopened = [b for b in ("mlflow", "wandb") if b in recipe.logging.backends and saved.get(b)]
    if not isinstance(kept, dict) or not reopened:
        return
    now = _where(recipe)
    local = "wandb" in reopened or recipe.logging.mlflow_tracking_uri is None  # a server is not in dir
    keys = ["logging.project", *(["logging.dir"] if local else [])]
    keys += ["logging.mlflow_tracking_uri"] if "mlflow" in reopened else []
    runs = " and ".join(reopened) + (" runs" if len(reopened) > 1 else " run")
    for key in keys:
        if key in kept and kept[key] != now[key]:
            raise UserError(
                f"{key} differs: {kept[key]!r} in the checkpoint's tracked runs, {now[key]!r} now; the "
                f"resumed fit continues its {runs} there: set {key} back, or --restart for new runs"
            )


def log_dir(recipe: Recipe) -> Path:
    """Where the trackers write: logging.dir, by default OUTPUT_DIR/logs."""
    return Path(recipe.logging.dir) if recipe.logging.dir else Path(recipe.output_dir) / "logs"


def metric_name(name: str) -> str:
    return _NOT_PORTABLE.sub("_", name)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


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


def _open(kind: str, root: Path, run_name: str, recipe: Recipe, resumed_id: str | None, resuming: bool):
    if kind == "tensorboard":
        text = yaml.safe_dump(recipe_tree(recipe), sort_keys=False)
        return trackers.TensorBoard(root, run_name, text, str(Path(recipe.output_dir).resolve()), resuming)
    if kind == "mlflow":
        return trackers.MLflow(root, run_name, recipe, resumed_id)
    return trackers.Wandb(root, run_name, recipe, resumed_id)


def joining(backends: Sequence[str], saved: Mapping) -> list[str]:
    """The backends a resumed fit opens that its checkpoint's fit did not log to (none for a
    checkpoint that did not record its backends, or a fit that is not resumed)."""
    before = saved.get("backends")
    return [] if not isinstance(before, list) else [k for k in backends if k not in before]


def _record(checkpoint: RunState, saved: Mapping, ids: dict, recipe: Recipe) -> None:
    """tracking.json: the run ids of the backends opened now, where they log, and the backends.
    The ids an earlier attempt kept for backends left off now stay, for a resume that turns them on
    again; with no run id to keep (TensorBoard alone, or no backend) so does the place they log,
    and a fit not resumed writes it with its checkpoint's first save, not before."""
    earlier = {k: v for k, v in saved.items() if k != "backends"}  # a backend left off keeps its id
    kept = {**earlier, **ids, "where": _where(recipe)} if ids else earlier
    checkpoint.save_tracking({**kept, "backends": list(recipe.logging.backends)}, lazily=not ids)


@contextlib.contextmanager
def tracked(
    recipe: Recipe, checkpoint: RunState, resuming: bool, log: Callable[[str], None] = print
) -> Iterator[Tracker]:
    """The recipe's trackers for the duration of a fit (none on ranks other than 0).

    A resumed run reopens the runs whose ids the checkpoint holds. The runs end as finished,
    interrupted (SIGINT/SIGTERM: resumable) or failed, with the block. With TensorBoard among the
    backends, a run name another output_dir's run holds in ``DIR/tensorboard`` becomes ``NAME-2``
    (and so on) in every tracker, and the log line says so.
    """
    section = recipe.logging
    if not distributed.is_main():
        yield Tracker()
        return
    saved = checkpoint.load_tracking() if resuming else {}
    if not section.backends:  # recorded, so that a backend added on a resume is said to join
        _record(checkpoint, saved, {}, recipe)
        yield Tracker()
        return
    root = log_dir(recipe)
    run_name = section.run_name or Path(recipe.output_dir).resolve().name
    tracker = Tracker()
    try:  # TensorBoard first: the folder it claims names the run in the other trackers too
        for kind in sorted(section.backends, key=lambda k: k != "tensorboard"):
            backend = _open(kind, root, run_name, recipe, saved.get(kind), resuming)
            if kind == "tensorboard":
                run_name = backend.run_name
            tracker.backends.append(backend)
            log(f"logging to {kind}: {backend.where()}")
    except Exception as err:
        tracker.close("failed")
        if isinstance(err, UserError):
            raise
        raise UserError(f"logging.backends: {kind} could not start ({type(err).__name__}: {err})") from err
    for kind in joining(section.backends, saved):
        warn(
            f"logging.backends: {kind} joins on this resume: its run holds what the fit logs from the "
            "checkpoint on (the earlier steps and evaluations are in trace.csv and evaluations.csv)"
        )
    _record(checkpoint, saved, {b.name: b.run_id for b in tracker.backends if b.run_id is not None}, recipe)
    status = "failed"
    try:
        yield tracker
        status = "finished"
    except Interrupted:
        status = "interrupted"
        raise
    finally:
        tracker.close(status)
