"""Store queries: every read and write the library makes, one async engine per database URL.

Writes made on behalf of an executing run are *fenced*: they run in a transaction that first
bumps the run's event counter on the condition that the run is still ``running`` under the
caller's lease token. A zombie whose lease was taken over, or a run cancelled meanwhile, gets
``LeaseLost`` / ``RunCancelled`` and nothing of its write lands (R6, R12). The same update hands
out the event sequence numbers, so the event log is gap-free under concurrent writers (R11).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import _store_pg as pg
from ._config import redact, resolve_database_url
from ._errors import (
    ConfigurationError,
    DatabaseUnavailable,
    LeaseLost,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunLocked,
    RunNotFound,
    SchemaNotMigrated,
)
from ._models import SCHEMA_REVISION, VERSION_TABLE, EventRow, RunRow, StateRow, StepRow, UsageRow

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
TERMINAL_RUN_STATUSES = ("completed", "failed", "cancelled")
#: How long closing a store waits for operations still in flight (seconds).
CLOSE_GRACE = 30.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run as stored."""

    run_id: str
    pipeline: str
    status: str
    input: Any
    input_hash: str | None
    output: Any
    error: Any
    attempts: int
    lease_owner: str | None
    lease_token: int
    lease_expires_at: dt.datetime | None
    cancel_requested: bool
    event_seq: int
    state_version: int
    queue: str | None
    dedupe_key: str | None
    priority: int
    scheduled_at: dt.datetime | None
    max_attempts: int | None
    deadline: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """A step as stored (also what a step write sends)."""

    name: str
    status: str
    input_hash: str
    input_parts: dict[str, str] | None = None
    output: Any = None
    error: Any = None
    side_effects: list[str] | None = None
    idempotency_key: str | None = None
    keyed: bool = False
    replay: str = "auto"
    attempts: int = 1
    lease_token: int = 0
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    duration_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    step: str | None = None
    data: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class EventRecord:
    run_id: str
    seq: int
    kind: str
    step: str | None
    data: Any
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Usage:
    """One usage record; ``dedupe_key`` makes re-recording it a no-op (R9)."""

    dedupe_key: str
    step: str | None = None
    kind: str = "llm"
    provider: str | None = None
    model: str | None = None
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None


@dataclasses.dataclass(frozen=True)
class Lease:
    """What an executor holds: the run and its fencing token."""

    run_id: str
    token: int
    owner: str


@dataclasses.dataclass(frozen=True)
class Acquired:
    """Result of :meth:`Store.acquire`: a completed run, or a lease plus every checkpoint."""

    run: RunRecord
    lease: Lease | None
    steps: dict[str, StepRecord]
    created: bool = False


def _record(cls: type[Any], row: Any) -> Any:
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name in m})


_RUN_COLS = [getattr(RunRow, f.name) for f in dataclasses.fields(RunRecord)]
_STEP_COLS = [getattr(StepRow, f.name) for f in dataclasses.fields(StepRecord)]


class Store:
    """The database side of tidebase-agents. Obtain one with :func:`get_store`."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        self.engine: AsyncEngine = self._make_engine(echo)
        self._ready: asyncio.Future[None] | None = None
        self._insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        # PostgreSQL writes go out as single statements in autocommit (see _store_pg).
        self._pg = self.dialect == "postgresql"
        self._writers = pg.WriterPool(_driver_dsn(url)) if self._pg else None
        #: Statements sent to the database by this store, for round-trip accounting.
        self.statements = 0
        self._closed = False
        self._busy = 0  # operations holding a connection
        self._drained: asyncio.Event | None = None
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, *_args: Any) -> None:
        self.statements += 1

    def _make_engine(self, echo: bool) -> AsyncEngine:
        if self.dialect == "sqlite":
            engine = create_async_engine(self.url, echo=echo, connect_args={"timeout": 30})

            @event.listens_for(engine.sync_engine, "connect")
            def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
                # Take transaction control from the driver so every transaction is
                # BEGIN IMMEDIATE: writers queue on the busy timeout instead of failing
                # on a read-to-write upgrade.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return create_async_engine(
            self.url, echo=echo, pool_size=10, max_overflow=20, pool_pre_ping=False
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Check the database is reachable and migrated (migrating embedded SQLite)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self._open()
            except BaseException as exc:
                self._ready.set_exception(exc)
                self._ready.exception()  # retrieved: a later open() re-raises it
                fut, self._ready = self._ready, None
                del fut
                raise
            self._ready.set_result(None)
        await self._ready

    async def _open(self) -> None:
        if self.dialect == "sqlite":
            try:
                Path(self.engine.url.database or "tidebase.db").parent.mkdir(
                    parents=True, exist_ok=True
                )
            except OSError as exc:
                raise self._unavailable(exc) from None
            await self.migrate()
            return
        revision = await self.schema_revision()
        if revision != SCHEMA_REVISION:
            state = "has no tidebase tables" if revision is None else f"is at {revision}"
            raise SchemaNotMigrated(
                f"database {redact(self.url)} {state}; this version of tidebase-agents needs "
                f"{SCHEMA_REVISION}. Run `tidebase-agents migrate` (or `alembic upgrade head` "
                f"from the repository) with TIDEBASE_DATABASE_URL set to it."
            )

    async def schema_revision(self) -> str | None:
        """The tidebase Alembic revision of the database, or None if it has none."""
        try:
            async with self.connect() as conn:
                return await conn.run_sync(_read_revision)
        except (OSError, DBAPIError) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        detail = getattr(exc, "orig", None) or exc
        return DatabaseUnavailable(f"cannot reach database {redact(self.url)}: {detail}")

    async def migrate(self, revision: str = "head") -> None:
        """Run the packaged Alembic migrations up to ``revision``."""
        try:
            async with self.connect() as conn:
                await conn.run_sync(_run_alembic, "upgrade", revision)
                await conn.commit()
        except (OSError, DBAPIError) as exc:
            if isinstance(exc, (ProgrammingError, IntegrityError)):
                raise
            raise self._unavailable(exc) from None

    async def downgrade(self, revision: str = "base") -> None:
        async with self.connect() as conn:
            await conn.run_sync(_run_alembic, "downgrade", revision)
            await conn.commit()

    async def close(self) -> None:
        """Let operations in flight finish, then release every connection.

        Operations are waited for, not interrupted: a database call cancelled midway makes the
        driver tear its connection down, and aiosqlite's teardown can then wait forever,
        hanging the process's ``asyncio.run``. Later calls on this store raise
        ``DatabaseUnavailable``; :func:`get_store` hands out a new one.
        """
        if self._closed:
            return
        self._closed = True
        for per_loop in _stores.values():
            if per_loop.get(self.url) is self:
                del per_loop[self.url]
        if self._busy:
            self._drained = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), CLOSE_GRACE)
        if self._writers is not None:
            await self._writers.close()
        await self.engine.dispose()

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
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
        with self._in_use():
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            with self._in_use():
                async with self.engine.begin() as conn:
                    yield conn
        except OperationalError as exc:
            if _is_connect_error(exc):
                raise self._unavailable(exc) from None
            raise
        except OSError as exc:
            raise self._unavailable(exc) from None

    # -- runs ------------------------------------------------------------------------------

    async def acquire(
        self,
        run_id: str,
        pipeline: str,
        *,
        owner: str,
        lease_seconds: float,
        input: Any = None,
        input_hash: str | None = None,
        create: bool = True,
        claim_token: int | None = None,
        fresh_id: bool = False,
    ) -> Acquired:
        """Start or resume ``run_id``: create it, take its lease, or report it completed.

        ``fresh_id`` says the caller just generated the id, so the run is new.

        ``claim_token`` is for a worker that already claimed the run (status ``running`` under
        that token and ``owner``): the claim becomes the execution's lease.

        Raises ``RunLocked`` while another executor's lease is live, ``RunFailed`` /
        ``RunCancelled`` for runs that ended so, ``RunConflict`` if the id belongs to another
        pipeline or was recorded with other arguments. Loads every checkpoint in one query (R8).
        """
        if self._pg and claim_token is None:
            # The common cases in one round trip: a new run, or a resumable one.
            if not fresh_id:
                taken = await self._pg_takeover(
                    run_id, pipeline, owner, lease_seconds, input, input_hash
                )
                if taken is not None:
                    return dataclasses.replace(taken, steps=await self.load_steps(run_id))
            if create:
                created = await self._pg_create(
                    run_id, pipeline, owner, lease_seconds, input, input_hash
                )
                if created is not None:
                    return created
        for attempt in range(3):
            try:
                acquired = await self._acquire_tx(
                    run_id, pipeline, owner, lease_seconds, input, input_hash, create, claim_token
                )
                break
            except IntegrityError:
                # Lost a race to create the same run id: it exists now, decide again.
                if attempt == 2:
                    raise
        if acquired.lease is None or (acquired.run.attempts == 1 and acquired.run.event_seq == 1):
            return acquired  # completed, or just created: no checkpoints to load
        steps = await self.load_steps(run_id)
        return dataclasses.replace(acquired, steps=steps)

    async def _acquire_tx(
        self,
        run_id: str,
        pipeline: str,
        owner: str,
        lease_seconds: float,
        input: Any,
        input_hash: str | None,
        create: bool,
        claim_token: int | None,
    ) -> Acquired:
        now = utcnow()
        expires = now + dt.timedelta(seconds=lease_seconds)
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(*_RUN_COLS).where(RunRow.run_id == run_id).with_for_update()
                )
            ).first()
            if row is None:
                if not create:
                    raise RunNotFound(run_id)
                created = _created(run_id, pipeline, owner, expires, input, input_hash, now)
                await conn.execute(insert(RunRow).values(**pg.shallow_fields(created.run)))
                await conn.execute(
                    insert(EventRow).values(
                        run_id=run_id,
                        seq=1,
                        kind="run_started",
                        data={"owner": owner, "pipeline": pipeline},
                        created_at=now,
                    )
                )
                return created
            run = _record(RunRecord, row)
            if run.pipeline != pipeline:
                raise RunConflict(
                    f"run id {run_id!r} belongs to pipeline {run.pipeline!r}, not {pipeline!r}"
                )
            if input_hash is not None and run.input_hash not in (None, input_hash):
                raise RunConflict(
                    f"run {run_id!r} was started with other arguments (input hash "
                    f"{(run.input_hash or '')[:16]}, now {input_hash[:16]}); resume it with the "
                    f"recorded arguments (`.resume(run_id)`) or use a new run id"
                )
            if run.status == "completed":
                return Acquired(run, None, {})
            if run.status == "failed":
                raise RunFailed(run_id, run.error)
            if run.status == "cancelled":
                raise RunCancelled(run_id)
            if (
                claim_token is not None
                and run.status == "running"
                and run.lease_token == claim_token
                and run.lease_owner == owner
            ):
                return Acquired(run, Lease(run_id, claim_token, owner), {})
            if (
                run.status == "running"
                and run.lease_expires_at is not None
                and run.lease_expires_at > now
            ):
                raise RunLocked(run_id, run.lease_owner)
            token = run.lease_token + 1
            seq = await bump_event_seq(
                conn,
                run_id,
                status="running",
                lease_owner=owner,
                lease_token=token,
                lease_expires_at=expires,
                attempts=RunRow.attempts + 1,
                updated_at=now,
                input=run.input if run.input is not None else input,
                input_hash=run.input_hash or input_hash,
            )
            await append_event(
                conn,
                run_id,
                seq,
                "lease_taken_over" if run.status == "running" else "run_resumed",
                {
                    "owner": owner,
                    "from_status": run.status,
                    "previous_owner": run.lease_owner,
                    "token": token,
                },
            )
            run = dataclasses.replace(
                run,
                status="running",
                lease_owner=owner,
                lease_token=token,
                lease_expires_at=expires,
                attempts=run.attempts + 1,
                event_seq=seq,
                input=run.input if run.input is not None else input,
            )
            return Acquired(run, Lease(run_id, token, owner), {})

    async def _pg_create(
        self,
        run_id: str,
        pipeline: str,
        owner: str,
        lease_seconds: float,
        input: Any,
        input_hash: str | None,
    ) -> Acquired | None:
        """Create the run under a new lease in one statement; None if the id exists."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=lease_seconds)
        created = await self._pg_fetchval(
            pg.CREATE_RUN,
            run_id,
            pipeline,
            pg.jsonb(input),
            input_hash,
            owner,
            expires,
            now,
            pg.jsonb({"owner": owner, "pipeline": pipeline}),
        )
        if created is None:
            return None
        return _created(run_id, pipeline, owner, expires, input, input_hash, now)

    async def _pg_takeover(
        self,
        run_id: str,
        pipeline: str,
        owner: str,
        lease_seconds: float,
        input: Any,
        input_hash: str | None,
    ) -> Acquired | None:
        """Take the lease of a resumable run in one statement; None if there is none."""
        now = utcnow()
        row = await self._pg_fetch(
            pg.TAKEOVER_RUN,
            run_id,
            pipeline,
            owner,
            now + dt.timedelta(seconds=lease_seconds),
            now,
            pg.jsonb(input),
            input_hash,
        )
        if row is None:
            return None
        run = RunRecord(**{f.name: row[f.name] for f in dataclasses.fields(RunRecord)})
        return Acquired(run, Lease(run_id, run.lease_token, owner), {})

    async def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        """Every checkpoint of a run, in one query."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(*_STEP_COLS).where(StepRow.run_id == run_id).order_by(StepRow.id)
            )
            return {r.name: _record(StepRecord, r) for r in rows}

    async def _fence(
        self, conn: AsyncConnection, lease: Lease, n_events: int, **values: Any
    ) -> int:
        """Refuse the write unless ``lease`` still holds a running run; return the last event seq."""
        seq = (
            await conn.execute(
                update(RunRow)
                .where(
                    RunRow.run_id == lease.run_id,
                    RunRow.lease_token == lease.token,
                    RunRow.status == "running",
                )
                .values(event_seq=RunRow.event_seq + n_events, updated_at=utcnow(), **values)
                .returning(RunRow.event_seq)
            )
        ).scalar()
        if seq is None:
            await self._raise_fence_error(conn, lease)
        return int(seq)  # type: ignore[arg-type]

    async def _raise_fence_error(self, conn: AsyncConnection, lease: Lease) -> None:
        status = (
            await conn.execute(select(RunRow.status).where(RunRow.run_id == lease.run_id))
        ).scalar()
        if status == "cancelled":
            raise RunCancelled(lease.run_id)
        raise LeaseLost(lease.run_id)

    async def _events(
        self, conn: AsyncConnection, run_id: str, last_seq: int, events: Sequence[Event]
    ) -> None:
        if not events:
            return
        now = utcnow()
        first = last_seq - len(events) + 1
        await conn.execute(
            insert(EventRow),
            [
                dict(
                    run_id=run_id,
                    seq=first + i,
                    kind=e.kind,
                    step=e.step,
                    data=e.data,
                    created_at=now,
                )
                for i, e in enumerate(events)
            ],
        )

    async def write_step(
        self,
        lease: Lease,
        step: StepRecord,
        *,
        events: Sequence[Event] = (),
        usage: Sequence[Usage] = (),
        output_json: str | None = None,
    ) -> None:
        """Insert or update a step under the lease, with its events and usage, in one commit.

        ``output_json`` is the step's output already serialized, when the caller has it.
        """
        now = utcnow()
        if self._pg:
            await self._pg_fenced(
                lease,
                pg.WRITE_STEP,
                len(events),
                now,
                *pg.step_params(step, now, output_json),
                pg.events_param(events),
                pg.usage_param(usage),
            )
            return
        values = pg.shallow_fields(step)
        values["run_id"] = lease.run_id
        values["started_at"] = values["started_at"] or now
        stmt = self._insert(StepRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name"],
            set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "name", "started_at")},
        )
        async with self._tx() as conn:
            seq = await self._fence(conn, lease, len(events))
            await conn.execute(stmt)
            await self._events(conn, lease.run_id, seq, events)
            if usage:
                await self._usage(conn, lease.run_id, usage)

    async def _pg_fetchval(self, sql: str, *params: Any) -> Any:
        """One statement of :mod:`._store_pg` on a writer connection, in autocommit."""
        row = await self._pg_fetch(sql, *params)
        return row[0] if row is not None else None

    async def _pg_fetch(self, sql: str, *params: Any) -> Any:
        """The first row of one statement on a writer connection, in autocommit."""
        assert self._writers is not None
        self.statements += 1
        try:
            with self._in_use():
                async with self._writers.connection() as conn:
                    return await conn.fetchrow(sql, *params)
        except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError) as exc:
            raise self._unavailable(exc) from None

    async def _pg_fenced(self, lease: Lease, sql: str, *params: Any) -> int:
        """Run one of the single-statement fenced writes of :mod:`._store_pg`."""
        seq = await self._pg_fetchval(sql, lease.run_id, lease.token, *params)
        if seq is None:
            async with self.connect() as conn:
                await self._raise_fence_error(conn, lease)
        return int(seq)

    async def _usage(self, conn: AsyncConnection, run_id: str, usage: Sequence[Usage]) -> None:
        now = utcnow()
        stmt = self._insert(UsageRow).on_conflict_do_nothing(
            index_elements=["run_id", "dedupe_key"]
        )
        await conn.execute(
            stmt, [dict(pg.shallow_fields(u), run_id=run_id, created_at=now) for u in usage]
        )

    async def record_usage(self, lease: Lease, usage: Sequence[Usage]) -> None:
        if self._pg:
            await self._pg_fenced(lease, pg.RECORD_USAGE, 0, utcnow(), pg.usage_param(usage))
            return
        async with self._tx() as conn:
            await self._fence(conn, lease, 0)
            await self._usage(conn, lease.run_id, usage)

    async def append_state(self, lease: Lease, version: int, value: Any) -> None:
        """Append state version ``version`` (R10)."""
        event = [Event("state_set", data={"version": version})]
        if self._pg:
            await self._pg_fenced(
                lease,
                pg.APPEND_STATE,
                1,
                utcnow(),
                version,
                pg.jsonb(value),
                pg.events_param(event),
            )
            return
        async with self._tx() as conn:
            seq = await self._fence(conn, lease, 1, state_version=version)
            await conn.execute(
                insert(StateRow).values(
                    run_id=lease.run_id, version=version, value=value, created_at=utcnow()
                )
            )
            await self._events(conn, lease.run_id, seq, event)

    async def finish(
        self,
        lease: Lease,
        status: str,
        *,
        output: Any = None,
        error: Any = None,
        event: Event,
    ) -> None:
        """End the execution: complete, fail, or park the run, and release its lease."""
        now = utcnow()
        finished_at = now if status in TERMINAL_RUN_STATUSES else None
        if self._pg:
            await self._pg_fenced(
                lease,
                pg.FINISH,
                1,
                now,
                status,
                pg.jsonb(output),
                pg.jsonb(error),
                finished_at,
                pg.events_param([event]),
            )
            return
        async with self._tx() as conn:
            seq = await self._fence(
                conn,
                lease,
                1,
                status=status,
                output=output,
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=finished_at,
            )
            await self._events(conn, lease.run_id, seq, [event])

    async def check_lease(self, lease: Lease) -> None:
        """Raise ``RunCancelled`` or ``LeaseLost`` unless ``lease`` still holds a running run."""
        sql = f"SELECT status, lease_token FROM {RunRow.__tablename__} WHERE run_id = $1"
        if self._pg:
            row = await self._pg_fetch(sql, lease.run_id)
            status, token = (row["status"], row["lease_token"]) if row else (None, None)
        else:
            async with self.connect() as conn:
                found = (
                    await conn.execute(
                        select(RunRow.status, RunRow.lease_token).where(
                            RunRow.run_id == lease.run_id
                        )
                    )
                ).first()
            status, token = (found.status, found.lease_token) if found else (None, None)
        if status == "cancelled":
            raise RunCancelled(lease.run_id)
        if status != "running" or token != lease.token:
            raise LeaseLost(lease.run_id)

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> None:
        """Extend the lease; raises ``LeaseLost`` or ``RunCancelled`` when it is gone."""
        async with self._tx() as conn:
            ok = (
                await conn.execute(
                    update(RunRow)
                    .where(
                        RunRow.run_id == lease.run_id,
                        RunRow.lease_token == lease.token,
                        RunRow.status == "running",
                    )
                    .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
                    .returning(RunRow.run_id)
                )
            ).scalar()
            if ok is None:
                await self._raise_fence_error(conn, lease)

    async def cancel(self, run_id: str, reason: str | None = None) -> str:
        """Cancel a run that has not ended; return its status afterwards. One-way (R12)."""
        now = utcnow()
        async with self._tx() as conn:
            run = await locked_run(conn, run_id)
            if run is None:
                raise RunNotFound(run_id)
            if run.status in TERMINAL_RUN_STATUSES:
                return run.status
            seq = await bump_event_seq(
                conn,
                run_id,
                status="cancelled",
                cancel_requested=True,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
            )
            await append_event(
                conn, run_id, seq, "run_cancelled", {"from_status": run.status, "reason": reason}
            )
            return "cancelled"

    async def review_step(
        self, run_id: str, step: str, action: str, output: Any = None
    ) -> StepRecord:
        """Resolve a step parked in ``manual_review``: ``retry``, ``output`` or ``fail``."""
        if action not in ("retry", "output", "fail"):
            raise ConfigurationError(f"unknown review action {action!r}")
        now = utcnow()
        async with self._tx() as conn:
            run = await locked_run(conn, run_id)
            if run is None:
                raise RunNotFound(run_id)
            row = (
                await conn.execute(
                    select(*_STEP_COLS).where(StepRow.run_id == run_id, StepRow.name == step)
                )
            ).first()
            if row is None or row.status != "manual_review":
                state = "does not exist" if row is None else f"is {row.status}"
                raise ConfigurationError(
                    f"step {step!r} of run {run_id!r} {state}; only manual_review steps are reviewed"
                )
            step_status = {"retry": "failed_retryable", "output": "completed", "fail": "failed"}[
                action
            ]
            run_status = "failed" if action == "fail" else "failed_retryable"
            if run.status in TERMINAL_RUN_STATUSES:
                run_status = run.status
            step_values: dict[str, Any] = {"status": step_status}
            if action == "output":
                step_values.update(output=output, completed_at=now, error=None)
            await conn.execute(
                update(StepRow)
                .where(StepRow.run_id == run_id, StepRow.name == step)
                .values(**step_values)
            )
            run_values: dict[str, Any] = {"status": run_status, "updated_at": now}
            if action == "fail":
                run_values.update(
                    error={"step": step, "message": "failed by operator review"}, finished_at=now
                )
            seq = await bump_event_seq(conn, run_id, **run_values)
            await append_event(conn, run_id, seq, f"step_review_{action}", None, step=step)
            return dataclasses.replace(_record(StepRecord, row), **step_values)

    # -- reads -----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        async with self.connect() as conn:
            row = (await conn.execute(select(*_RUN_COLS).where(RunRow.run_id == run_id))).first()
        if row is None:
            raise RunNotFound(run_id)
        record: RunRecord = _record(RunRecord, row)
        return record

    async def list_runs(
        self,
        *,
        status: str | None = None,
        pipeline: str | None = None,
        queue: str | None = None,
        since: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        q = select(*_RUN_COLS).order_by(RunRow.created_at.desc()).limit(limit)
        if status:
            q = q.where(RunRow.status == status)
        if pipeline:
            q = q.where(RunRow.pipeline == pipeline)
        if queue:
            q = q.where(RunRow.queue == queue)
        if since:
            q = q.where(RunRow.created_at >= since)
        async with self.connect() as conn:
            return [_record(RunRecord, r) for r in await conn.execute(q)]

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
            return [_record(EventRecord, r) for r in rows]

    async def get_state(self, run_id: str) -> list[tuple[int, Any]]:
        """Every state version of a run, oldest first."""
        async with self.connect() as conn:
            rows = await conn.execute(
                select(StateRow.version, StateRow.value)
                .where(StateRow.run_id == run_id)
                .order_by(StateRow.version)
            )
            return [(r.version, r.value) for r in rows]

    async def get_usage(self, run_id: str) -> list[Usage]:
        async with self.connect() as conn:
            rows = await conn.execute(
                select(UsageRow).where(UsageRow.run_id == run_id).order_by(UsageRow.id)
            )
            return [_record(Usage, r) for r in rows]


async def locked_run(conn: AsyncConnection, run_id: str) -> RunRecord | None:
    """The run, row-locked for the rest of the transaction (None if there is no such run)."""
    row = (
        await conn.execute(select(*_RUN_COLS).where(RunRow.run_id == run_id).with_for_update())
    ).first()
    return RunRecord(**row._mapping) if row is not None else None


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


async def append_event(
    conn: AsyncConnection,
    run_id: str,
    seq: int,
    kind: str,
    data: dict[str, Any] | None,
    step: str | None = None,
) -> None:
    await conn.execute(
        insert(EventRow).values(
            run_id=run_id, seq=seq, kind=kind, step=step, data=data, created_at=utcnow()
        )
    )


def _created(
    run_id: str,
    pipeline: str,
    owner: str,
    expires: dt.datetime,
    input: Any,
    input_hash: str | None,
    now: dt.datetime,
) -> Acquired:
    """What :meth:`Store.acquire` returns for a run it just created."""
    run = RunRecord(
        run_id=run_id,
        pipeline=pipeline,
        status="running",
        input=input,
        input_hash=input_hash,
        output=None,
        error=None,
        attempts=1,
        lease_owner=owner,
        lease_token=1,
        lease_expires_at=expires,
        cancel_requested=False,
        event_seq=1,
        state_version=0,
        queue=None,
        dedupe_key=None,
        priority=0,
        scheduled_at=None,
        max_attempts=None,
        deadline=None,
        created_at=now,
        updated_at=now,
        finished_at=None,
    )
    return Acquired(run, Lease(run_id, 1, owner), {}, created=True)


def _driver_dsn(url: str) -> str:
    """The asyncpg DSN of a ``postgresql+asyncpg://`` SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _is_connect_error(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "connect" in text or "unable to open" in text


def _read_revision(sync_conn: Any) -> str | None:
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy import text

    if not sa_inspect(sync_conn).has_table(VERSION_TABLE):
        return None
    revision: str | None = sync_conn.execute(
        text(f"SELECT version_num FROM {VERSION_TABLE}")
    ).scalar()
    return revision


def alembic_config(connection: Any = None) -> Any:
    """An Alembic config for the packaged migrations, optionally bound to ``connection``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _run_alembic(sync_conn: Any, direction: str, revision: str) -> None:
    from alembic import command

    getattr(command, direction)(alembic_config(sync_conn), revision)


# One engine per (URL, event loop): pooled connections belong to the loop that made them.
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Store]] = (
    weakref.WeakKeyDictionary()
)


def get_store(url: str | None = None) -> Store:
    """The shared :class:`Store` for ``url`` (resolved per :func:`resolve_database_url`)."""
    resolved = resolve_database_url(url)
    loop = asyncio.get_running_loop()
    per_loop = _stores.setdefault(loop, {})
    store = per_loop.get(resolved)
    if store is None:
        store = per_loop[resolved] = Store(resolved)
    return store


async def close_stores() -> None:
    """Dispose every engine made on the running loop."""
    per_loop = _stores.pop(asyncio.get_running_loop(), {})
    for store in per_loop.values():
        await store.close()


def dump_json(value: Any) -> str:
    """``value`` as compact JSON text, as stored. Raises ``ValueError`` for NaN or infinity."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
