"""Row-level helpers shared by the store's transactions: the fence, locked reads, events."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import LeaseLost, RunCancelled, RunNotFound
from .._vocab import RunStatus
from .records import RUN_FIELDS, STEP_FIELDS, Event, Lease, RunRecord, run_from_mapping, utcnow
from .tables import EventRow, RunRow, StepRow

RUN_COLUMNS = [getattr(RunRow, name) for name in RUN_FIELDS]
STEP_COLUMNS = [getattr(StepRow, name) for name in STEP_FIELDS]


def lease_is_live(run: RunRecord, now: dt.datetime) -> bool:
    """Whether an executor holds ``run`` under a lease that has not expired."""
    return (
        run.status == RunStatus.RUNNING
        and run.lease_expires_at is not None
        and run.lease_expires_at > now
    )


def fence_error(lease: Lease, status: str | None) -> LeaseLost | RunCancelled:
    """Why a fenced write was refused: the run was cancelled, or this lease is gone."""
    if status == RunStatus.CANCELLED:
        return RunCancelled(lease.run_id)
    return LeaseLost(lease.run_id, "another executor took the run over")


def holds(lease: Lease) -> list[Any]:
    """The fence: the run is still running under this lease's token."""
    return [
        RunRow.run_id == lease.run_id,
        RunRow.lease_token == lease.token,
        RunRow.status == RunStatus.RUNNING,
    ]


async def locked_run(conn: AsyncConnection, run_id: str) -> RunRecord:
    """The run, row-locked for the rest of the transaction; ``RunNotFound`` if there is none."""
    row: Row[Any] | None = (
        await conn.execute(select(*RUN_COLUMNS).where(RunRow.run_id == run_id).with_for_update())
    ).first()
    if row is None:
        raise RunNotFound(run_id)
    return run_from_mapping(row._mapping)


async def bump_event_seq(conn: AsyncConnection, run_id: str, **values: Any) -> int:
    """Bump the run's event counter (setting ``values`` too); return the new sequence number.

    Taken in the transaction that appends the event, so the log stays gap-free (R11).
    """
    seq = (
        await conn.execute(
            update(RunRow)
            .where(RunRow.run_id == run_id)
            .values(event_seq=RunRow.event_seq + 1, **values)
            .returning(RunRow.event_seq)
        )
    ).scalar_one()
    return int(seq)


async def fenced_bump(conn: AsyncConnection, lease: Lease, n_events: int, **values: Any) -> int:
    """Bump the event counter by ``n_events`` if ``lease`` still holds the run; return the
    last sequence number handed out, or raise the fence's error."""
    seq = (
        await conn.execute(
            update(RunRow)
            .where(*holds(lease))
            .values(event_seq=RunRow.event_seq + n_events, updated_at=utcnow(), **values)
            .returning(RunRow.event_seq)
        )
    ).scalar()
    if seq is None:
        status = (
            await conn.execute(select(RunRow.status).where(RunRow.run_id == lease.run_id))
        ).scalar()
        raise fence_error(lease, status)
    return int(seq)


async def append_event(
    conn: AsyncConnection, run_id: str, seq: int, *events: Event, at: dt.datetime | None = None
) -> None:
    """Append ``events`` numbered up to ``seq`` (the last number handed out for them)."""
    if not events:
        return
    now = at or utcnow()
    first = seq - len(events) + 1
    await conn.execute(
        insert(EventRow),
        [
            dict(
                run_id=run_id,
                seq=first + i,
                kind=str(e.kind),
                step=e.step,
                data=e.data,
                created_at=now,
            )
            for i, e in enumerate(events)
        ],
    )
