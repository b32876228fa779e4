"""Queue operations of the store: enqueue, claim, settle, requeue and reconcile (P1).

Every status change here writes its event in the same transaction and takes the event's
sequence number from the run's ``event_seq`` counter, so the event log stays gap-free (R11).
Claims bump ``lease_token`` like any acquisition, so a worker's claim is the fencing token its
execution writes under (R6).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import ConfigurationError, RunCancelled, RunConflict, RunFailed, RunLocked
from .._vocab import ACTIVE_RUN_STATUSES, EventKind, FailureClass, RunStatus
from .records import Claim, Event, QueuedRun, ReconcileReport, RunRecord, run_from_mapping, utcnow
from .rows import RUN_COLUMNS, append_event, bump_event_seq, lease_is_live, locked_run
from .tables import EventRow, RunRow

DEFAULT_QUEUE = "default"
#: Attempts a queued run gets when it was enqueued without ``max_attempts``.
DEFAULT_MAX_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``base * 2**(attempt-1)`` capped, with jitter."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int) -> float:
        nominal = min(self.cap, self.base * 2.0 ** max(attempt - 1, 0))
        # Jitter in [nominal/2, nominal] keeps runs that failed together from retrying together.
        return nominal * (0.5 + random.random() / 2)


def _claimable(
    now: dt.datetime, queues: Sequence[str], pipelines: Sequence[str], direct: Sequence[str]
) -> list[Any]:
    """What a worker starts, in the order it takes them, each a condition the claim index
    serves on its own: waiting runs once they wake up (W1: a waiting run's ``scheduled_at`` is
    its wake-up time, None while it waits for a decision or a message), of its queues and,
    with no queue, the direct-call runs of the ``direct`` pipelines (P4), so a deep queue
    never starves them; then queued runs. A run past its deadline is the reconciler's to
    cancel, not a worker's to start."""
    live = or_(RunRow.deadline.is_(None), RunRow.deadline > now)
    woken = and_(RunRow.status == RunStatus.WAITING, RunRow.scheduled_at.is_not(None), live)
    mine = and_(RunRow.queue.in_(list(queues)), RunRow.pipeline.in_(list(pipelines)))
    conditions = [and_(woken, mine)]
    if direct:
        conditions.append(and_(woken, RunRow.queue.is_(None), RunRow.pipeline.in_(list(direct))))
    conditions.append(and_(RunRow.status == RunStatus.QUEUED, mine, live))
    return conditions


def lease_grant(
    owner: str,
    lease_seconds: float,
    now: dt.datetime,
    process: str | None,
    session: int | None,
) -> dict[str, Any]:
    """The column values that hand a run to a new holder: a new lease token, the holder's
    identity (P3) and one more attempt; the run's event sequence makes room for one event."""
    return {
        "lease_owner": owner,
        "lease_token": RunRow.lease_token + 1,
        "lease_expires_at": now + dt.timedelta(seconds=lease_seconds),
        "lease_process": process,
        "lease_session": session,
        "attempts": RunRow.attempts + 1,
        "event_seq": RunRow.event_seq + 1,
        "updated_at": now,
    }


class QueueOps(abc.ABC):
    """The queue half of a store; backends supply the transactions and their two hooks."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def connect(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def _insert(self) -> Any:
        """The dialect's ``insert`` (it has ``on_conflict_do_nothing``)."""

    async def _notify(self, conn: AsyncConnection, queue: str) -> None:  # noqa: B027 (optional hook)
        """Wake workers of ``queue`` when the transaction commits (where the backend can)."""

    @abc.abstractmethod
    async def holder(self) -> tuple[str | None, int | None]:
        """What a new lease records of its holder (see ``RecoveryOps.holder``)."""

    async def _elect_reconciler(self, conn: AsyncConnection) -> bool:
        """Whether this transaction is the one reconciler that acts now."""
        return True  # one writer at a time: every pass is alone

    async def enqueue(self, queued: QueuedRun) -> str:
        """Record a queued run and return its id.

        At most one active run exists per ``(queue, dedupe_key)``; the database's partial unique
        index decides between concurrent enqueues, and the losers get the winner's id.
        Enqueueing an existing run id again with the same pipeline and arguments returns it.
        """
        now = utcnow()
        values = dict(
            run_id=queued.run_id,
            pipeline=queued.pipeline,
            status=str(RunStatus.QUEUED),
            input=queued.input,
            input_hash=queued.input_hash,
            attempts=0,
            lease_token=0,
            event_seq=1,
            queue=queued.queue,
            dedupe_key=queued.dedupe_key,
            priority=queued.priority,
            scheduled_at=queued.scheduled_at,
            max_attempts=queued.max_attempts,
            deadline=queued.deadline,
            created_at=now,
            updated_at=now,
        )
        enqueued = Event(
            EventKind.RUN_ENQUEUED,
            data={
                "queue": queued.queue,
                "dedupe_key": queued.dedupe_key,
                "priority": queued.priority,
                "scheduled_at": queued.scheduled_at.isoformat(),
                "max_attempts": queued.max_attempts,
            },
        )
        # The run an enqueue conflicts with may end between the insert and the look-up; a new
        # attempt then inserts (or meets the next active run).
        for _ in range(10):
            async with self.transaction() as conn:
                inserted = (
                    await conn.execute(
                        self._insert()(RunRow)
                        .values(**values)
                        .on_conflict_do_nothing()
                        .returning(RunRow.run_id)
                    )
                ).scalar()
                if inserted is not None:
                    await append_event(conn, queued.run_id, 1, enqueued)
                    await self._notify(conn, queued.queue)
                    return queued.run_id
                if queued.dedupe_key is not None:
                    active = (
                        await conn.execute(
                            select(RunRow.run_id).where(
                                RunRow.queue == queued.queue,
                                RunRow.dedupe_key == queued.dedupe_key,
                                RunRow.status.in_([str(s) for s in ACTIVE_RUN_STATUSES]),
                            )
                        )
                    ).scalar()
                    if active is not None:
                        return str(active)
                existing = (
                    await conn.execute(
                        select(RunRow.pipeline, RunRow.input_hash).where(
                            RunRow.run_id == queued.run_id
                        )
                    )
                ).first()
                if existing is not None:
                    if (
                        existing.pipeline != queued.pipeline
                        or existing.input_hash != queued.input_hash
                    ):
                        raise RunConflict(
                            f"run id {queued.run_id!r} exists with another pipeline or other "
                            f"arguments"
                        )
                    return queued.run_id
        raise RunConflict(
            f"could not enqueue run {queued.run_id!r}: its dedupe key kept changing hands"
        )

    async def claim(
        self,
        *,
        owner: str,
        lease_seconds: float,
        queues: Sequence[str],
        pipelines: Sequence[str],
        limit: int = 1,
        direct: Sequence[str] = (),
    ) -> list[Claim]:
        """Claim up to ``limit`` due runs: each becomes ``running`` under a new lease token.
        ``direct`` names the pipelines whose direct-call runs, once they wake up from a
        wait, a worker finishes too.

        PostgreSQL locks candidates with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers
        never wait on each other and never get the same run; SQLite transactions are
        ``BEGIN IMMEDIATE`` (one writer at a time), which makes the select-then-update exact.
        """
        if limit < 1 or not queues or not pipelines:
            return []
        process, session = await self.holder()
        now = utcnow()
        async with self.transaction() as conn:
            ids: list[str] = []
            for condition in _claimable(now, queues, pipelines, direct):
                ids += (
                    (
                        await conn.execute(
                            select(RunRow.run_id)
                            .where(
                                condition,
                                or_(RunRow.scheduled_at.is_(None), RunRow.scheduled_at <= now),
                            )
                            .order_by(
                                RunRow.priority.desc(), RunRow.scheduled_at, RunRow.created_at
                            )
                            .limit(limit - len(ids))
                            .with_for_update(skip_locked=True)
                        )
                    )
                    .scalars()
                    .all()
                )
                if len(ids) == limit:
                    break
            if not ids:
                return []
            rows = (
                await conn.execute(
                    update(RunRow)
                    .where(
                        RunRow.run_id.in_(ids),
                        RunRow.status.in_([str(RunStatus.QUEUED), str(RunStatus.WAITING)]),
                    )
                    .values(
                        status=str(RunStatus.RUNNING),
                        **lease_grant(owner, lease_seconds, now, process, session),
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
            # One statement for every claimed run's event: a worker claiming hundreds of runs
            # at once holds their row locks for one round trip, not one per run.
            await conn.execute(
                insert(EventRow),
                [
                    dict(
                        run_id=r.run_id,
                        seq=r.event_seq,
                        kind=str(EventKind.RUN_CLAIMED),
                        data={"owner": owner, "token": r.lease_token, "attempt": r.attempts},
                        created_at=now,
                    )
                    for r in rows
                ],
            )
            return [Claim(r.run_id, r.pipeline, r.queue, r.lease_token, r.attempts) for r in rows]

    async def next_due(
        self, *, queues: Sequence[str], pipelines: Sequence[str], direct: Sequence[str] = ()
    ) -> dt.datetime | None:
        """When the earliest run :meth:`claim` would take becomes due."""
        async with self.connect() as conn:
            value = (
                await conn.execute(
                    select(func.min(RunRow.scheduled_at)).where(
                        or_(*_claimable(utcnow(), queues, pipelines, direct))
                    )
                )
            ).scalar()
        if isinstance(value, str):  # SQLite: aggregates lose the column type
            value = dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)
        return value

    async def _retry_or_fail(
        self,
        conn: AsyncConnection,
        run: RunRecord,
        backoff: Backoff,
        *,
        reason: str,
        failure_class: FailureClass,
        immediate: bool = False,
    ) -> RunStatus:
        """Requeue ``run`` with backoff, or fail it once it used its attempts; return the status.

        ``immediate`` requeues at once and skips the attempt budget (a worker shutting down, an
        operator's decision).
        """
        now = utcnow()
        limit = run.max_attempts or DEFAULT_MAX_ATTEMPTS
        if not immediate and run.attempts >= limit:
            error = {
                "failure_class": str(failure_class),
                "message": f"gave up after {run.attempts} of {limit} attempts ({reason})",
                "attempts": run.attempts,
                "max_attempts": limit,
                "last_error": run.error,
            }
            seq = await bump_event_seq(
                conn,
                run.run_id,
                status=str(RunStatus.FAILED),
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
            data = {"failure_class": str(failure_class), "reason": reason, "attempts": run.attempts}
            await append_event(conn, run.run_id, seq, Event(EventKind.RUN_FAILED, data=data))
            return RunStatus.FAILED
        delay = 0.0 if immediate else backoff.delay(run.attempts)
        queue = run.queue or DEFAULT_QUEUE
        seq = await bump_event_seq(
            conn,
            run.run_id,
            status=str(RunStatus.QUEUED),
            queue=queue,
            scheduled_at=now + dt.timedelta(seconds=delay),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        data = {
            "reason": reason,
            "delay_seconds": round(delay, 3),
            "attempts": run.attempts,
            "previous_owner": run.lease_owner,
        }
        await append_event(conn, run.run_id, seq, Event(EventKind.RUN_REQUEUED, data=data))
        if delay == 0:
            await self._notify(conn, queue)
        return RunStatus.QUEUED

    async def settle_claim(
        self, claim: Claim, backoff: Backoff, *, interrupted: bool = False
    ) -> RunStatus:
        """After a worker's execution of ``claim`` ended, requeue or fail the run if it is left
        retryable (or still ``running``) under this claim's token; return the run's status.

        A run that completed, failed, was cancelled, parked in ``manual_review`` or was taken
        over by another executor is left as it is, so nothing is ever retried in a loop.
        ``interrupted`` (worker shutdown) requeues at once without counting against the budget.
        """
        async with self.transaction() as conn:
            run = await locked_run(conn, claim.run_id)
            if run.lease_token != claim.token or run.status not in (
                RunStatus.FAILED_RETRYABLE,
                RunStatus.RUNNING,
            ):
                return run.status
            return await self._retry_or_fail(
                conn,
                run,
                backoff,
                reason="worker_shutdown" if interrupted else "retryable_error",
                failure_class=FailureClass.RETRIES_EXHAUSTED,
                immediate=interrupted,
            )

    async def requeue(self, run_id: str, *, queue: str | None = None) -> RunStatus:
        """Put an unfinished run back on the queue, due now (an operator's ``--enqueue``).

        Accepts runs that are ``failed_retryable``, ``queued``, or ``running`` with an expired
        lease; returns the run's status afterwards (``queued``).
        """
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            if run.status == RunStatus.QUEUED:
                return RunStatus.QUEUED
            if run.status == RunStatus.COMPLETED:
                raise ConfigurationError(
                    f"run {run_id!r} has completed; there is nothing to resume"
                )
            if run.status == RunStatus.FAILED:
                raise RunFailed(run_id, run.error)
            if run.status == RunStatus.CANCELLED:
                raise RunCancelled(run_id)
            if run.status == RunStatus.MANUAL_REVIEW:
                raise ConfigurationError(
                    f"run {run_id!r} has a step in manual review; resolve it with "
                    f"`tidebase-agents steps review` first"
                )
            if lease_is_live(run, utcnow()):
                raise RunLocked(run_id, run.lease_owner, expires_at=run.lease_expires_at)
            if queue is not None:
                run = dataclasses.replace(run, queue=queue)
            return await self._retry_or_fail(
                conn,
                run,
                Backoff(),
                reason="operator",
                failure_class=FailureClass.RETRIES_EXHAUSTED,
                immediate=True,
            )

    async def reconcile(
        self, backoff: Backoff, *, orphan_grace: float, batch: int = 100
    ) -> ReconcileReport:
        """One reconciler pass: cancel runs past their deadline, requeue (or fail at
        ``max_attempts``) queue-managed runs whose lease expired, and requeue retryable runs
        no worker settled within ``orphan_grace`` seconds.

        Only the elected reconciler acts (on PostgreSQL an advisory lock elects one); rows
        another transaction holds are skipped until the next pass. ``manual_review`` runs are
        never touched except by their deadline.
        """
        report = ReconcileReport(elected=True)
        now = utcnow()
        async with self.transaction() as conn:
            if not await self._elect_reconciler(conn):
                return ReconcileReport(elected=False)

            async def candidates(*where: Any) -> list[RunRecord]:
                rows = await conn.execute(
                    select(*RUN_COLUMNS)
                    .where(*where)
                    .order_by(RunRow.updated_at)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
                return [run_from_mapping(r._mapping) for r in rows]

            active = [str(s) for s in ACTIVE_RUN_STATUSES]
            for run in await candidates(RunRow.status.in_(active), RunRow.deadline < now):
                seq = await bump_event_seq(
                    conn,
                    run.run_id,
                    status=str(RunStatus.CANCELLED),
                    error={
                        "failure_class": str(FailureClass.DEADLINE_EXCEEDED),
                        "deadline": run.deadline.isoformat() if run.deadline else None,
                    },
                    lease_expires_at=None,
                    finished_at=now,
                    updated_at=now,
                )
                data = {"from_status": run.status, "reason": str(FailureClass.DEADLINE_EXCEEDED)}
                await append_event(conn, run.run_id, seq, Event(EventKind.RUN_CANCELLED, data=data))
                report.cancelled.append(run.run_id)

            expired = await candidates(
                RunRow.status == RunStatus.RUNNING,
                RunRow.queue.is_not(None),
                RunRow.lease_expires_at < now,
            )
            orphaned = await candidates(
                RunRow.status == RunStatus.FAILED_RETRYABLE,
                RunRow.queue.is_not(None),
                RunRow.updated_at < now - dt.timedelta(seconds=orphan_grace),
            )
            for run, reason, failure_class in [
                *((r, "lease_expired", FailureClass.EXECUTOR_LOST) for r in expired),
                *((r, "retryable_error", FailureClass.RETRIES_EXHAUSTED) for r in orphaned),
            ]:
                status = await self._retry_or_fail(
                    conn, run, backoff, reason=reason, failure_class=failure_class
                )
                (report.requeued if status == RunStatus.QUEUED else report.failed).append(
                    run.run_id
                )
        return report
