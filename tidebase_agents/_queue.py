"""Queue queries: enqueue, claim, requeue and reconcile, written against the run table.

Every status change here writes its event in the same transaction and takes the event's
sequence number from the run's ``event_seq`` counter, so the event log stays gap-free (R11).
Claims bump ``lease_token`` like any acquisition, so a worker's claim is the fencing token its
execution writes under (R6).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ._errors import (
    ConfigurationError,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunLocked,
    RunNotFound,
)
from ._models import ACTIVE_RUN_STATUSES, RunRow
from ._runtime import new_run_id, validate_run_id
from ._store import _RUN_COLS, RunRecord, Store, append_event, bump_event_seq, locked_run, utcnow

DEFAULT_QUEUE = "default"
#: Attempts a queued run gets when it was enqueued without ``max_attempts``.
DEFAULT_MAX_ATTEMPTS = 5
#: PostgreSQL ``NOTIFY`` channel; the payload is the queue name.
NOTIFY_CHANNEL = "tidebase_runs"
#: ``pg_try_advisory_xact_lock`` key electing the one reconciler that acts in a pass.
RECONCILER_LOCK_KEY = 0x7469646562617365  # b"tidebase"

#: Failure classes written to a run's ``error`` when the queue gives up on it.
FAILURE_EXECUTOR_LOST = "executor_lost"
FAILURE_RETRIES_EXHAUSTED = "retries_exhausted"
FAILURE_DEADLINE = "deadline_exceeded"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A run a worker claimed: execute it with ``owner`` and ``token`` as its lease."""

    run_id: str
    pipeline: str
    queue: str | None
    token: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``base * 2**(attempt-1)`` capped, with jitter."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int) -> float:
        nominal = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        # Jitter in [nominal/2, nominal] keeps runs that failed together from retrying together.
        return nominal * (0.5 + random.random() / 2)


@dataclasses.dataclass
class ReconcileReport:
    """What one reconciler pass did; ``elected`` is False when another reconciler held the lock."""

    elected: bool
    requeued: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    cancelled: list[str] = dataclasses.field(default_factory=list)


def _seconds(value: float | dt.timedelta | None, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value or 0)
    if seconds < 0:
        raise ConfigurationError(f"{what} must not be negative")
    return seconds


def _deadline(value: dt.datetime | dt.timedelta | None, now: dt.datetime) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        return now + value
    if value.tzinfo is None:
        raise ConfigurationError("deadline must be a timezone-aware datetime or a timedelta")
    return value


def _check_name(value: str | None, what: str, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ConfigurationError(f"{what} must be a string of 1 to 255 characters, got {value!r}")


async def _notify(store: Store, conn: AsyncConnection, queue: str) -> None:
    # Delivered at commit, so a woken worker always finds the run.
    if store.dialect == "postgresql":
        await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, queue)))


async def enqueue(
    store: Store,
    pipeline: str,
    data: Any,
    input_hash: str | None,
    *,
    run_id: str | None = None,
    queue: str = DEFAULT_QUEUE,
    dedupe_key: str | None = None,
    priority: int = 0,
    delay: float | dt.timedelta | None = None,
    max_attempts: int | None = None,
    deadline: dt.datetime | dt.timedelta | None = None,
) -> str:
    """Record a queued run of ``pipeline`` and return its id.

    At most one active run exists per ``(queue, dedupe_key)``; the database's partial unique
    index decides between concurrent enqueues, and the losers get the winner's id. Enqueueing
    an existing ``run_id`` again with the same pipeline and arguments returns it unchanged.
    """
    run_id = validate_run_id(run_id) if run_id is not None else new_run_id()
    _check_name(queue, "queue", required=True)
    _check_name(dedupe_key, "dedupe_key", required=False)
    if max_attempts is not None and max_attempts < 1:
        raise ConfigurationError("max_attempts must be at least 1")
    now = utcnow()
    scheduled = now + dt.timedelta(seconds=_seconds(delay, "delay"))
    values = dict(
        run_id=run_id,
        pipeline=pipeline,
        status="queued",
        input=data,
        input_hash=input_hash,
        attempts=0,
        lease_token=0,
        event_seq=1,
        queue=queue,
        dedupe_key=dedupe_key,
        priority=priority,
        scheduled_at=scheduled,
        max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
        deadline=_deadline(deadline, now),
        created_at=now,
        updated_at=now,
    )
    # The run an enqueue conflicts with may end between the insert and the look-up; a new
    # attempt then inserts (or meets the next active run).
    for _ in range(10):
        async with store._tx() as conn:
            inserted = (
                await conn.execute(
                    store._insert(RunRow)
                    .values(**values)
                    .on_conflict_do_nothing()
                    .returning(RunRow.run_id)
                )
            ).scalar()
            if inserted is not None:
                await append_event(
                    conn,
                    run_id,
                    1,
                    "run_enqueued",
                    {
                        "queue": queue,
                        "dedupe_key": dedupe_key,
                        "priority": priority,
                        "scheduled_at": scheduled.isoformat(),
                        "max_attempts": values["max_attempts"],
                    },
                )
                await _notify(store, conn, queue)
                return run_id
            if dedupe_key is not None:
                active = (
                    await conn.execute(
                        select(RunRow.run_id).where(
                            RunRow.queue == queue,
                            RunRow.dedupe_key == dedupe_key,
                            RunRow.status.in_(ACTIVE_RUN_STATUSES),
                        )
                    )
                ).scalar()
                if active is not None:
                    return str(active)
            existing = (
                await conn.execute(
                    select(RunRow.pipeline, RunRow.input_hash).where(RunRow.run_id == run_id)
                )
            ).first()
            if existing is not None:
                if existing.pipeline != pipeline or existing.input_hash != input_hash:
                    raise RunConflict(
                        f"run id {run_id!r} exists with another pipeline or other arguments"
                    )
                return run_id
    raise RunConflict(f"could not enqueue run {run_id!r}: its dedupe key kept changing hands")


def _waiting(now: dt.datetime, queues: Sequence[str], pipelines: Sequence[str]) -> list[Any]:
    """Queued runs of these queues and pipelines a worker may start once they are due."""
    return [
        RunRow.status == "queued",
        RunRow.queue.in_(list(queues)),
        RunRow.pipeline.in_(list(pipelines)),
        # A run past its deadline is the reconciler's to cancel, not a worker's to start.
        or_(RunRow.deadline.is_(None), RunRow.deadline > now),
    ]


async def claim(
    store: Store,
    *,
    owner: str,
    lease_seconds: float,
    queues: Sequence[str],
    pipelines: Sequence[str],
    limit: int = 1,
) -> list[Claim]:
    """Claim up to ``limit`` due runs: each becomes ``running`` under a new lease token.

    PostgreSQL locks candidates with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers
    never wait on each other and never get the same run; SQLite transactions are
    ``BEGIN IMMEDIATE`` (one writer at a time), which makes the select-then-update exact.
    """
    if limit < 1 or not queues or not pipelines:
        return []
    now = utcnow()
    async with store._tx() as conn:
        ids = (
            (
                await conn.execute(
                    select(RunRow.run_id)
                    .where(
                        *_waiting(now, queues, pipelines),
                        or_(RunRow.scheduled_at.is_(None), RunRow.scheduled_at <= now),
                    )
                    .order_by(RunRow.priority.desc(), RunRow.scheduled_at, RunRow.created_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            .scalars()
            .all()
        )
        if not ids:
            return []
        rows = (
            await conn.execute(
                update(RunRow)
                .where(RunRow.run_id.in_(ids), RunRow.status == "queued")
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_token=RunRow.lease_token + 1,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                    attempts=RunRow.attempts + 1,
                    event_seq=RunRow.event_seq + 1,
                    updated_at=now,
                )
                .returning(
                    RunRow.run_id,
                    RunRow.pipeline,
                    RunRow.queue,
                    RunRow.lease_token,
                    RunRow.attempts,
                    RunRow.event_seq,
                )
            )
        ).all()
        claims = []
        for r in rows:
            await append_event(
                conn,
                r.run_id,
                r.event_seq,
                "run_claimed",
                {"owner": owner, "token": r.lease_token, "attempt": r.attempts},
            )
            claims.append(Claim(r.run_id, r.pipeline, r.queue, r.lease_token, r.attempts))
        return claims


async def next_due(
    store: Store, *, queues: Sequence[str], pipelines: Sequence[str]
) -> dt.datetime | None:
    """When the earliest queued run of these queues and pipelines becomes due."""
    async with store.connect() as conn:
        value = (
            await conn.execute(
                select(func.min(RunRow.scheduled_at)).where(*_waiting(utcnow(), queues, pipelines))
            )
        ).scalar()
    if isinstance(value, str):  # SQLite: aggregates lose the column type
        value = dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)
    return value


async def _retry_or_fail(
    store: Store,
    conn: AsyncConnection,
    run: RunRecord,
    backoff: Backoff,
    *,
    reason: str,
    failure_class: str,
    immediate: bool = False,
) -> str:
    """Requeue ``run`` with backoff, or fail it once it used its attempts; return the status.

    ``immediate`` requeues at once and skips the attempt budget (a worker shutting down, an
    operator's decision).
    """
    now = utcnow()
    limit = run.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not immediate and run.attempts >= limit:
        error = {
            "failure_class": failure_class,
            "message": f"gave up after {run.attempts} of {limit} attempts ({reason})",
            "attempts": run.attempts,
            "max_attempts": limit,
            "last_error": run.error,
        }
        seq = await bump_event_seq(
            conn,
            run.run_id,
            status="failed",
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        await append_event(
            conn,
            run.run_id,
            seq,
            "run_failed",
            {"failure_class": failure_class, "reason": reason, "attempts": run.attempts},
        )
        return "failed"
    delay = 0.0 if immediate else backoff.delay(run.attempts)
    seq = await bump_event_seq(
        conn,
        run.run_id,
        status="queued",
        queue=run.queue or DEFAULT_QUEUE,
        scheduled_at=now + dt.timedelta(seconds=delay),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=now,
    )
    await append_event(
        conn,
        run.run_id,
        seq,
        "run_requeued",
        {
            "reason": reason,
            "delay_seconds": round(delay, 3),
            "attempts": run.attempts,
            "previous_owner": run.lease_owner,
        },
    )
    if delay == 0:
        await _notify(store, conn, run.queue or DEFAULT_QUEUE)
    return "queued"


async def settle_claim(
    store: Store, claim: Claim, backoff: Backoff, *, interrupted: bool = False
) -> str:
    """After a worker's execution of ``claim`` ended, requeue or fail the run if it is left
    retryable (or still ``running``) under this claim's token; return the run's status.

    A run that completed, failed, was cancelled, parked in ``manual_review`` or was taken
    over by another executor is left as it is, so nothing is ever retried in a loop.
    ``interrupted`` (worker shutdown) requeues at once without counting against the budget.
    """
    async with store._tx() as conn:
        run = await locked_run(conn, claim.run_id)
        if run is None:
            raise RunNotFound(claim.run_id)
        if run.lease_token != claim.token or run.status not in ("failed_retryable", "running"):
            return run.status
        return await _retry_or_fail(
            store,
            conn,
            run,
            backoff,
            reason="worker_shutdown" if interrupted else "retryable_error",
            failure_class=FAILURE_RETRIES_EXHAUSTED,
            immediate=interrupted,
        )


async def requeue(store: Store, run_id: str, *, queue: str | None = None) -> str:
    """Put an unfinished run back on the queue, due now (an operator's ``--enqueue``).

    Accepts runs that are ``failed_retryable``, ``queued``, or ``running`` with an expired
    lease; returns the run's status afterwards (``queued``).
    """
    validate_run_id(run_id)
    _check_name(queue, "queue", required=False)
    async with store._tx() as conn:
        run = await locked_run(conn, run_id)
        if run is None:
            raise RunNotFound(run_id)
        if run.status == "queued":
            return "queued"
        if run.status == "completed":
            raise ConfigurationError(f"run {run_id!r} has completed; there is nothing to resume")
        if run.status == "failed":
            raise RunFailed(run_id, run.error)
        if run.status == "cancelled":
            raise RunCancelled(run_id)
        if run.status == "manual_review":
            raise ConfigurationError(
                f"run {run_id!r} has a step in manual review; resolve it with "
                f"`tidebase-agents steps review` first"
            )
        if (
            run.status == "running"
            and run.lease_expires_at is not None
            and run.lease_expires_at > utcnow()
        ):
            raise RunLocked(run_id, run.lease_owner)
        if queue is not None:
            run = dataclasses.replace(run, queue=queue)
        return await _retry_or_fail(
            store,
            conn,
            run,
            Backoff(),
            reason="operator",
            failure_class=FAILURE_RETRIES_EXHAUSTED,
            immediate=True,
        )


async def reconcile(
    store: Store, backoff: Backoff, *, orphan_grace: float, batch: int = 100
) -> ReconcileReport:
    """One reconciler pass: cancel runs past their deadline, requeue (or fail at
    ``max_attempts``) queue-managed runs whose lease expired, and requeue retryable runs no
    worker settled within ``orphan_grace`` seconds.

    On PostgreSQL only the session that wins ``pg_try_advisory_xact_lock`` acts; the others
    return at once. Rows another transaction holds are skipped until the next pass.
    ``manual_review`` runs are never touched except by their deadline.
    """
    report = ReconcileReport(elected=True)
    now = utcnow()
    async with store._tx() as conn:
        if store.dialect == "postgresql":
            elected = (
                await conn.execute(select(func.pg_try_advisory_xact_lock(RECONCILER_LOCK_KEY)))
            ).scalar()
            if not elected:
                return ReconcileReport(elected=False)

        async def candidates(*where: Any) -> list[RunRecord]:
            rows = await conn.execute(
                select(*_RUN_COLS)
                .where(*where)
                .order_by(RunRow.updated_at)
                .limit(batch)
                .with_for_update(skip_locked=True)
            )
            return [RunRecord(**r._mapping) for r in rows]

        for run in await candidates(RunRow.status.in_(ACTIVE_RUN_STATUSES), RunRow.deadline < now):
            seq = await bump_event_seq(
                conn,
                run.run_id,
                status="cancelled",
                cancel_requested=True,
                error={"failure_class": FAILURE_DEADLINE, "deadline": run.deadline.isoformat()}
                if run.deadline
                else None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
            await append_event(
                conn,
                run.run_id,
                seq,
                "run_cancelled",
                {"from_status": run.status, "reason": FAILURE_DEADLINE},
            )
            report.cancelled.append(run.run_id)

        expired = await candidates(
            RunRow.status == "running",
            RunRow.queue.is_not(None),
            RunRow.lease_expires_at < now,
        )
        orphaned = await candidates(
            RunRow.status == "failed_retryable",
            RunRow.queue.is_not(None),
            RunRow.updated_at < now - dt.timedelta(seconds=orphan_grace),
        )
        for run, reason, failure_class in [
            *((r, "lease_expired", FAILURE_EXECUTOR_LOST) for r in expired),
            *((r, "retryable_error", FAILURE_RETRIES_EXHAUSTED) for r in orphaned),
        ]:
            status = await _retry_or_fail(
                store, conn, run, backoff, reason=reason, failure_class=failure_class
            )
            (report.requeued if status == "queued" else report.failed).append(run.run_id)
    return report
