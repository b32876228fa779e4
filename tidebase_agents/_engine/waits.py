"""Durable waits (W1): ``wait_for`` a message, ``sleep``, and tool approvals. A run that must
wait parks (:meth:`Executor.park`): it holds no lease, connection or task until it is invoked
again, and then replays to the wait, which either ends or parks the run anew.

A wait is a step: its record is ``waiting`` with its due time (so a timeout or a sleep
counts from when the wait first started, across restarts), then ``completed`` with the
message it took, or with the timeout as its recorded outcome.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from .._errors import (
    ApprovalRequired,
    PendingApproval,
    RunWaiting,
    StepInputMismatch,
    WaitTimeout,
)
from .._hashing import canonical_json, sha256_text
from .._store import ApprovalRecord, Event, StepRecord, utcnow
from .._vocab import ApprovalDecision, EventKind, StepStatus
from .executor import Executor
from .spec import StepSpec, step_replayed


def _spec(ex: Executor, name: str, input: dict[str, Any]) -> StepSpec:
    text = canonical_json(input, what=f"input of step {name!r}")
    return StepSpec(
        name=name,
        fn=lambda: None,
        input_hash=sha256_text(text, what=f"input of step {name!r}"),
        input_json=text,
    )


def _recorded(ex: Executor, spec: StepSpec) -> StepRecord | None:
    """The wait's checkpoint; a recorded wait invoked with another input raises (R2)."""
    ex.check_live()
    rec = ex.recorded(spec.name)
    if rec is not None and rec.input_hash != spec.input_hash:
        raise StepInputMismatch(ex.run_id, spec.name, rec.input_hash, spec.input_hash, ["input"])
    return rec


def _started(
    ex: Executor, spec: StepSpec, rec: StepRecord | None, seconds: float | None, input: Any
) -> tuple[dt.datetime | None, StepRecord]:
    """When the wait ends by itself (recorded when it first started, else from now), and its
    ``waiting`` record (written when the run parks, with the park)."""
    if rec is not None:
        due = (rec.output or {}).get("due")
        return (None if due is None else dt.datetime.fromisoformat(due)), rec
    now = utcnow()
    due_at = None if seconds is None else now + dt.timedelta(seconds=seconds)
    return due_at, StepRecord(
        name=spec.name,
        status=StepStatus.WAITING,
        input_hash=spec.input_hash,
        output={"due": None if due_at is None else due_at.isoformat()},
        lease_token=ex.lease.token,
        started_at=now,
        input=input,
    )


def _replayed(ex: Executor, rec: StepRecord | None) -> bool:
    if rec is None or rec.status != StepStatus.COMPLETED:
        return False
    ex.replayed.append(rec.name)
    step_replayed(ex.run_id, rec.name)
    return True


async def wait_for(ex: Executor, name: str, topic: str, timeout: float | None) -> Any:
    """The payload of the first message sent to the run on ``topic`` that no other wait took,
    whether it was sent before or after the wait started; ``WaitTimeout`` after ``timeout``
    seconds without one (recorded, so a replay raises it again)."""
    input = {"topic": topic, "timeout": timeout}
    spec = _spec(ex, name, input)
    rec = _recorded(ex, spec)
    if _replayed(ex, rec):
        assert rec is not None
        if rec.error is not None:
            raise WaitTimeout(ex.run_id, topic, float(timeout or 0))
        return rec.output["payload"]
    due, waiting = _started(ex, spec, rec, timeout, input)
    message = await ex.take_message(waiting, topic)
    if message is not None:
        return message.payload
    if due is not None and utcnow() >= due:
        error = WaitTimeout(ex.run_id, topic, float(timeout or 0))
        await ex.record_step(
            spec,
            StepStatus.COMPLETED,
            error={"type": "WaitTimeout", "message": str(error)},
            events=[Event(EventKind.STEP_COMPLETED, name, {"error": "WaitTimeout"})],
        )
        raise error
    await ex.park(
        RunWaiting(ex.run_id, topic, due), topic=topic, step=None if rec is not None else waiting
    )


async def sleep(ex: Executor, name: str, seconds: float) -> None:
    """Park the run until ``seconds`` after the sleep first started; then go on."""
    input = {"seconds": seconds}
    spec = _spec(ex, name, input)
    rec = _recorded(ex, spec)
    if _replayed(ex, rec):
        return
    due, waiting = _started(ex, spec, rec, seconds, input)
    assert due is not None
    if utcnow() >= due:
        await ex.record_step(
            spec,
            StepStatus.COMPLETED,
            output={"due": due.isoformat()},
            events=[Event(EventKind.STEP_COMPLETED, name)],
        )
        return
    await ex.park(RunWaiting(ex.run_id, None, due), step=None if rec is not None else waiting)


async def await_approvals(
    ex: Executor, step: str, pending: Sequence[PendingApproval]
) -> dict[str, ApprovalRecord]:
    """The decisions on the tool calls agent step ``step`` stopped on, by call id, once every
    one is decided; until then the run parks (``ApprovalRequired``), recording them."""
    recorded = {(a.step, a.call_id): a for a in await ex.approvals()}
    decided = {
        p.call_id: rec
        for p in pending
        if (rec := recorded.get((step, p.call_id))) is not None and rec.decision is not None
    }
    if len(decided) == len(pending):
        return decided
    items = [dataclasses.replace(p, step=step) for p in pending]
    await ex.park(
        ApprovalRequired(ex.run_id, [p for p in items if p.call_id not in decided]),
        approvals=items,
    )


def approved(record: ApprovalRecord) -> bool:
    return record.decision == ApprovalDecision.APPROVE
