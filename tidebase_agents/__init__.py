"""tidebase-agents: durable OpenAI Agents SDK pipelines checkpointed in your own database."""

from typing import TYPE_CHECKING, Any

from ._codec import register_types
from ._engine import NotInRun, Run, current_run, idempotency_key
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
    StepNotReviewable,
    TidebaseError,
)
from ._pipeline import CheckpointedPipeline, checkpointed_pipeline
from ._store import EventRecord, RunRecord, StateVersion, StepRecord, UsageRecord
from ._tidebase import AsyncTidebase, Tidebase
from ._vocab import ReplayPolicy, ReviewAction, RunStatus, StepStatus
from ._worker import WorkerOptions, run_worker

if TYPE_CHECKING:
    from ._sdk.streaming import is_replayed
    from ._sdk.tools import durable_tool


def __getattr__(name: str) -> Any:
    # The Agents SDK loads on first use of these, so the CLI and workers start fast.
    if name == "durable_tool":
        from ._sdk.tools import durable_tool

        return durable_tool
    if name == "is_replayed":
        from ._sdk.streaming import is_replayed

        return is_replayed
    raise AttributeError(f"module 'tidebase_agents' has no attribute {name!r}")


__all__ = [
    "AsyncTidebase",
    "CheckpointSerializationError",
    "CheckpointedPipeline",
    "ConfigurationError",
    "DatabaseUnavailable",
    "EventRecord",
    "LeaseLost",
    "NotInRun",
    "PayloadTooLarge",
    "ReplayPolicy",
    "ReviewAction",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunLocked",
    "RunNotFound",
    "RunRecord",
    "RunStatus",
    "SchemaNotMigrated",
    "StateVersion",
    "StepFailed",
    "StepInputMismatch",
    "StepNeedsReview",
    "StepNotReviewable",
    "StepRecord",
    "StepStatus",
    "Tidebase",
    "TidebaseError",
    "UsageRecord",
    "WorkerOptions",
    "checkpointed_pipeline",
    "current_run",
    "durable_tool",
    "idempotency_key",
    "is_replayed",
    "register_types",
    "run_worker",
]
