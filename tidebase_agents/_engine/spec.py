"""What the engine executes: step specs, and the hooks through which other packages plug in.

A step spec carries its own output codec (``encode`` / ``decode``) and, optionally, how a
deterministic failure is recorded and replayed and what usage a result spent: the SDK package
builds agent and tool steps from these hooks, and the engine never needs to know what an agent
is. Observers (the SDK's tracing) register a run scope, entered around each execution of a
run, and a callback for each replayed step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn

from .. import _codec
from .._errors import (
    LeaseLost,
    RunCancelled,
    RunParked,
    StepFailed,
    StepInputMismatch,
    StepNeedsReview,
)
from .._store import StepRecord, UsageRecord
from .._vocab import ApprovalMode, DecisionKind, ReplayPolicy
from .scope import ToolCall

#: Errors that steer the run rather than report a failure of the step's own work.
RUN_CONTROL: tuple[type[Exception], ...] = (
    LeaseLost,
    RunCancelled,
    StepNeedsReview,
    StepInputMismatch,
    StepFailed,
    RunParked,
)


async def decode_value(data: Any) -> Any:
    return _codec.decode(data)


@dataclasses.dataclass
class StepSpec:
    """Everything the executor needs to run or replay one step."""

    name: str
    fn: Callable[[], Any]
    input_hash: str
    input_parts: dict[str, str] | None = None
    side_effects: list[str] | None = None
    idempotency_key: str | None = None
    keyed: bool = False
    replay: ReplayPolicy = ReplayPolicy.AUTO
    retries: int = 0
    encode: Callable[[Any], Any] = _codec.encode
    decode: Callable[[Any], Awaitable[Any]] = decode_value
    #: Deterministic failures recorded as the step's outcome (replayed as the same error).
    encode_error: Callable[[BaseException], dict[str, Any] | None] | None = None
    raise_error: Callable[[dict[str, Any]], NoReturn] | None = None
    usage: Callable[[Any], Sequence[UsageRecord]] | None = None
    tool_call: ToolCall | None = None
    #: Checkpoints nested in this step whose last name segment starts with this marker are
    #: journal entries only while the step runs (its model turns): its completion drops them.
    transient: str | None = None
    #: What the step was called with as JSON text, recorded for people (bounded).
    input_json: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a step given its checkpoint."""

    kind: DecisionKind
    record: StepRecord | None = None
    attempts: int = 1
    in_doubt: bool = False


@dataclasses.dataclass(frozen=True)
class Execution:
    """A step being executed: its attempt count, when it started (wall and monotonic)."""

    attempts: int
    started: Any
    t0: float


class StopRun(BaseException):
    """Carries an error that must end the agent run out of a tool call.

    The SDK turns a tool's ``Exception`` into a message for the model and lets the run go on;
    a step that needs review, a lost lease or database, or a cancelled run must instead stop
    it. Raised as a ``BaseException`` from durable tools and unwrapped where the agent run was
    started.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


# Values of these types are not stored as a step's output: the step replays by calling its
# function again, whose own nested steps hand back their checkpoints (an agent run's result,
# bound to this process's live objects). The SDK package registers its result types here.
_reentrant: list[type] = []


def register_reentrant_output(cls: type) -> None:
    """Replay step outputs of type ``cls`` by re-entering the step's function."""
    if cls not in _reentrant:
        _reentrant.append(cls)


def is_reentrant(value: Any) -> bool:
    return any(isinstance(value, cls) for cls in _reentrant)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Options of the pipeline being executed, for the packages plugged into the engine (the
    engine carries them and never reads them)."""

    #: Snapshots and restores the user's run context in agent checkpoints (the SDK package).
    context_codec: Any = None
    #: What an agent run that stops on tool approvals does (W1): park the run, or return.
    approvals: ApprovalMode = ApprovalMode.PARK


_NO_OPTIONS = PipelineOptions()
_pipeline_options: contextvars.ContextVar[PipelineOptions | None] = contextvars.ContextVar(
    "tidebase_pipeline_options", default=None
)


def current_pipeline_options() -> PipelineOptions:
    """The options of the pipeline whose body is running (defaults outside one)."""
    return _pipeline_options.get() or _NO_OPTIONS


def set_pipeline_options(options: PipelineOptions) -> contextvars.Token[PipelineOptions | None]:
    """Make ``options`` current for the calling code and the tasks it starts."""
    return _pipeline_options.set(options)


def reset_pipeline_options(token: contextvars.Token[PipelineOptions | None]) -> None:
    _pipeline_options.reset(token)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One execution of a run, as observers see it."""

    pipeline: str
    run_id: str
    attempt: int
    #: The run had completed: its recorded result is returned and nothing executes (R7).
    replayed: bool = False


RunScope = Callable[[RunInfo], contextlib.AbstractContextManager[None]]
StepReplayed = Callable[[str, str], None]

_run_scopes: list[RunScope] = []
_step_replayed: list[StepReplayed] = []


def register_run_scope(factory: RunScope) -> None:
    """Enter ``factory(info)`` around each execution of a run (idempotent)."""
    if factory not in _run_scopes:
        _run_scopes.append(factory)


def register_step_replayed(callback: StepReplayed) -> None:
    """Call ``callback(run_id, step_name)`` when a step replays from its checkpoint
    (idempotent)."""
    if callback not in _step_replayed:
        _step_replayed.append(callback)


@contextlib.contextmanager
def run_scope(info: RunInfo) -> Iterator[None]:
    """The registered run scopes, entered in registration order."""
    with contextlib.ExitStack() as stack:
        for factory in _run_scopes:
            stack.enter_context(factory(info))
        yield


def step_replayed(run_id: str, step: str) -> None:
    for callback in _step_replayed:
        callback(run_id, step)
