"""The store interface, and what both backends share: engine lifecycle, reads, operator actions.

Writes made on behalf of an executing run are *fenced*: each first bumps the run's event counter
on the condition that the run is still ``running`` under the caller's lease token, in the same
commit as the write. A zombie whose lease was taken over, or a run cancelled meanwhile, gets
``LeaseLost`` / ``RunCancelled`` and nothing of its write lands (R6, R12). The counter hands out
the event sequence numbers, so the event log is gap-free under concurrent writers (R11). Each
backend writes them its own way (:mod:`.postgres`, :mod:`.sqlite`); nothing outside the backend
modules knows which database it talks to.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from sqlalchemy import (
    BigInteger,
    case,
    cast,
    event,
    extract,
    func,
    literal,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._config import redact
from .._errors import (
    ConfigurationError,
    DatabaseUnavailable,
    LeaseLost,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunLocked,
    RunNotFound,
    StepNotReviewable,
)
from .._vocab import (
    EVENT_OF_REVIEW,
    STEP_STATUS_AFTER_REVIEW,
    TERMINAL_RUN_STATUSES,
    EventKind,
    ReviewAction,
    RunStatus,
    StepStatus,
)
from . import migrate as _migrate
from .records import (
    USAGE_FIELDS,
    Acquired,
    DeadHolder,
    Event,
    EventRecord,
    Lease,
    NewRun,
    RunCursor,
    RunPage,
    RunRecord,
    StateVersion,
    StepRecord,
    UsageRecord,
    run_from_mapping,
    step_from_mapping,
    utcnow,
)
from .recovery import RecoveryOps
from .retention import RetentionOps
from .rewind import RewindOps
from .rows import (
    RUN_COLUMNS,
    STEP_COLUMNS,
    append_event,
    bump_event_seq,
    fenced_bump,
    lease_is_live,
    locked_run,
)
from .tables import EventRow, RunRow, StateRow, StepRow, UsageRow
from .waits import WaitOps

if TYPE_CHECKING:
    from sqlalchemy import Select
    from typing_extensions import Unpack

#: How long closing a store waits for operations still in flight (seconds).
CLOSE_GRACE = 30.0
#: How many times acquisition re-decides when the run changed under it.
ACQUIRE_TRIES = 3

_USAGE_GROUPS = {"run": UsageRow.run_id, "pipeline": RunRow.pipeline, "model": UsageRow.model}
USAGE_GROUP_KEYS = tuple(_USAGE_GROUPS)
_TOKEN_COLUMNS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "total_tokens")


class Listener(Protocol):
    """A connection that wakes a worker when runs are enqueued."""

    async def ping(self, timeout: float) -> None: ...

    def close(self) -> None: ...


class Store(RecoveryOps, RewindOps, RetentionOps, WaitOps, abc.ABC):
    """One database: every read and write the library makes. Obtain one with ``open_store``."""

    #: The SQLAlchemy backend name this class serves.
    backend: ClassVar[str]

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.url = url
        #: The PostgreSQL schema of the tables (None where the backend has no schemas).
        self.schema = schema
        self.engine: AsyncEngine = self._make_engine()
        self._ready: asyncio.Future[None] | None = None
        #: Statements sent to the database by this store, for round-trip accounting.
        self.statements = 0
        self._closed = False
        self._busy = 0  # operations holding a connection
        self._drained: asyncio.Event | None = None
        #: Called once when the store closes (the registry forgets it then).
        self.on_close: Callable[[Store], None] | None = None
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, *_args: Any) -> None:
        self.statements += 1

    @abc.abstractmethod
    def _make_engine(self) -> AsyncEngine: ...

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Check the database is reachable and migrated (embedded SQLite migrates itself)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self._open()
            except BaseException as exc:
                self._ready.set_exception(exc)
                self._ready.exception()  # retrieved: a later open() re-raises it
                self._ready = None
                raise
            self._ready.set_result(None)
        await self._ready

    @abc.abstractmethod
    async def _open(self) -> None: ...

    async def schema_revision(self) -> str | None:
        """The tidebase Alembic revision of the database, or None if it has none."""
        async with self.connect() as conn:
            return await conn.run_sync(_migrate.read_revision, self.schema)

    async def migrate(self, revision: str = "head", *, stamp: bool = False) -> None:
        """Run the packaged Alembic migrations up to ``revision`` (``stamp``: only record
        ``revision`` as applied, for tables that were created another way)."""
        async with self.connect() as conn:
            await conn.run_sync(
                _migrate.run_alembic, "stamp" if stamp else "upgrade", revision, self.schema
            )
            await conn.commit()

    async def migration_sql(self) -> str:
        """The DDL that :meth:`migrate` would run from the database's revision (read if the
        database can be reached; else from an empty database), without applying any."""
        if self.schema is None:
            raise ConfigurationError(
                "migrate --sql prints PostgreSQL DDL; an SQLite database migrates itself on "
                "first use"
            )
        try:
            async with self.connect() as conn:
                plan = await conn.run_sync(_migrate.plan_offline, self.schema)
        except DatabaseUnavailable:
            plan = _migrate.OfflinePlan(None, None)
        return _migrate.offline_sql(self.url, self.schema, plan)

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        """The library's error for a database that could not be used, naming the cause."""
        detail = getattr(exc, "orig", None) or exc
        return DatabaseUnavailable(
            f"cannot reach database {redact(self.url)}: {type(detail).__name__}: {detail}"
        )

    async def close(self) -> None:
        """Let operations in flight finish, then release every connection.

        Operations are waited for, not interrupted: a database call cancelled midway makes the
        driver tear its connection down, and aiosqlite's teardown can then wait forever,
        hanging the process's ``asyncio.run``. Later calls on this store raise
        ``DatabaseUnavailable``; ``open_store`` hands out a new one.
        """
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close(self)
        if self._busy:
            self._drained = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), CLOSE_GRACE)
        await self._close_backend()
        await self.engine.dispose()

    async def _close_backend(self) -> None:
        """Release what a backend holds besides the engine."""

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark an operation in flight, so :meth:`close` waits for it."""
        if self._closed:
            raise DatabaseUnavailable(
                f"the store for {redact(self.url)} was closed (Tidebase.close()); "
                "work still running after it cannot checkpoint"
            )
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._drained is not None:
                self._drained.set()

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection, for reads and for work outside a single transaction."""
        with self.in_use(), self.driver_errors():
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection in a transaction, committed when the block ends."""
        with self.in_use(), self.driver_errors():
            async with self.engine.begin() as conn:
                yield conn

    @abc.abstractmethod
    def driver_errors(self) -> contextlib.AbstractContextManager[None]:
        """Map the driver's connection errors to :class:`DatabaseUnavailable`."""

    # -- acquisition -----------------------------------------------------------------------

    async def acquire(
        self,
        new: NewRun,
        *,
        create: bool = True,
        claim_token: int | None = None,
        fresh_id: bool = False,
    ) -> Acquired:
        """Start or resume a run: create it, take its lease, or report it completed.

        ``fresh_id`` says the caller just generated the id, so the run is new. ``claim_token``
        is for a worker that already claimed the run (``running`` under that token and owner):
        the claim becomes the execution's lease.

        A run whose holder is provably dead (:meth:`dead_holder`) is taken over at once, its
        lease live or not (P3). Raises ``RunLocked`` while another executor that may be alive
        holds a live lease, ``RunFailed`` /
        ``RunCancelled`` for runs that ended so, ``RunConflict`` if the id belongs to another
        pipeline or was recorded with other arguments. Loads every checkpoint in one query (R8).
        """
        for _ in range(ACQUIRE_TRIES):
            if claim_token is None:
                if create:
                    created = await self._create_run(new)
                    if created is not None:
                        return Acquired(created, Lease(new.run_id, 1, new.owner), {})
                if not fresh_id:
                    taken = await self._take_over(new)
                    if taken is not None:
                        return await self._with_steps(taken, new.owner)
            run = await self._get_run_or_none(new.run_id)
            if run is None:
                if not create:
                    raise RunNotFound(new.run_id)
                continue  # deleted meanwhile, or we raced a creation: decide again
            try:
                acquired = self._explain(run, new, claim_token)
            except RunLocked:
                how = None if claim_token is not None else await self.dead_holder(run)
                if how is None:
                    raise
                taken = await self._take_over(new, DeadHolder(run.lease_token, how))
                if taken is not None:
                    return await self._with_steps(taken, new.owner)
                continue  # the run changed meanwhile: decide again
            if acquired is not None:
                return (
                    acquired if acquired.lease is None else await self._with_steps(run, new.owner)
                )
        raise RunLocked(new.run_id, None, detail="it kept changing hands while being acquired")

    async def _with_steps(self, run: RunRecord, owner: str) -> Acquired:
        steps = {} if run.event_seq == 1 else await self.load_steps(run.run_id)
        return Acquired(run, Lease(run.run_id, run.lease_token, owner), steps)

    def _explain(self, run: RunRecord, new: NewRun, claim_token: int | None) -> Acquired | None:
        """Why ``run`` could not be taken: the outcome for the caller, or None to try again."""
        if run.pipeline != new.pipeline:
            raise RunConflict(
                f"run id {new.run_id!r} belongs to pipeline {run.pipeline!r}, not {new.pipeline!r}"
            )
        if new.input_hash is not None and run.input_hash not in (None, new.input_hash):
            raise RunConflict(
                f"run {new.run_id!r} was started with other arguments (input hash "
                f"{(run.input_hash or '')[:16]}, now {new.input_hash[:16]}); resume it with the "
                f"recorded arguments (`.resume(run_id)`) or use a new run id"
            )
        if run.status == RunStatus.COMPLETED:
            return Acquired(run, None, {})
        if run.status == RunStatus.FAILED:
            raise RunFailed(new.run_id, run.error)
        if run.status == RunStatus.CANCELLED:
            raise RunCancelled(new.run_id)
        if claim_token is not None:
            if (
                run.status == RunStatus.RUNNING
                and run.lease_token == claim_token
                and run.lease_owner == new.owner
            ):
                return Acquired(run, Lease(run.run_id, claim_token, new.owner), {})
            raise LeaseLost(new.run_id, "the claim was taken over before it started")
        if lease_is_live(run, utcnow()):
            raise RunLocked(new.run_id, run.lease_owner, expires_at=run.lease_expires_at)
        return None

    @abc.abstractmethod
    async def _create_run(self, new: NewRun) -> RunRecord | None:
        """Insert the run under a first lease; None if the id exists."""

    @abc.abstractmethod
    async def _take_over(self, new: NewRun, dead: DeadHolder | None = None) -> RunRecord | None:
        """Take the lease of a run that may be (re)started (``sql.takeover_rule``), or whose
        holder ``dead`` was found dead; None if it may not, for :meth:`_explain` to say why."""

    # -- fenced writes ---------------------------------------------------------------------

    @abc.abstractmethod
    async def write_step(
        self,
        lease: Lease,
        step: StepRecord,
        *,
        events: Sequence[Event] = (),
        usage: Sequence[UsageRecord] = (),
        output_json: str | None = None,
        input_json: str | None = None,
        transient: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Insert or update a step under the lease, with its events and usage, in one commit.

        ``output_json`` / ``input_json`` are the step's output / recorded input already
        serialized, when the caller has them (``input_json`` takes the place of
        ``step.input``). Usage an earlier execution recorded for the same steps is marked
        lost. ``transient`` drops the step's nested checkpoints with a name segment starting
        with it.
        """

    @abc.abstractmethod
    async def delete_steps(
        self,
        lease: Lease,
        names: Sequence[str],
        *,
        event: Event,
        timeout: float | None = None,
    ) -> None:
        """Delete these checkpoints of the run under the lease."""

    @abc.abstractmethod
    async def record_usage(
        self, lease: Lease, usage: Sequence[UsageRecord], *, timeout: float | None = None
    ) -> None:
        """Record usage under the lease; records whose dedupe key exists are skipped (R9)."""

    @abc.abstractmethod
    async def append_state(
        self, lease: Lease, version: int, value: Any, *, timeout: float | None = None
    ) -> None:
        """Append state version ``version`` under the lease (R10)."""

    @abc.abstractmethod
    async def finish(
        self,
        lease: Lease,
        status: RunStatus,
        *,
        output: Any = None,
        error: Any = None,
        event: Event,
        timeout: float | None = None,
    ) -> None:
        """End the execution: complete, fail, or park the run, and release its lease."""

    @abc.abstractmethod
    async def check_lease(self, lease: Lease, *, timeout: float | None = None) -> None:
        """Raise ``RunCancelled`` or ``LeaseLost`` unless ``lease`` still holds a running run."""

    async def heartbeat(
        self, lease: Lease, lease_seconds: float, *, timeout: float | None = None
    ) -> None:
        """Extend the lease; raises ``LeaseLost`` or ``RunCancelled`` when it is gone."""
        async with self.transaction() as conn:
            await fenced_bump(
                conn, lease, 0, lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds)
            )

    async def mark_keyed(self, lease: Lease, step: str) -> None:
        """Record that a step's intent record is keyed, if it is still running (R5)."""
        async with self.transaction() as conn:
            seq = await fenced_bump(conn, lease, 1)
            await conn.execute(
                update(StepRow)
                .where(
                    StepRow.run_id == lease.run_id,
                    StepRow.name == step,
                    StepRow.status == StepStatus.RUNNING,
                )
                .values(keyed=True)
            )
            await append_event(conn, lease.run_id, seq, Event(EventKind.STEP_KEY_READ, step))

    async def listen(self, callback: Callable[[str], None]) -> Listener | None:
        """Call ``callback(queue)`` when a run is enqueued; None if this database cannot push."""
        return None

    # -- operator actions ------------------------------------------------------------------

    async def cancel(self, run_id: str, reason: str | None = None) -> RunStatus:
        """Cancel a run that has not ended; return its status afterwards. One-way (R12)."""
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            if run.status in TERMINAL_RUN_STATUSES:
                return run.status
            seq = await bump_event_seq(
                conn,
                run_id,
                status=RunStatus.CANCELLED,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
            )
            await append_event(
                conn,
                run_id,
                seq,
                Event(EventKind.RUN_CANCELLED, data={"from_status": run.status, "reason": reason}),
            )
            return RunStatus.CANCELLED

    async def review_step(
        self, run_id: str, step: str, action: ReviewAction, output: Any = None
    ) -> StepRecord:
        """Resolve a step parked in ``manual_review``: ``retry``, ``output`` or ``fail``."""
        now = utcnow()
        async with self.transaction() as conn:
            run = await locked_run(conn, run_id)
            row = (
                await conn.execute(
                    select(*STEP_COLUMNS).where(StepRow.run_id == run_id, StepRow.name == step)
                )
            ).first()
            if row is None or row.status != StepStatus.MANUAL_REVIEW:
                raise StepNotReviewable(run_id, step, None if row is None else row.status)
            step_status = STEP_STATUS_AFTER_REVIEW[action]
            step_values: dict[str, Any] = {"status": step_status}
            if action == ReviewAction.OUTPUT:
                step_values.update(output=output, completed_at=now, error=None)
            await conn.execute(
                update(StepRow)
                .where(StepRow.run_id == run_id, StepRow.name == step)
                .values(**step_values)
            )
            run_status = (
                RunStatus.FAILED if action == ReviewAction.FAIL else RunStatus.FAILED_RETRYABLE
            )
            run_values: dict[str, Any] = {
                "status": run.status if run.status in TERMINAL_RUN_STATUSES else run_status,
                "updated_at": now,
            }
            if action == ReviewAction.FAIL:
                run_values.update(
                    error={"step": step, "message": "failed by operator review"}, finished_at=now
                )
            seq = await bump_event_seq(conn, run_id, **run_values)
            await append_event(conn, run_id, seq, Event(EVENT_OF_REVIEW[action], step))
            return dataclasses.replace(step_from_mapping(row._mapping), **step_values)

    # -- reads -----------------------------------------------------------------------------

    async def _get_run_or_none(self, run_id: str) -> RunRecord | None:
        async with self.connect() as conn:
            row = (await conn.execute(select(*RUN_COLUMNS).where(RunRow.run_id == run_id))).first()
        return None if row is None else run_from_mapping(row._mapping)

    async def get_run(self, run_id: str) -> RunRecord:
        run = await self._get_run_or_none(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        """Every checkpoint of a run, in one query, in the order they were first written."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*STEP_COLUMNS).where(StepRow.run_id == run_id).order_by(StepRow.id)
            )
            return {r.name: step_from_mapping(r._mapping) for r in rows}

    async def list_runs(
        self,
        *,
        statuses: Sequence[RunStatus] = (),
        pipelines: Sequence[str] = (),
        queues: Sequence[str] = (),
        since: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs newest first, filtered by any of the given statuses, pipelines and queues."""
        q = _run_filters(select(*RUN_COLUMNS), statuses, pipelines, queues, since)
        q = q.order_by(RunRow.created_at.desc()).limit(limit)
        async with self.connect() as conn:
            return [run_from_mapping(r._mapping) for r in await conn.execute(q)]

    async def runs_page(
        self,
        *,
        statuses: Sequence[RunStatus] = (),
        pipelines: Sequence[str] = (),
        queues: Sequence[str] = (),
        since: dt.datetime | None = None,
        before: RunCursor | None = None,
        limit: int = 50,
    ) -> RunPage:
        """Runs in keyset order (newest ``created_at`` first, then ``run_id``) after ``before``.

        The row comparison walks an index from the cursor on, so a deep page costs what the
        first one does, however many runs the table holds.
        """
        q = _run_filters(select(*RUN_COLUMNS), statuses, pipelines, queues, since)
        if before is not None:
            q = q.where(
                tuple_(RunRow.created_at, RunRow.run_id) < (before.created_at, before.run_id)
            )
        q = q.order_by(RunRow.created_at.desc(), RunRow.run_id.desc()).limit(limit + 1)
        async with self.connect() as conn:
            runs = [run_from_mapping(r._mapping) for r in await conn.execute(q)]
        if len(runs) <= limit:
            return RunPage(runs, None)
        last = runs[limit - 1]
        return RunPage(runs[:limit], RunCursor(last.created_at, last.run_id))

    async def count_runs(
        self,
        by: str,
        *,
        statuses: Sequence[RunStatus] = (),
        pipelines: Sequence[str] = (),
        queues: Sequence[str] = (),
        since: dt.datetime | None = None,
        cap: int | None = None,
    ) -> dict[str | None, int]:
        """How many runs match, per value of ``by`` (``status``, ``pipeline`` or ``queue``).

        With ``cap`` (``by="status"`` only) no count goes past ``cap + 1``, so counting costs
        the same however many runs the table holds: up to ``cap + 1`` matching runs are read,
        and only if more match, each status is counted on its own index range (by status and
        creation time), up to ``cap + 1``. A pipeline or queue filter has no such range: the
        runs it keeps are counted in full, in one read.
        """
        column = _RUN_COUNT_GROUPS[by]
        if cap is not None and column is not RunRow.status:
            raise ValueError("only counts by status can be capped")

        def grouped(limit: int | None) -> Any:
            q = _run_filters(select(column), statuses, pipelines, queues, since).limit(limit)
            sample = q.subquery()
            return select(sample.c[0], func.count()).group_by(sample.c[0])

        async with self.connect() as conn:

            async def counts(q: Any) -> dict[str | None, int]:
                return {key: int(n) for key, n in (await conn.execute(q)).all() if n}

            if cap is None or pipelines or queues:
                found = await counts(grouped(None))
                return found if cap is None else {k: min(n, cap + 1) for k, n in found.items()}
            found = await counts(grouped(cap + 1))
            if sum(found.values()) <= cap:
                return found
            return await counts(
                union_all(
                    *(
                        select(literal(str(s)), func.count()).select_from(
                            _run_filters(select(RunRow.run_id), [s], (), (), since)
                            .limit(cap + 1)
                            .subquery()
                        )
                        for s in statuses or list(RunStatus)
                    )
                )
            )

    async def get_events(self, run_id: str) -> list[EventRecord]:
        async with self.connect() as conn:
            rows = await conn.execute(
                select(
                    EventRow.run_id,
                    EventRow.seq,
                    EventRow.kind,
                    EventRow.step,
                    EventRow.data,
                    EventRow.created_at,
                )
                .where(EventRow.run_id == run_id)
                .order_by(EventRow.seq)
            )
            return [EventRecord(**r._mapping) for r in rows]

    async def get_state(self, run_id: str) -> list[StateVersion]:
        """Every state version of a run, oldest first."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(StateRow.version, StateRow.value, StateRow.created_at)
                .where(StateRow.run_id == run_id)
                .order_by(StateRow.version)
            )
            return [StateVersion(**r._mapping) for r in rows]

    async def get_usage(self, run_id: str) -> list[UsageRecord]:
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*(getattr(UsageRow, f) for f in USAGE_FIELDS))
                .where(UsageRow.run_id == run_id)
                .order_by(UsageRow.id)
            )
            return [UsageRecord(**r._mapping) for r in rows]

    async def usage_totals(
        self,
        by: Sequence[str],
        *,
        pipeline: str | None = None,
        run_id: str | None = None,
        since: dt.datetime | None = None,
        run_ids: Sequence[str] | None = None,
        bucket_seconds: int | None = None,
    ) -> list[dict[str, Any]]:
        """Token sums per group of ``by`` (of ``run``, ``pipeline``, ``model``) and model.

        Each row has the group keys and ``model``, the token sums, ``records``, ``lost_tokens``
        (spent on work a later attempt did again),
        ``recorded_cost`` (the sum of costs the records carry) and ``unpriced_input`` /
        ``unpriced_output`` / ``unpriced_cached``: tokens of records without a cost.
        ``run_ids`` keeps only those runs' records. With ``bucket_seconds`` the sums are
        also per time bucket: ``bucket`` is the start of the record's bucket in epoch seconds.
        Usage of pruned runs comes from the daily rollups (``run`` None), except for a
        ``run_id`` / ``run_ids`` read.
        """
        unpriced = UsageRow.cost_usd.is_(None)
        keyed = {k: _USAGE_GROUPS[k] for k in dict.fromkeys([*by, "model"])}
        if bucket_seconds is not None:
            keyed["bucket"] = _epoch_bucket(UsageRow.created_at, bucket_seconds)
        groups = list(keyed.values())
        cols = [
            *(column.label(k) for k, column in keyed.items()),
            *(func.sum(getattr(UsageRow, c)).label(c) for c in _TOKEN_COLUMNS),
            func.count().label("records"),
            func.sum(case((UsageRow.lost, UsageRow.total_tokens), else_=0)).label("lost_tokens"),
            func.sum(UsageRow.cost_usd).label("recorded_cost"),
            *(
                func.sum(case((unpriced, getattr(UsageRow, f"{c}_tokens")), else_=0)).label(
                    f"unpriced_{c}"
                )
                for c in ("input", "output", "cached")
            ),
        ]
        q = select(*cols).join(RunRow, RunRow.run_id == UsageRow.run_id).group_by(*groups)
        if pipeline:
            q = q.where(RunRow.pipeline == pipeline)
        if run_id:
            q = q.where(UsageRow.run_id == run_id)
        if since:
            q = q.where(UsageRow.created_at >= since)
        if run_ids is not None:
            q = q.where(UsageRow.run_id.in_(list(run_ids)))
        async with self.connect() as conn:
            live = [dict(r._mapping) for r in await conn.execute(q)]
        if run_id or run_ids is not None:
            return live  # pruned runs are gone, and so is their per-run usage
        # Pruned runs' usage lives on in the daily rollups (``Store.prune``).
        return live + await self.rollup_totals(
            by, pipeline=pipeline, since=since, bucket_seconds=bucket_seconds
        )


_RUN_COUNT_GROUPS = {"status": RunRow.status, "pipeline": RunRow.pipeline, "queue": RunRow.queue}
RUN_COUNT_KEYS = tuple(_RUN_COUNT_GROUPS)


# Any select statement, whatever its columns (a string: SQLAlchemy 2.0 and 2.1 spell it apart).
S = TypeVar("S", bound="Select[Unpack[tuple[Any, ...]]]")


def _run_filters(
    q: S,
    statuses: Sequence[RunStatus],
    pipelines: Sequence[str],
    queues: Sequence[str],
    since: dt.datetime | None,
) -> S:
    """``q`` limited to runs in any of ``statuses``, ``pipelines`` and ``queues``, created
    since ``since`` (an empty filter keeps every run)."""
    if statuses:
        q = q.where(RunRow.status.in_([str(s) for s in statuses]))
    if pipelines:
        q = q.where(RunRow.pipeline.in_(list(pipelines)))
    if queues:
        q = q.where(RunRow.queue.in_(list(queues)))
    if since:
        q = q.where(RunRow.created_at >= since)
    return q


def _epoch_bucket(column: Any, seconds: int) -> Any:
    """The start (epoch seconds) of the ``seconds``-long bucket holding ``column``'s time.

    ``epoch - epoch % n`` floors on both backends (SQLite's epoch is whole seconds, PostgreSQL's
    a numeric); the width is rendered inline so the GROUP BY repeats the same expression.
    """
    width = literal(int(seconds), BigInteger, literal_execute=True)
    epoch = extract("epoch", column)
    return cast(epoch - epoch % width, BigInteger)
