"""diagnose.json: the experts' task vectors and the loss between them (``mergeopt diagnose``).

Every part is strict (no extra keys), because only this version of mergeopt writes it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergeopt.run_files.base import RunFile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignConflicts(_Strict):
    """TIES sign conflicts of the task vectors, each trimmed to its top ``density`` by magnitude."""

    density: float = Field(
        description="The trim: each τ_i keeps its int(density · n) largest entries per tensor."
    )
    contested: int = Field(description="Entries where at least two trimmed task vectors are non-zero.")
    conflicting: int = Field(description="Contested entries whose non-zero values do not all share a sign.")
    rate: float | None = Field(description="conflicting / contested (null: nothing contested).")
    per_layer: list[float | None] = Field(description="The rate within each layer (``layers``' order).")
    pairwise: list[list[float | None]] = Field(
        description="Row i, column j: among entries non-zero in both τ_i and τ_j, the share of opposite signs."
    )


class TaskVectorDiagnostics(_Strict):
    """Norms and angles of τ_i = θ_i − θ0 (the prepared τ'_i for ties/dare) over the merged parameters."""

    vectors: Literal["task vectors", "prepared task vectors"] = Field(
        description="'prepared task vectors' when merge.method is ties or dare (what the proxy merges)."
    )
    entries: int = Field(description="Merged parameter entries counted.")
    base_norm: float = Field(description="‖θ0‖ over the merged parameters.")
    norm: dict[str, float] = Field(description="‖τ_i‖ per expert.")
    relative_norm: dict[str, float | None] = Field(description="‖τ_i‖ / ‖θ0‖ per expert.")
    relative_norm_per_layer: dict[str, list[float | None]] = Field(
        description="Per expert, ‖τ_i‖ / ‖θ0‖ within each layer (``layers``' order)."
    )
    cosine: list[list[float | None]] = Field(
        description="Row i, column j: cos(τ_i, τ_j), experts in ``experts``' order."
    )
    cosine_per_layer: list[list[list[float | None]]] = Field(description="One such matrix per layer.")
    sign_conflicts: SignConflicts


class LossDiagnostics(_Strict):
    """Dev losses of the base and of each expert alone; keys: 'target' and each dev set."""

    base: dict[str, float] = Field(description="θ0 (the merge at w = 0).")
    experts: dict[str, dict[str, float]] = Field(description="Each expert alone (w one-hot).")
    improvement: dict[str, dict[str, float]] = Field(
        description="L(θ0) − L(θ_i): positive when the expert helps."
    )
    share: dict[str, dict[str, float | None]] = Field(
        description="max(improvement, 0) over its sum across the experts (null when no expert improves)."
    )


class EdgeDiagnostics(_Strict):
    """Dev loss along the segment between two experts, w = (1 − t) e_i + t e_j."""

    experts: list[str] = Field(description="Two experts: t = 0 is the first, t = 1 the second.")
    t: list[float]
    target: list[float] = Field(description="The target dev loss at each t.")
    per_set: dict[str, list[float]] = Field(description="Each dev set's loss at each t.")
    barrier: float = Field(description="max_t L(t) − ((1 − t) L(0) + t L(1)): height above the chord.")
    relative_barrier: float | None = Field(
        description="barrier / ((L(0) + L(1)) / 2): the height as a share of the experts' loss."
    )
    convex: bool = Field(description="Every second difference of the target loss is ≥ −tolerance.")
    min_second_difference: float | None = Field(description="The smallest L(t−h) − 2 L(t) + L(t+h).")


class DiagnosticFlag(_Strict):
    """A condition under which the proxy is known, or suspected, to degrade."""

    kind: Literal["norm_outlier", "large_barrier", "conflicting_task_vectors", "redundant_experts", "no_gain"]
    experts: list[str]
    value: float = Field(description="The number compared with the threshold.")
    threshold: float
    message: str


class DiagnoseFile(RunFile):
    """diagnose.json: the experts' task vectors and the loss between them (``mergeopt diagnose``)."""

    FILE: ClassVar[str] = "diagnose.json"

    experts: list[str]
    dev_sets: list[str]
    target: str | None = Field(description="data.target: the dev set(s) the target loss weighs.")
    method: dict[str, Any] = Field(description="The merge the proxy uses (name, scale, options).")
    stack_dtype: str = Field(description="model.stack_dtype: the numbers include its rounding.")
    points: int = Field(description="Points per edge, both experts included.")
    layers: list[str] = Field(description="Layer names, in the model's order.")
    task_vectors: TaskVectorDiagnostics
    losses: LossDiagnostics
    edges: list[EdgeDiagnostics]
    flags: list[DiagnosticFlag]
    thresholds: dict[str, float] = Field(description="The thresholds the flags were raised with.")
    mergeopt_version: str
