"""Exception types raised by tidebase-agents. Every one derives from :class:`TidebaseError`."""

from __future__ import annotations

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
        super().__init__(
            f"step {step!r} of run {run_id!r} was recorded with input hash {recorded_hash[:16]} "
            f"but is now invoked with {new_hash[:16]}{what}. The checkpoint is stale: start a new "
            f"run id, or reset the step through `tidebase-agents steps review`."
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

    def __init__(self, run_id: str, owner: str | None = None) -> None:
        self.run_id = run_id
        self.owner = owner
        by = f" by {owner}" if owner else ""
        super().__init__(f"run {run_id!r} is being executed{by}; its lease has not expired")


class LeaseLost(TidebaseError):
    """This executor's lease was taken over; its writes are refused."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"lease on run {run_id!r} was lost (expired and taken over); this executor stops"
        )


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


class RunConflict(TidebaseError):
    """The run id exists with another pipeline name or other recorded arguments."""


class CheckpointSerializationError(TidebaseError):
    """A value could not be hashed or stored as a checkpoint (unsupported type, oversized)."""


class PayloadTooLarge(CheckpointSerializationError):
    """A checkpoint payload exceeds the configured size limit."""
