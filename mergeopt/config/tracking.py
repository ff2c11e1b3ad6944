"""The logging section: the experiment trackers that receive a fit's curves as it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mergeopt.config.base import Section, named_once


class LoggingSection(Section):
    """Experiment trackers that receive the fit's curves as it runs (mergeopt.reporting.tracking)."""

    backends: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = Field(
        default=(),
        description="Trackers to write to, several at once allowed: tensorboard, mlflow, wandb; "
        "none: nothing is logged (trace.csv / evaluations.csv are written either way).",
    )
    dir: str | None = Field(
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
