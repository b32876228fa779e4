"""tidebase-agents: durable OpenAI Agents SDK pipelines checkpointed in your own database."""

from ._context import NotInRun, current_run, idempotency_key
from ._errors import (
    CheckpointSerializationError,
    ConfigurationError,
    DatabaseUnavailable,
    LeaseLost,
    PayloadTooLarge,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunLocked,
    RunNotFound,
    SchemaNotMigrated,
    StepFailed,
    StepInputMismatch,
    StepNeedsReview,
    TidebaseError,
)
from ._pipeline import CheckpointedPipeline, checkpointed_pipeline
from ._runtime import AsyncTidebase, Run, Tidebase
from ._tools import durable_tool

__all__ = [
    "AsyncTidebase",
    "CheckpointSerializationError",
    "CheckpointedPipeline",
    "ConfigurationError",
    "DatabaseUnavailable",
    "LeaseLost",
    "NotInRun",
    "PayloadTooLarge",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunLocked",
    "RunNotFound",
    "SchemaNotMigrated",
    "StepFailed",
    "StepInputMismatch",
    "StepNeedsReview",
    "Tidebase",
    "TidebaseError",
    "checkpointed_pipeline",
    "current_run",
    "durable_tool",
    "idempotency_key",
]
