"""Operator rewinds (P5): fork a run from a step into a new run, or reset a run to a step.

Both cut a run's checkpoints at a step, in the order they were recorded: the step, every
checkpoint recorded after it, and the enclosing steps of those (a step re-runs only if the
steps around it do) are *discarded*; what was recorded before is *kept*. The cut's time is
when the earliest discarded checkpoint started: state versions appended from then on belong
to discarded work. Both refuse a run whose lease is live (``RunLocked``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, literal, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import RunCancelled, RunConflict, RunLocked, StepNotFound
from .._vocab import EventKind, RunStatus, StepStatus
from .records import STEP_FIELDS, Event, StepsReset, utcnow
from .rows import append_event, bump_event_seq, lease_is_live, locked_run
from .tables import RunRow, StateRow, StepRow, UsageRow

#: How many discarded step names an event lists (the count is always complete).
EVENT_NAMES = 50
#: Rows changed per statement (the drivers bound the number of parameters).
BATCH = 1000


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    id: int
    name: str
    status: str
    started_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where a run is cut: at ``step`` (None: nothing is discarded). The discarded checkpoints
    are those from id ``start`` on and the ones named in ``earlier`` (recorded before it: the
    step's own nested steps, enclosing steps); ``discarded`` names them all in recording order,
    ``kept`` counts the others. ``since`` is the cut's time."""

    step: str | None
    start: int | None
    earlier: list[str]
    discarded: list[str]
    kept: int
    since: dt.datetime | None

    def where_discarded(self, run_id: str) -> list[Any]:
        """The discarded checkpoints of ``run_id``, as a filter on the steps table."""
        return [StepRow.run_id == run_id, _or_in(StepRow.id >= self.start, self.earlier)]

    def where_kept(self, run_id: str) -> list[Any]:
        """The kept checkpoints of ``run_id``, as a filter on the steps table."""
        if self.start is None:
            return [StepRow.run_id == run_id]
        kept = [StepRow.run_id == run_id, StepRow.id < self.start]
        return [*kept, StepRow.name.not_in(self.earlier)] if self.earlier else kept


def _or_in(clause: Any, names: list[str]) -> Any:
    return or_(clause, StepRow.name.in_(names)) if names else clause


def enclosing(name: str) -> Iterator[str]:
    """The scopes ``name`` is nested in (``a/b/c``: ``a``, ``a/b``)."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _inside(name: str, step: str) -> bool:
    return name == step or name.startswith(f"{step}/")


def plan_cut(run_id: str, checkpoints: Sequence[_Checkpoint], step: str | None) -> Cut:
    """Cut at ``step``; with None, at the first outermost checkpoint that is not completed
    (nothing is discarded if every one is)."""
    names = {c.name for c in checkpoints}
    if step is None:
        outermost = (c for c in checkpoints if not any(a in names for a in enclosing(c.name)))
        first = next((c for c in outermost if c.status != StepStatus.COMPLETED), None)
        if first is None:
            return Cut(None, None, [], [], len(checkpoints), None)
        step = first.name
    subtree = [c for c in checkpoints if _inside(c.name, step)]
    if not subtree:
        raise StepNotFound(run_id, step)
    start = min(c.id for c in subtree)
    cut = {c.name for c in checkpoints if c.id >= start or _inside(c.name, step)}
    cut |= {a for n in cut for a in enclosing(n) if a in names}
    discarded = [c for c in checkpoints if c.name in cut]
    return Cut(
        step,
        start,
        [c.name for c in discarded if c.id < start],
        [c.name for c in discarded],
        len(checkpoints) - len(discarded),
        min(c.started_at for c in discarded),
    )


def _superseded(step: str | None, cut: Cut) -> bool:
    """Whether usage recorded (after the cut's time) under scope ``step`` was spent by
    discarded work: outside any step, in a discarded step or one nested in it, or in a scope
    that encloses one (it re-runs)."""
    if step is None:
        return True
    scopes = {*cut.discarded, cut.step}
    return (
        step in scopes
        or any(a in scopes for a in enclosing(step))
        or any(d.startswith(f"{step}/") for d in scopes if d)
    )


class RewindOps(abc.ABC):
    """Fork and reset; backends supply the transactions."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def _insert(self) -> Any: ...

    @abc.abstractmethod
    async def _notify(self, conn: AsyncConnection, queue: str) -> None:
        """Wake workers of ``queue`` at commit (:class:`.queue.QueueOps` has it)."""

    async def _cut(self, conn: AsyncConnection, run_id: str, step: str | None) -> Cut:
        rows = await conn.execute(
            select(StepRow.id, StepRow.name, StepRow.status, StepRow.started_at)
            .where(StepRow.run_id == run_id)
            .order_by(StepRow.id)
        )
        return plan_cut(run_id, [_Checkpoint(*r) for r in rows], step)

    async def _state_before(
        self, conn: AsyncConnection, run_id: str, since: dt.datetime | None
    ) -> int:
        """How many state versions the cut keeps: those appended before ``since``, counted
        from version 1 (replay counts ``state_set`` calls, so what is kept is a prefix)."""
        rows = await conn.execute(
            select(StateRow.version, StateRow.created_at)
            .where(StateRow.run_id == run_id)
            .order_by(StateRow.version)
        )
        kept = 0
        for version, created_at in rows:
            if since is not None and created_at >= since:
                break
            kept = version
        return kept

    async def fork(self, run_id: str, new_run_id: str, step: str | None) -> Cut:
        """Create run ``new_run_id`` from ``run_id`` with the checkpoints recorded before
        ``step`` and the state versions appended before them; it waits to be executed
        (queued on the run's queue, else ``failed_retryable``). Usage is not copied: the fork
        did not spend it. Both runs' event logs record the lineage."""
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            if lease_is_live(run, now):
                raise RunLocked(run_id, run.lease_owner, expires_at=run.lease_expires_at)
            cut = await self._cut(conn, run_id, step)
            versions = await self._state_before(conn, run_id, cut.since)
            inserted = (
                await conn.execute(
                    self._insert()(RunRow)
                    .values(
                        run_id=new_run_id,
                        pipeline=run.pipeline,
                        status=str(RunStatus.QUEUED if run.queue else RunStatus.FAILED_RETRYABLE),
                        input=run.input,
                        input_hash=run.input_hash,
                        attempts=0,
                        lease_token=0,
                        event_seq=1,
                        state_version=versions,
                        queue=run.queue,
                        priority=run.priority,
                        scheduled_at=now if run.queue else None,
                        max_attempts=run.max_attempts,
                        created_at=now,
                        updated_at=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(RunRow.run_id)
                )
            ).scalar()
            if inserted is None:
                raise RunConflict(f"run id {new_run_id!r} exists; give the fork another one")
            if cut.kept:
                # Copied in recording order, so the fork's checkpoints keep it. A lease token
                # of 0: no execution of the fork wrote them.
                columns = [c for c in STEP_FIELDS if c != "lease_token"]
                await conn.execute(
                    insert(StepRow).from_select(
                        ["run_id", "lease_token", *columns],
                        select(
                            literal(new_run_id),
                            literal(0),
                            *(getattr(StepRow, c) for c in columns),
                        )
                        .where(*cut.where_kept(run_id))
                        .order_by(StepRow.id),
                    )
                )
            if versions:
                await conn.execute(
                    insert(StateRow).from_select(
                        ["run_id", "version", "value", "created_at"],
                        select(
                            literal(new_run_id),
                            StateRow.version,
                            StateRow.value,
                            StateRow.created_at,
                        ).where(StateRow.run_id == run_id, StateRow.version <= versions),
                    )
                )
            lineage = {"from_step": cut.step, "steps_copied": cut.kept}
            await append_event(
                conn,
                new_run_id,
                1,
                Event(
                    EventKind.RUN_FORKED,
                    cut.step,
                    {"from_run": run_id, **lineage, "state_versions_copied": versions},
                ),
            )
            seq = await bump_event_seq(conn, run_id)
            await append_event(
                conn,
                run_id,
                seq,
                Event(EventKind.RUN_FORK_CREATED, cut.step, {"fork": new_run_id, **lineage}),
            )
            if run.queue:
                await self._notify(conn, run.queue)
            return cut

    async def reset_step(self, run_id: str, step: str) -> StepsReset:
        """Discard ``step``'s checkpoint and every one recorded after it, and the state
        versions appended since, so the next invocation executes them again.

        Usage recorded by the discarded work stays in the ledger (it was billed) but is
        marked ``lost`` and set aside, so what the re-run spends is recorded too (R9). The run
        can then be invoked again: ``failed_retryable`` (``queued`` if it was; still
        ``manual_review`` if a kept step waits for review). A cancelled run stays cancelled.
        """
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            if run.status == RunStatus.CANCELLED:
                raise RunCancelled(run_id)
            if lease_is_live(run, now):
                raise RunLocked(run_id, run.lease_owner, expires_at=run.lease_expires_at)
            cut = await self._cut(conn, run_id, step)
            assert cut.since is not None
            await conn.execute(delete(StepRow).where(*cut.where_discarded(run_id)))
            state_version = await self._state_before(conn, run_id, cut.since)
            dropped = (
                await conn.execute(
                    delete(StateRow)
                    .where(StateRow.run_id == run_id, StateRow.version > state_version)
                    .returning(StateRow.version)
                )
            ).all()
            recent = await conn.execute(
                select(UsageRow.id, UsageRow.step).where(
                    UsageRow.run_id == run_id, UsageRow.created_at >= cut.since
                )
            )
            superseded = [u.id for u in recent if _superseded(u.step, cut)]
            parked = (
                await conn.execute(
                    select(func.count())
                    .select_from(StepRow)
                    .where(StepRow.run_id == run_id, StepRow.status == StepStatus.MANUAL_REVIEW)
                )
            ).scalar_one()
            if run.status == RunStatus.QUEUED:
                status = RunStatus.QUEUED
            elif run.status == RunStatus.MANUAL_REVIEW and parked:
                status = RunStatus.MANUAL_REVIEW
            else:
                status = RunStatus.FAILED_RETRYABLE
            seq = await bump_event_seq(
                conn,
                run_id,
                status=str(status),
                output=null(),
                error=null(),
                finished_at=None,
                lease_owner=None,
                lease_expires_at=None,
                state_version=state_version,
                updated_at=now,
            )
            for i in range(0, len(superseded), BATCH):
                # Set aside under a key of their own: the re-run records its usage afresh.
                await conn.execute(
                    update(UsageRow)
                    .where(UsageRow.id.in_(superseded[i : i + BATCH]))
                    .values(lost=True, dedupe_key=UsageRow.dedupe_key + f"~reset#{seq}")
                )
            await append_event(
                conn,
                run_id,
                seq,
                Event(
                    EventKind.STEPS_RESET,
                    step,
                    {
                        "from_status": str(run.status),
                        "steps_discarded": len(cut.discarded),
                        "discarded": cut.discarded[:EVENT_NAMES],
                        "state_versions_discarded": len(dropped),
                        "usage_superseded": len(superseded),
                    },
                ),
            )
            return StepsReset(
                run_id=run_id,
                step=step,
                discarded=cut.discarded,
                state_versions_discarded=len(dropped),
                usage_superseded=len(superseded),
                status=status,
            )
