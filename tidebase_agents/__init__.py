"""tidebase-agents: durable OpenAI Agents SDK pipelines checkpointed in your own database."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from ._codec import register_types
from ._engine import NotInRun, Run, current_run, idempotency_key
from ._errors import (
    ApprovalNotFound,
    ApprovalRequired,
    CheckpointSerializationError,
    ConfigurationError,
    DatabaseUnavailable,
    DecisionConflict,
    LeaseLost,
    NotDurableWarning,
    PayloadTooLarge,
    PendingApproval,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunLocked,
    RunNotFound,
    RunParked,
    RunWaiting,
    SchemaNotMigrated,
    StepFailed,
    StepInputMismatch,
    StepNeedsReview,
    StepNotFound,
    StepNotReviewable,
    TidebaseError,
    WaitTimeout,
)
from ._pipeline import CheckpointedPipeline, checkpointed_pipeline
from ._store import (
    ApprovalRecord,
    EventRecord,
    MessageRecord,
    RunRecord,
    StateVersion,
    StepRecord,
    StepsReset,
    UsageRecord,
)
from ._tidebase import AsyncTidebase, Tidebase
from ._vocab import (
    ApprovalDecision,
    ApprovalMode,
    ReplayPolicy,
    ReviewAction,
    RunStatus,
    StepStatus,
)
from ._worker import WorkerOptions, run_worker

if TYPE_CHECKING:
    from ._sdk.context import ContextCodec
    from ._sdk.hooks import is_replaying
    from ._sdk.mcp import DurableMCPServer, durable_mcp
    from ._sdk.streaming import is_replayed
    from ._sdk.tools import durable_tool

#: Names of the SDK integration, loaded on first use so the CLI and workers start fast.
_SDK_NAMES = {
    "ContextCodec": "context",
    "DurableMCPServer": "mcp",
    "durable_mcp": "mcp",
    "durable_tool": "tools",
    "is_replayed": "streaming",
    "is_replaying": "hooks",
}

try:
    #: The installed version (the one source of truth is pyproject.toml).
    __version__: str = _version("tidebase-agents")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    module = _SDK_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'tidebase_agents' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"._sdk.{module}", __name__), name)


__all__ = [
    "ApprovalDecision",
    "ApprovalMode",
    "ApprovalNotFound",
    "ApprovalRecord",
    "ApprovalRequired",
    "AsyncTidebase",
    "CheckpointSerializationError",
    "CheckpointedPipeline",
    "ConfigurationError",
    "ContextCodec",
    "DatabaseUnavailable",
    "DecisionConflict",
    "DurableMCPServer",
    "EventRecord",
    "LeaseLost",
    "MessageRecord",
    "NotDurableWarning",
    "NotInRun",
    "PayloadTooLarge",
    "PendingApproval",
    "ReplayPolicy",
    "ReviewAction",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunLocked",
    "RunNotFound",
    "RunParked",
    "RunRecord",
    "RunStatus",
    "RunWaiting",
    "SchemaNotMigrated",
    "StateVersion",
    "StepFailed",
    "StepInputMismatch",
    "StepNeedsReview",
    "StepNotFound",
    "StepNotReviewable",
    "StepRecord",
    "StepStatus",
    "StepsReset",
    "Tidebase",
    "TidebaseError",
    "UsageRecord",
    "WaitTimeout",
    "WorkerOptions",
    "__version__",
    "checkpointed_pipeline",
    "current_run",
    "durable_mcp",
    "durable_tool",
    "idempotency_key",
    "is_replayed",
    "is_replaying",
    "register_types",
    "run_worker",
]
