"""The memory plan as a JSON document (``mergeopt plan --json``), for scripts that sweep recipes.

A team choosing K, the stack dtype, the batch or the number of GPUs plans many recipes and keeps the
ones that fit; parsing the printed table for that would tie their scripts to its layout. The
document carries the same rows, in bytes, with the verdict's parts as fields; read it back with
``PlanDocument.model_validate_json``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mergeopt.memory.sizes import GIB, Inventory, MemoryPlan, Row

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanRow(_Strict):
    label: str = Field(description="What the row holds, as the table prints it.")
    bytes: int = Field(description="Per rank under torchrun.")
    gib: float = Field(description="bytes / 2**30, rounded to 4 decimals.")

    @classmethod
    def of(cls, row: Row) -> PlanRow:
        return cls(label=row.label, bytes=row.bytes, gib=round(row.bytes / GIB, 4))


class PlanDevice(_Strict):
    name: str = Field(
        description="The device the recipe resolves to (cuda for --device-memory with device auto)."
    )
    description: str
    total: int | None = Field(description="Bytes; None where the device is not visible here.")
    free: int | None = Field(
        description="Bytes free now (all of it for --device-memory); None where unknown."
    )


class PlanStacked(_Strict):
    parameters: int
    tensors: int
    excluded_tensors: int
    adapters_only: bool = Field(
        description="LoRA experts alone: only what their adapters set densely is stacked."
    )


class PlanSuggestion(_Strict):
    override: str = Field(description="A recipe override, as key=value.")
    saves: int = Field(description="Bytes of peak it saves, re-planned alone.")


class PlanShardedFit(_Strict):
    ranks: int = Field(description="GPUs (torchrun ranks) under model.shard=fsdp.")
    peak: int = Field(description="Bytes of peak on each of them.")


class PlanDocument(_Strict):
    """Everything the printed plan says: the byte rows, the peak, whether it fits the device (None
    where the device's memory cannot be known here) and, when it does not, the overrides that help."""

    schema_version: int = SCHEMA_VERSION
    recipe: str
    overrides: list[str] = Field(description="The key=value overrides the recipe was planned with.")
    world_size: int = Field(description="The ranks the rows are per (1: one process).")
    shard: str = Field(description="model.shard: fsdp splits the matrices' rows over the ranks.")
    device: PlanDevice
    parameters: int
    tensors: int
    experts: int
    stacked: PlanStacked
    source: str = Field(description="Where the shapes were read from.")
    batches: str = Field(description="The batch shapes the phases assume, in words.")
    notes: list[str]
    held: list[PlanRow] = Field(description="Held for the whole run.")
    phases: list[PlanRow] = Field(description="Transient, one at a time: the largest adds to the held rows.")
    peak: int
    peak_gib: float
    fits: bool | None
    spare: int | None = Field(description="free − peak in bytes (negative: short by that much).")
    suggestions: list[PlanSuggestion]
    peak_with_suggestions: int | None = Field(description="The peak with every suggestion applied.")
    suggestions_enough: int | None = Field(
        default=None,
        description="How many of the first suggestions fit together, when fewer than all of them do.",
    )
    sharded_fit: PlanShardedFit | None = Field(
        default=None,
        description="When the plan does not fit a GPU: the fewest GPUs of its memory (2 to 64) over "
        "which model.shard=fsdp fits the recipe as written, and the peak per GPU there.",
    )
    placement: list[str] = Field(description="model.device_map's placement per GPU, as printed.")


def plan_document(
    plan: MemoryPlan, recipe_path: str, overrides: list[str], inventory: Inventory, placement: list[str]
) -> PlanDocument:
    """The document of ``plan`` (:func:`mergeopt.memory.dry_run.make_plan`)."""
    mem = plan.memory
    return PlanDocument(
        recipe=recipe_path,
        overrides=overrides,
        world_size=plan.world_size,
        shard=plan.shard,
        device=PlanDevice(name=mem.device, description=mem.description, total=mem.total, free=mem.free),
        parameters=plan.parameters,
        tensors=plan.tensors,
        experts=plan.num_experts,
        stacked=PlanStacked(
            parameters=plan.stacked_parameters,
            tensors=plan.stacked_tensors,
            excluded_tensors=plan.excluded_tensors,
            adapters_only=plan.adapters_only,
        ),
        source=inventory.source,
        batches=plan.batch,
        notes=list(inventory.notes),
        held=[PlanRow.of(r) for r in plan.held],
        phases=[PlanRow.of(r) for r in plan.phases],
        peak=plan.peak,
        peak_gib=round(plan.peak / GIB, 4),
        fits=plan.fits,
        spare=None if mem.free is None else mem.free - plan.peak,
        suggestions=[PlanSuggestion(override=o, saves=saved) for o, saved in plan.suggestions],
        peak_with_suggestions=plan.combined_peak,
        suggestions_enough=plan.enough,
        sharded_fit=None
        if plan.sharded_fit is None
        else PlanShardedFit(ranks=plan.sharded_fit[0], peak=plan.sharded_fit[1]),
        placement=placement,
    )
