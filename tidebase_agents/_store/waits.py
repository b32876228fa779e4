"""Wait operations of the store (W1): park a run, decide its tool approvals, send it messages
and hand each message to exactly one ``wait_for``.

A parked run is ``waiting`` with no lease; its ``scheduled_at`` is when it wakes up by itself
(a sleep or a timeout is due) and becomes ``now`` once what it waits for has happened, which
is when a worker serving its queue resumes it. Deciding and sending lock the run's row, and
parking takes the fence on that same row, so a decision or message that lands while the run
is parking is never missed: the park sees it and makes the run due at once.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import (
    ApprovalNotFound,
    ConfigurationError,
    DecisionConflict,
    PendingApproval,
    RunCancelled,
)
from .._vocab import TERMINAL_RUN_STATUSES, ApprovalDecision, EventKind, RunStatus, StepStatus
from .records import (
    ApprovalRecord,
    Event,
    Lease,
    MessageRecord,
    StepRecord,
    fields_of,
    utcnow,
)
from .rows import append_event, bump_event_seq, fenced_bump, locked_run
from .tables import ApprovalRow, MessageRow, RunRow, StepRow

_APPROVAL_COLUMNS = [
    getattr(ApprovalRow, f)
    for f in (
        "run_id",
        "step",
        "call_id",
        "agent",
        "tool",
        "arguments",
        "decision",
        "always",
        "message",
        "created_at",
        "decided_at",
    )
]
_MESSAGE_COLUMNS = [
    getattr(MessageRow, f)
    for f in ("id", "run_id", "topic", "payload", "created_at", "consumed_by", "consumed_at")
]


class WaitOps(abc.ABC):
    """The waits half of a store; backends supply the transactions."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def connect(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def _insert(self) -> Any: ...

    @abc.abstractmethod
    async def _notify(self, conn: AsyncConnection, queue: str) -> None: ...

    async def get_approvals(self, run_id: str) -> list[ApprovalRecord]:
        """Every tool call of the run that waited for approval, oldest first."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*_APPROVAL_COLUMNS)
                .where(ApprovalRow.run_id == run_id)
                .order_by(ApprovalRow.id)
            )
            return [ApprovalRecord(**r._mapping) for r in rows]

    async def get_messages(self, run_id: str) -> list[MessageRecord]:
        """Every message sent to the run, oldest first."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*_MESSAGE_COLUMNS).where(MessageRow.run_id == run_id).order_by(MessageRow.id)
            )
            return [MessageRecord(**r._mapping) for r in rows]

    async def park(
        self,
        lease: Lease,
        *,
        wake_at: dt.datetime | None,
        event: Event,
        approvals: Sequence[PendingApproval] = (),
        topic: str | None = None,
        step: StepRecord | None = None,
    ) -> None:
        """Park the run as ``waiting`` and release its lease; record the tool calls it waits
        on, or the wait step ``step`` it stopped in. If everything it waits for has already
        happened (decided meanwhile, a message on ``topic`` sent meanwhile), it is due at
        once."""
        now = utcnow()
        async with self.transaction() as conn:
            seq = await fenced_bump(conn, lease, 1)
            if step is not None:
                await self._upsert_step(conn, lease, step)
            if approvals:
                await conn.execute(
                    self._insert()(ApprovalRow)
                    .values(
                        [
                            dict(
                                run_id=lease.run_id,
                                step=p.step,
                                call_id=p.call_id,
                                agent=p.agent,
                                tool=p.tool,
                                arguments=p.arguments,
                                created_at=now,
                            )
                            for p in approvals
                        ]
                    )
                    .on_conflict_do_nothing()
                )
            if approvals and not await _undecided(conn, lease.run_id):
                wake_at = now
            if topic is not None and await _first_message(conn, lease.run_id, topic) is not None:
                wake_at = now
            queue = (
                await conn.execute(
                    update(RunRow)
                    .where(RunRow.run_id == lease.run_id)
                    .values(
                        status=str(RunStatus.WAITING),
                        lease_owner=None,
                        lease_expires_at=None,
                        scheduled_at=wake_at,
                    )
                    .returning(RunRow.queue)
                )
            ).scalar()
            await append_event(conn, lease.run_id, seq, event, at=now)
            if queue is not None and wake_at is not None and wake_at <= now:
                await self._notify(conn, queue)

    async def decide(
        self,
        run_id: str,
        call_id: str,
        decision: ApprovalDecision,
        *,
        always: bool = False,
        message: str | None = None,
    ) -> ApprovalRecord:
        """Record the decision on tool call ``call_id`` once; the same decision again is a
        no-op, another one raises ``DecisionConflict``. The last decision a waiting run needs
        makes it due."""
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            row = (
                await conn.execute(
                    select(ApprovalRow.id, *_APPROVAL_COLUMNS)
                    .where(ApprovalRow.run_id == run_id, ApprovalRow.call_id == call_id)
                    .order_by(ApprovalRow.id.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                raise ApprovalNotFound(run_id, call_id)
            record = ApprovalRecord(**{k: v for k, v in row._mapping.items() if k != "id"})
            if record.decision is not None:
                if (record.decision, record.always, record.message) == (
                    str(decision),
                    always,
                    message,
                ):
                    return record
                raise DecisionConflict(run_id, call_id, record.decision, f"{decision}")
            if run.status in TERMINAL_RUN_STATUSES:
                if run.status == RunStatus.CANCELLED:
                    raise RunCancelled(run_id)
                raise ConfigurationError(f"run {run_id!r} has ended ({run.status})")
            values = dict(decision=str(decision), always=always, message=message, decided_at=now)
            await conn.execute(update(ApprovalRow).where(ApprovalRow.id == row.id).values(**values))
            due = run.status == RunStatus.WAITING and not await _undecided(conn, run_id)
            seq = await bump_event_seq(
                conn, run_id, updated_at=now, **({"scheduled_at": now} if due else {})
            )
            data = {"call_id": call_id, "decision": str(decision), "always": always}
            if message is not None:
                data["message"] = message
            await append_event(
                conn, run_id, seq, Event(EventKind.APPROVAL_DECIDED, record.step, data), at=now
            )
            if due and run.queue is not None:
                await self._notify(conn, run.queue)
            return ApprovalRecord(**{**fields_of(record), **values})

    async def send_message(self, run_id: str, topic: str, payload: Any) -> int:
        """Record a message to the run on ``topic``; a run waiting (for anything) becomes due.
        Returns the message's id."""
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            if run.status in TERMINAL_RUN_STATUSES:
                if run.status == RunStatus.CANCELLED:
                    raise RunCancelled(run_id)
                raise ConfigurationError(
                    f"run {run_id!r} has ended ({run.status}); it receives no messages"
                )
            message_id = (
                await conn.execute(
                    self._insert()(MessageRow)
                    .values(run_id=run_id, topic=topic, payload=payload, created_at=now)
                    .returning(MessageRow.id)
                )
            ).scalar_one()
            due = run.status == RunStatus.WAITING
            seq = await bump_event_seq(
                conn, run_id, updated_at=now, **({"scheduled_at": now} if due else {})
            )
            await append_event(
                conn,
                run_id,
                seq,
                Event(EventKind.MESSAGE_SENT, data={"topic": topic, "message": message_id}),
                at=now,
            )
            if due and run.queue is not None:
                await self._notify(conn, run.queue)
            return int(message_id)

    async def take_message(
        self, lease: Lease, step: StepRecord, topic: str
    ) -> MessageRecord | None:
        """Under the lease, hand the oldest message on ``topic`` not yet taken to the wait
        step ``step`` and record the step completed with it, in one commit; None if there is
        none (nothing is written then)."""
        now = utcnow()
        async with self.transaction() as conn:
            found = await _first_message(conn, lease.run_id, topic)
            seq = await fenced_bump(conn, lease, 1 if found is not None else 0)
            if found is None:
                return None
            await conn.execute(
                update(MessageRow)
                .where(MessageRow.id == found.id)
                .values(consumed_by=step.name, consumed_at=now)
            )
            await self._upsert_step(
                conn,
                lease,
                dataclasses.replace(
                    step,
                    status=StepStatus.COMPLETED,
                    output={"message": found.id, "payload": found.payload},
                    completed_at=now,
                ),
            )
            await append_event(
                conn,
                lease.run_id,
                seq,
                Event(EventKind.MESSAGE_RECEIVED, step.name, {"topic": topic, "message": found.id}),
                at=now,
            )
            return MessageRecord(
                **{**fields_of(found), "consumed_by": step.name, "consumed_at": now}
            )

    async def _upsert_step(self, conn: AsyncConnection, lease: Lease, step: StepRecord) -> None:
        values = dict(
            fields_of(step), run_id=lease.run_id, status=str(step.status), replay=str(step.replay)
        )
        stmt = self._insert()(StepRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name"],
            set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "name")},
        )
        await conn.execute(stmt)


async def _undecided(conn: AsyncConnection, run_id: str) -> int:
    return int(
        (
            await conn.execute(
                select(func.count()).where(
                    ApprovalRow.run_id == run_id, ApprovalRow.decision.is_(None)
                )
            )
        ).scalar_one()
    )


async def _first_message(conn: AsyncConnection, run_id: str, topic: str) -> MessageRecord | None:
    row = (
        await conn.execute(
            select(*_MESSAGE_COLUMNS)
            .where(
                MessageRow.run_id == run_id,
                MessageRow.topic == topic,
                MessageRow.consumed_by.is_(None),
            )
            .order_by(MessageRow.id)
            .limit(1)
        )
    ).first()
    return None if row is None else MessageRecord(**row._mapping)
