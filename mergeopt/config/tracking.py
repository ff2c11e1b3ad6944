"""The logging section: the experiment trackers that receive a fit's curves as it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from mergeopt.config.base import PathText, Section, changed_options, named_once

WANDB_PROJECT_CHARACTERS = "/\\#?%:"  # what W&B refuses in a project name (wandb.Settings.validate_project)
WANDB_PROJECT_LENGTH = 128


class LoggingSection(Section):
    """Experiment trackers that receive the fit's curves as it runs (mergeopt.reporting.tracking)."""

    backends: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = Field(
        default=(),
        description="Trackers to write to, several at once allowed: tensorboard, mlflow, wandb; "
        "none: nothing is logged (trace.csv / evaluations.csv are written either way).",
    )
    dir: PathText | None = Field(
        default=None,
        description="Where the trackers write (tensorboard/, mlflow.db, wandb/); default <output_dir>/logs.",
    )
    project: str = Field(
        default="mergeopt", description="The MLflow experiment and the W&B project the run is logged in."
    )
    run_name: str | None = Field(
        default=None, description="The run's name in the trackers; default: the last folder of output_dir."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow's store; default a local SQLite file, sqlite:///<dir>/mlflow.db, its "
        "artifacts beside it. A server URI (http://...) sends the run over the network.",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        default="offline",
        description="offline: W&B writes <dir>/wandb for a later `wandb sync`, no network; online: "
        "uploads as it runs (needs `wandb login`).",
    )

    @field_validator("backends", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, backends: Any) -> Any:
        return (backends,) if isinstance(backends, str) else backends  # logging.backends=mlflow

    @field_validator("backends")
    @classmethod
    def _once_each(cls, backends: tuple[str, ...]) -> tuple[str, ...]:
        return named_once(backends, "a backend")

    @field_validator("run_name")
    @classmethod
    def _a_folder_name(cls, name: str | None, info: ValidationInfo) -> str | None:
        """With TensorBoard the run's name is also its folder under logging.dir: a path (``../x``,
        ``a/b``) wrote outside it or into nested folders, and an empty name into logging.dir itself.
        MLflow and W&B take any name."""
        if name is None or "tensorboard" not in info.data.get("backends", ()):
            return name
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                f"{name!r} is not a run name: it names the run's TensorBoard folder under logging.dir, "
                "so it needs a name without / or \\ (not empty, . or ..)"
            )
        return name

    @field_validator("project")
    @classmethod
    def _a_project_name(cls, project: str, info: ValidationInfo) -> str:
        """Refused with the recipe, not by MLflow or ``wandb.init`` once the model is loaded and the
        experts stacked. W&B's rules (wandb.Settings.validate_project) hold only for a recipe logging
        to W&B: MLflow takes these characters (Databricks experiments are paths)."""
        if not project.strip():  # MLflow refuses an empty experiment; W&B would log to a nameless project
            raise ValueError("is empty: name the MLflow experiment and W&B project (default mergeopt)")
        if "wandb" not in info.data.get("backends", ()):
            return project
        found = [c for c in WANDB_PROJECT_CHARACTERS if c in project]
        if found:
            raise ValueError(
                f"{project!r} is not a W&B project name: it contains {' '.join(found)} "
                f"(W&B refuses {' '.join(WANDB_PROJECT_CHARACTERS)})"
            )
        if len(project) > WANDB_PROJECT_LENGTH:
            raise ValueError(
                f"is not a W&B project name: {len(project)} characters, W&B takes {WANDB_PROJECT_LENGTH} at most"
            )
        return project

    def unused_options(self) -> list[str]:
        """The options set away from their defaults that no chosen backend reads: without
        ``logging.backends`` a ``logging.mlflow_tracking_uri`` logged nothing anywhere, and the fit
        did not say so. Warned, not refused (a recipe may keep a tracker's settings and turn it on
        with ``logging.backends=...``)."""
        readers = {
            "dir": ("tensorboard", "mlflow", "wandb"),
            "project": ("mlflow", "wandb"),
            "run_name": ("tensorboard", "mlflow", "wandb"),
            "mlflow_tracking_uri": ("mlflow",),
            "wandb_mode": ("wandb",),
        }
        unused = []
        for option, value in changed_options(self):
            backends = readers.get(option)  # None: logging.backends itself
            if backends is not None and not set(backends) & set(self.backends):
                read_by = " or ".join(backends)
                unused.append(
                    f"logging.{option} {value} is read by the {read_by} backend, not in logging.backends"
                )
        return unused
