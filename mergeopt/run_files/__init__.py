"""The files a run leaves behind, one pydantic model each: mixture.json, rank_report.json,
calibration.json, transfer_report.json, diagnose.json.

A run directory is a contract between the command that writes it and everything that reads it
later: ``mergeopt merge`` and ``mergeopt export`` read mixture.json, the report and the analysis
notebook read them all, and so do users' own scripts. So each file has one model here that the
writer validates through before it writes and every reader validates through after it reads, and a
``schema_version``. A file from a newer mergeopt (a larger ``schema_version``) is refused in one
line rather than misread; files written before versioning are read as version 1. The JSON Schemas
in the docs are generated from these models (``python -m mergeopt.run_files DIR``), so they cannot
drift from what is written.

One module per file family: ``mixture`` (mixture.json), ``reports`` (rank_report.json,
calibration.json, transfer_report.json), ``diagnose`` (diagnose.json), the shared base in ``base``
and reading in ``reading``. Everything a caller needs is importable from here.

Readers are tolerant within a version: keys an older 0.x release wrote and later dropped (e.g.
``temperature``) are kept aside as extras, not refused. Writers are not: a test checks that a fresh
run's files have no extra keys.
"""

from mergeopt.run_files.base import SCHEMA_VERSION, RunFile
from mergeopt.run_files.diagnose import (
    DiagnoseFile,
    DiagnosticFlag,
    EdgeDiagnostics,
    LossDiagnostics,
    SignConflicts,
    TaskVectorDiagnostics,
)
from mergeopt.run_files.mixture import MixtureConstraints, MixtureFile, MixtureGroup
from mergeopt.run_files.reading import (
    RUN_FILES,
    json_schemas,
    read_finished_mixture,
    read_run_file,
    validated,
)
from mergeopt.run_files.reports import (
    CalibratedMixture,
    CalibrationPick,
    CalibrationProposal,
    CalibrationReport,
    RankReport,
    RankStatistics,
    TransferComparison,
    TransferReport,
    TransferStatistics,
)

__all__ = [
    "RUN_FILES",
    "SCHEMA_VERSION",
    "CalibratedMixture",
    "CalibrationPick",
    "CalibrationProposal",
    "CalibrationReport",
    "DiagnoseFile",
    "DiagnosticFlag",
    "EdgeDiagnostics",
    "LossDiagnostics",
    "MixtureConstraints",
    "MixtureFile",
    "MixtureGroup",
    "RankReport",
    "RankStatistics",
    "RunFile",
    "SignConflicts",
    "TaskVectorDiagnostics",
    "TransferComparison",
    "TransferReport",
    "TransferStatistics",
    "json_schemas",
    "read_finished_mixture",
    "read_run_file",
    "validated",
]
