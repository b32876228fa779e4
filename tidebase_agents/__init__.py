"""tidebase-agents: durable OpenAI Agents SDK pipelines checkpointed in your own database."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ._tools import durable_tool


def __getattr__(name: str) -> Any:
    # The Agents SDK loads on first use of durable_tool, so the CLI and workers start fast.
    if name == "durable_tool":
        from ._tools import durable_tool

        return durable_tool
    raise AttributeError(f"module 'tidebase_agents' has no attribute {name!r}")


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
