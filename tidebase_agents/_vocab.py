"""The library's vocabulary: statuses, policies, decisions, event kinds, as string enums.

Every status the library writes or reads is spelled here and nowhere else (the migrations keep
their own literals, frozen at the revision that wrote them). Members compare equal to their
string values, so records read from the database compare with them directly.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from ._errors import ConfigurationError


class Vocab(str, enum.Enum):
    """A string enum whose ``str()`` and format are its value (``enum.StrEnum`` before 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RunStatus(Vocab):
    """Where a run stands."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    FAILED_RETRYABLE = "failed_retryable"
    MANUAL_REVIEW = "manual_review"
    CANCELLED = "cancelled"
    #: Parked until tool approvals are decided, a message arrives or a sleep is due (W1):
    #: no lease, connection or task is held.
    WAITING = "waiting"


class StepStatus(Vocab):
    """Where a step stands. ``running`` is an intent record (or an in-doubt step after a crash)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    FAILED_RETRYABLE = "failed_retryable"
    MANUAL_REVIEW = "manual_review"
    #: A ``wait_for`` / ``sleep`` that has started and not yet ended (its due time recorded).
    WAITING = "waiting"


class ApprovalDecision(Vocab):
    """A person's decision on a tool call waiting for approval."""

    APPROVE = "approve"
    REJECT = "reject"


class ApprovalMode(Vocab):
    """What a pipeline does when an agent run stops on tool approvals: park the run until
    they are decided (``park``), or hand the interrupted result to the code (``return``),
    which drives ``RunState`` itself."""

    PARK = "park"
    RETURN = "return"


class ReplayPolicy(Vocab):
    """What a step's final failure means (R3): retry later, park for a person, or fail for good."""

    AUTO = "auto"
    MANUAL = "manual"
    NEVER = "never"


class DecisionKind(Vocab):
    """What the executor does with a step given its checkpoint."""

    REPLAY = "replay"
    PARK = "park"
    EXECUTE = "execute"


class ReviewAction(Vocab):
    """How an operator resolves a step parked in ``manual_review``."""

    RETRY = "retry"
    OUTPUT = "output"
    FAIL = "fail"


class FailureClass(Vocab):
    """Why the queue gave up on a run (written to its ``error``)."""

    EXECUTOR_LOST = "executor_lost"
    RETRIES_EXHAUSTED = "retries_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class HolderDeath(Vocab):
    """How a running run's holder was found dead before its lease expired (P3)."""

    #: Its process no longer exists on this machine.
    PROCESS = "process"
    #: Its PostgreSQL session is gone (the advisory lock it held was released).
    SESSION = "session"
    #: Its lease expired (nothing provable; the holder may still run and will be fenced).
    LEASE_EXPIRED = "lease_expired"


class EventKind(Vocab):
    """Kinds of entries in a run's event log (R11)."""

    RUN_STARTED = "run_started"
    RUN_ENQUEUED = "run_enqueued"
    RUN_CLAIMED = "run_claimed"
    RUN_RESUMED = "run_resumed"
    LEASE_TAKEN_OVER = "lease_taken_over"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_PARKED = "run_parked"
    RUN_INTERRUPTED = "run_interrupted"
    RUN_CANCELLED = "run_cancelled"
    RUN_REQUEUED = "run_requeued"
    RUN_FORKED = "run_forked"
    RUN_FORK_CREATED = "run_fork_created"
    STEPS_RESET = "steps_reset"
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    STEP_IN_DOUBT = "step_in_doubt"
    STEP_KEY_READ = "step_key_read"
    STEP_FAILED = "step_failed"
    STEP_FAILED_RETRYABLE = "step_failed_retryable"
    STEP_MANUAL_REVIEW = "step_manual_review"
    STEP_REVIEW_RETRY = "step_review_retry"
    STEP_REVIEW_OUTPUT = "step_review_output"
    STEP_REVIEW_FAIL = "step_review_fail"
    STATE_SET = "state_set"
    TURN_DIVERGED = "turn_diverged"
    TURN_DROPPED = "turn_dropped"
    RUN_WAITING = "run_waiting"
    APPROVAL_DECIDED = "approval_decided"
    MESSAGE_SENT = "message_sent"
    MESSAGE_RECEIVED = "message_received"


class SQLiteSynchronous(Vocab):
    """How an embedded database's commits reach the disk (SQLite's ``PRAGMA synchronous``).

    ``NORMAL`` (the default, in WAL mode): a commit survives the process crashing or being
    killed, not the machine losing power. ``FULL``: a commit also survives power loss, at the
    cost of waiting for the disk at every commit."""

    NORMAL = "NORMAL"
    FULL = "FULL"


#: Runs that may still be (re)started; at most one per ``(queue, dedupe_key)``.
ACTIVE_RUN_STATUSES = frozenset(
    {
        RunStatus.QUEUED,
        RunStatus.RUNNING,
        RunStatus.FAILED_RETRYABLE,
        RunStatus.MANUAL_REVIEW,
        RunStatus.WAITING,
    }
)
#: Runs that ended; nothing ever changes their status again.
TERMINAL_RUN_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
#: Runs retention may delete (``runs prune``): ended ones only. Queued, running, parked and
#: waiting runs are never pruned, whatever a caller asks for.
PRUNABLE_RUN_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
#: Runs an invocation may take at once; a ``running`` run only once its holder is gone.
RESTARTABLE_RUN_STATUSES = frozenset(
    {RunStatus.QUEUED, RunStatus.FAILED_RETRYABLE, RunStatus.MANUAL_REVIEW, RunStatus.WAITING}
)
#: Step statuses past which the run cannot go on.
HALTING_STEP_STATUSES = frozenset({StepStatus.MANUAL_REVIEW, StepStatus.FAILED})

#: The run status a step's final failure puts the run in.
RUN_STATUS_OF_STEP = {
    StepStatus.MANUAL_REVIEW: RunStatus.MANUAL_REVIEW,
    StepStatus.FAILED: RunStatus.FAILED,
    StepStatus.FAILED_RETRYABLE: RunStatus.FAILED_RETRYABLE,
}
#: The event a step's final failure appends.
EVENT_OF_STEP_FAILURE = {
    StepStatus.MANUAL_REVIEW: EventKind.STEP_MANUAL_REVIEW,
    StepStatus.FAILED: EventKind.STEP_FAILED,
    StepStatus.FAILED_RETRYABLE: EventKind.STEP_FAILED_RETRYABLE,
}
#: The event a run's unsuccessful end appends.
EVENT_OF_RUN_END = {
    RunStatus.MANUAL_REVIEW: EventKind.RUN_PARKED,
    RunStatus.FAILED: EventKind.RUN_FAILED,
    RunStatus.FAILED_RETRYABLE: EventKind.RUN_INTERRUPTED,
}
#: What a review action does to the step.
STEP_STATUS_AFTER_REVIEW = {
    ReviewAction.RETRY: StepStatus.FAILED_RETRYABLE,
    ReviewAction.OUTPUT: StepStatus.COMPLETED,
    ReviewAction.FAIL: StepStatus.FAILED,
}
EVENT_OF_REVIEW = {
    ReviewAction.RETRY: EventKind.STEP_REVIEW_RETRY,
    ReviewAction.OUTPUT: EventKind.STEP_REVIEW_OUTPUT,
    ReviewAction.FAIL: EventKind.STEP_REVIEW_FAIL,
}


def sql_list(values: frozenset[RunStatus] | frozenset[StepStatus]) -> str:
    """``('a', 'b')``: a set of statuses as an SQL literal list, in a stable order."""
    return "(" + ", ".join(f"'{v}'" for v in sorted(values)) + ")"


V = TypeVar("V", bound=Vocab)


def parse(kind: type[V], value: object, what: str) -> V:
    """``value`` as a member of ``kind``, else :class:`ConfigurationError` naming ``what``."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ConfigurationError(f"{what} must be one of {allowed}, got {value!r}") from None
