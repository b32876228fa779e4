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
from ._runtime import AsyncTidebase, Run, Tidebase

__all__ = [
    "AsyncTidebase",
    "CheckpointSerializationError",
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
    "current_run",
    "idempotency_key",
]
