"""What every file a run leaves behind shares: a ``schema_version`` and the writer's own keys.

Readers are tolerant within a version (keys an older release wrote and later dropped are kept aside
as extras, not refused); writers are not: a test checks that a fresh run's files have no extra keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class RunFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    FILE: ClassVar[str]
    schema_version: int = Field(
        default=SCHEMA_VERSION, description="The file format's version; readers refuse a newer one."
    )

    def to_json(self) -> dict[str, Any]:
        """What the writer puts on disk: the fields it set, in declaration order, then any extras."""
        return self.model_dump(exclude_unset=True)
