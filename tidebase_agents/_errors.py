"""Exception types raised by tidebase-agents, every one under :class:`TidebaseError`, and the
warning it gives about what will not survive a crash."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shlex
from collections.abc import Sequence


class TidebaseError(Exception):
    """Base class of every error the library raises on its own account."""


class ConfigurationError(TidebaseError):
    """Bad configuration or bad input to the API (invalid run id, bad URL, misuse)."""


class DatabaseUnavailable(TidebaseError):
    """The checkpoint database could not be reached."""


class SchemaNotMigrated(TidebaseError):
    """The database schema is behind the library's models; the message names the command to run."""


class StepInputMismatch(TidebaseError):
    """A recorded step was invoked with an input whose hash differs from the recorded one."""

    def __init__(
        self,
        run_id: str,
        step: str,
        recorded_hash: str,
        new_hash: str,
        changed: Sequence[str] = (),
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.recorded_hash = recorded_hash
        self.new_hash = new_hash
        self.changed = list(changed)
        what = f"; changed: {', '.join(self.changed)}" if self.changed else ""
        run, at = shlex.quote(run_id), shlex.quote(step)
        super().__init__(
            f"step {step!r} of run {run_id!r} was recorded with input hash {recorded_hash[:16]} "
            f"but is now invoked with {new_hash[:16]}{what}. The checkpoint is stale: re-run the "
            f"step and those after it with `tidebase-agents steps reset {run} {at}`, or keep "
            f"this run and re-run from the step in a new one with `tidebase-agents runs fork "
            f"{run} --from {at}`."
        )


class StepNeedsReview(TidebaseError):
    """The run's next step is parked in ``manual_review``; an operator must decide."""

    def __init__(self, run_id: str, step: str, reason: str = "") -> None:
        self.run_id = run_id
        self.step = step
        self.reason = reason
        extra = f" ({reason})" if reason else ""
        super().__init__(
            f"step {step!r} of run {run_id!r} needs manual review{extra}; resolve it with "
            f"`tidebase-agents steps review {run_id} {step} --retry|--output JSON|--fail`"
        )


class StepFailed(TidebaseError):
    """A step failed for good (``replay="never"``); the run is failed."""

    def __init__(self, run_id: str, step: str, error: str) -> None:
        self.run_id = run_id
        self.step = step
        self.error = error
        super().__init__(f"step {step!r} of run {run_id!r} failed permanently: {error}")


class RunFailed(TidebaseError):
    """The run ended in ``failed``; re-invoking it does not execute it again."""

    def __init__(self, run_id: str, error: object) -> None:
        self.run_id = run_id
        self.error = error
        super().__init__(f"run {run_id!r} has failed: {error}")


class RunLocked(TidebaseError):
    """Another live executor holds the run's lease."""

    def __init__(
        self,
        run_id: str,
        owner: str | None = None,
        *,
        expires_at: dt.datetime | None = None,
        detail: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.owner = owner
        self.expires_at = expires_at
        by = f" by {owner}" if owner else ""
        if detail is None:
            until = (
                f" until {expires_at.astimezone(dt.timezone.utc).isoformat(timespec='seconds')}"
                if expires_at is not None
                else ""
            )
            detail = f"its lease is live{until}"
        super().__init__(f"run {run_id!r} is being executed{by}; {detail}")


class LeaseLost(TidebaseError):
    """This executor no longer holds the run's lease; its writes are refused."""

    def __init__(self, run_id: str, reason: str) -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"lease on run {run_id!r} was lost ({reason}); this executor stops")


class RunCancelled(TidebaseError):
    """The run was cancelled; cancellation is one-way."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} was cancelled")


class RunNotFound(TidebaseError):
    """No run with this id exists."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r}")


class StepNotReviewable(ConfigurationError):
    """Only a step parked in ``manual_review`` can be reviewed."""

    def __init__(self, run_id: str, step: str, status: str | None) -> None:
        self.run_id = run_id
        self.step = step
        self.status = status
        state = "does not exist" if status is None else f"is {status}"
        super().__init__(
            f"step {step!r} of run {run_id!r} {state}; only manual_review steps are reviewed"
        )


class StepNotFound(ConfigurationError):
    """The run has no checkpoint of this name (to reset it or fork from it)."""

    def __init__(self, run_id: str, step: str) -> None:
        self.run_id = run_id
        self.step = step
        super().__init__(
            f"run {run_id!r} has no recorded step {step!r}; `tidebase-agents runs show "
            f"{run_id}` lists its steps"
        )


class RunParked(TidebaseError):
    """The run parked: it waits, holding no lease, connection or task, until what it waits for
    happens; invoking it again (or a worker, for a queued run) then continues it (W1).

    ``wake_at`` is when it becomes due by itself (a sleep, a timeout), or None.
    """

    def __init__(self, run_id: str, message: str, wake_at: dt.datetime | None = None) -> None:
        self.run_id = run_id
        self.wake_at = wake_at
        super().__init__(message)


class RunWaiting(RunParked):
    """The run parked in ``wait_for`` (``topic``) or ``sleep`` (``topic`` None)."""

    def __init__(self, run_id: str, topic: str | None, wake_at: dt.datetime | None) -> None:
        self.topic = topic
        until = (
            f" until {wake_at.astimezone(dt.timezone.utc).isoformat(timespec='seconds')}"
            if wake_at is not None
            else ""
        )
        what = (
            f"waits for a message on topic {topic!r}{until}; deliver it with "
            f"`tidebase-agents runs send {run_id} {topic} JSON`"
            if topic is not None
            else f"sleeps{until}"
        )
        super().__init__(run_id, f"run {run_id!r} {what}", wake_at)


@dataclasses.dataclass(frozen=True)
class PendingApproval:
    """A tool call an agent run stopped on, waiting for a person's decision."""

    call_id: str
    agent: str
    tool: str
    arguments: str | None
    #: The agent step it belongs to.
    step: str = ""


class ApprovalRequired(RunParked):
    """The run parked on tool calls that need approval (``pending``); decide each with
    ``approve`` / ``reject`` (or ``tidebase-agents runs approve|reject``), then invoke it again."""

    def __init__(self, run_id: str, pending: Sequence[PendingApproval]) -> None:
        self.pending = list(pending)
        calls = ", ".join(f"{p.tool}({p.call_id})" for p in self.pending)
        super().__init__(
            run_id,
            f"run {run_id!r} waits for approval of {calls}; decide with "
            f"`tidebase-agents runs approve|reject {run_id} CALL_ID`",
        )


class WaitTimeout(TidebaseError):
    """``wait_for`` saw no message on its topic before its timeout (recorded: a replay raises
    it again)."""

    def __init__(self, run_id: str, topic: str, timeout: float) -> None:
        self.run_id = run_id
        self.topic = topic
        self.timeout = timeout
        super().__init__(
            f"run {run_id!r} waited {timeout:g}s for a message on topic {topic!r}; none came"
        )


class ApprovalNotFound(ConfigurationError):
    """No tool call with this call id waits for (or had) a decision in this run."""

    def __init__(self, run_id: str, call_id: str) -> None:
        self.run_id = run_id
        self.call_id = call_id
        super().__init__(f"run {run_id!r} has no tool call {call_id!r} waiting for approval")


class DecisionConflict(TidebaseError):
    """The tool call was already decided otherwise; a decision is recorded once."""

    def __init__(self, run_id: str, call_id: str, recorded: str, refused: str) -> None:
        self.run_id = run_id
        self.call_id = call_id
        self.recorded = recorded
        self.refused = refused
        super().__init__(
            f"tool call {call_id!r} of run {run_id!r} was already decided ({recorded}); "
            f"the {refused} is refused"
        )


class RunConflict(TidebaseError):
    """The run id exists with another pipeline name or other recorded arguments."""


class CheckpointSerializationError(TidebaseError):
    """A value could not be hashed or stored as a checkpoint (unsupported type, oversized)."""


class PayloadTooLarge(CheckpointSerializationError):
    """A checkpoint payload exceeds the configured size limit."""


class NotDurableWarning(UserWarning):
    """Something a pipeline uses will not survive a crash as it is (an in-memory session, a run
    context that cannot be checkpointed); the message says what and what to do."""
