"""Recovery of runs whose holder died (P3, P4): telling a dead holder from a live one, and
handing its runs to a worker at once instead of after the lease.

A holder is provably dead when its process no longer exists on this machine
(:mod:`.holders`), or, on PostgreSQL, when the advisory lock its database session held is free:
the server releases a session's locks the moment its connection drops. Neither proof is needed
for safety: every takeover bumps the fencing token, so a holder declared dead that still runs
has all its writes refused (R6). The proofs only make the takeover early.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence

from sqlalchemy import and_, or_, select, update

from .._vocab import EventKind, FailureClass, HolderDeath, RunStatus
from .holders import process_gone, this_process
from .queue import DEFAULT_MAX_ATTEMPTS, Backoff, QueueOps, lease_grant
from .records import Claim, Event, RunRecord, run_from_mapping, utcnow
from .rows import RUN_COLUMNS, append_event
from .tables import RunRow

#: How long a taker waits for a PostgreSQL server to release a killed holder's session lock
#: (it does so within milliseconds of the connection dropping) before calling it alive.
DEAD_SESSION_WAIT = 0.3


class RecoveryOps(QueueOps, abc.ABC):
    """The recovery half of a store: dead holders and the adoption of their runs."""

    async def holder(self) -> tuple[str | None, int | None]:
        """What a new lease records of its holder: this process's identity and, where the
        backend has one, the key of the session lock this store holds."""
        return this_process(), await self._session_key()

    async def _session_key(self) -> int | None:
        """The key of the advisory lock this store's session holds (None: the backend has
        no sessions, or the session is down)."""
        return None

    async def _sessions_gone(self, keys: Collection[int], *, wait: float = 0.0) -> set[int]:
        """Which of these session lock keys no session holds any more (waiting up to
        ``wait`` seconds for the others)."""
        return set()

    async def dead_holder(
        self, run: RunRecord, *, wait: float = DEAD_SESSION_WAIT
    ) -> HolderDeath | None:
        """How the holder of running ``run`` is provably dead, or None if it may be alive."""
        if run.status != RunStatus.RUNNING:
            return None
        if process_gone(run.lease_process):
            return HolderDeath.PROCESS
        if run.lease_session is not None and await self._sessions_gone(
            [run.lease_session], wait=wait
        ):
            return HolderDeath.SESSION
        return None

    async def adopt(
        self,
        *,
        owner: str,
        lease_seconds: float,
        pipelines: Sequence[str],
        queues: Sequence[str],
        direct: Sequence[str],
        limit: int,
        batch: int = 100,
    ) -> list[Claim]:
        """Take over for a worker up to ``limit`` running runs whose holder died or whose
        lease expired: queue-managed runs of ``pipelines`` on ``queues``, and runs started by
        a direct call (no queue) of the ``direct`` pipelines (P4). Each becomes a claim of
        ``owner``, as if claimed from the queue. A run that used up its attempts is failed
        (``executor_lost``) instead, so a run that kills its process is not retried forever.
        """
        if limit < 1 or not (pipelines or direct):
            return []
        now = utcnow()
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*RUN_COLUMNS)
                .where(
                    RunRow.status == RunStatus.RUNNING,
                    or_(
                        and_(RunRow.queue.in_(list(queues)), RunRow.pipeline.in_(list(pipelines))),
                        and_(RunRow.queue.is_(None), RunRow.pipeline.in_(list(direct))),
                    ),
                )
                # A dead holder stops renewing: its runs have the oldest expiries.
                .order_by(RunRow.lease_expires_at)
                .limit(batch)
            )
            runs = [run_from_mapping(r._mapping) for r in rows]
        dead: list[tuple[RunRecord, HolderDeath]] = []
        by_session: list[RunRecord] = []
        for run in runs:
            if run.lease_expires_at is None or run.lease_expires_at <= now:
                dead.append((run, HolderDeath.LEASE_EXPIRED))
            elif process_gone(run.lease_process):
                dead.append((run, HolderDeath.PROCESS))
            elif run.lease_session is not None:
                by_session.append(run)
        if by_session:
            gone = await self._sessions_gone(
                {r.lease_session for r in by_session if r.lease_session}
            )
            dead += [(r, HolderDeath.SESSION) for r in by_session if r.lease_session in gone]
        claims: list[Claim] = []
        if not dead:
            return claims
        process, session = await self.holder()
        for run, how in dead:
            if len(claims) >= limit:
                break
            claim = await self._adopt_one(run, how, owner, lease_seconds, process, session)
            if claim is not None:
                claims.append(claim)
        return claims

    async def _adopt_one(
        self,
        seen: RunRecord,
        how: HolderDeath,
        owner: str,
        lease_seconds: float,
        process: str | None,
        session: int | None,
    ) -> Claim | None:
        """Take ``seen`` over if it is still running under the token its dead holder had."""
        now = utcnow()
        async with self.transaction() as conn:
            row = (
                await conn.execute(
                    select(*RUN_COLUMNS)
                    .where(
                        RunRow.run_id == seen.run_id,
                        RunRow.status == RunStatus.RUNNING,
                        RunRow.lease_token == seen.lease_token,
                    )
                    .with_for_update(skip_locked=True)
                )
            ).first()
            if row is None:
                return None  # finished, taken over or being changed meanwhile
            run = run_from_mapping(row._mapping)
            if run.attempts >= (run.max_attempts or DEFAULT_MAX_ATTEMPTS):
                await self._retry_or_fail(
                    conn,
                    run,
                    Backoff(),
                    reason=f"holder died ({how})",
                    failure_class=FailureClass.EXECUTOR_LOST,
                )
                return None
            taken = (
                await conn.execute(
                    update(RunRow)
                    .where(RunRow.run_id == run.run_id)
                    .values(
                        **lease_grant(owner, lease_seconds, now, process, session),
                    )
                    .returning(RunRow.lease_token, RunRow.attempts, RunRow.event_seq)
                )
            ).one()
            data = {
                "owner": owner,
                "from_status": str(RunStatus.RUNNING),
                "previous_owner": run.lease_owner,
                "token": taken.lease_token,
                "holder_dead": str(how),
                "adopted": True,
            }
            await append_event(
                conn, run.run_id, taken.event_seq, Event(EventKind.LEASE_TAKEN_OVER, data=data)
            )
            return Claim(run.run_id, run.pipeline, run.queue, taken.lease_token, taken.attempts)
