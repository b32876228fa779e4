"""The PostgreSQL store: every write of an executing run is one statement (:mod:`.sql`).

Those statements go out in autocommit on a few long-lived asyncpg connections
(:class:`WriterPool`): a pool checkout through SQLAlchemy costs several times the client work
of the statement itself. Reads and operator actions use the SQLAlchemy engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .._config import redact
from .._errors import SchemaNotMigrated
from .._vocab import TERMINAL_RUN_STATUSES, EventKind, RunStatus
from . import sql
from .base import Listener, Store
from .records import (
    Event,
    Lease,
    NewRun,
    RunRecord,
    StepRecord,
    UsageRecord,
    fields_of,
    run_from_mapping,
    utcnow,
)
from .rows import fence_error
from .tables import SCHEMA_REVISION

#: PostgreSQL ``NOTIFY`` channel on which enqueues wake workers; the payload is the queue.
NOTIFY_CHANNEL = "tidebase_runs"
#: ``pg_try_advisory_xact_lock`` key electing the one reconciler that acts in a pass.
RECONCILER_LOCK_KEY = 0x7469646562617365  # b"tidebase"


def jsonb(value: Any) -> str | None:
    """A JSONB parameter: the statements take JSON text."""
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _events_param(events: Sequence[Event]) -> str:
    return json.dumps(
        [
            {"ord": i, "kind": str(e.kind), "step": e.step, "data": e.data}
            for i, e in enumerate(events, 1)
        ],
        separators=(",", ":"),
    )


def _usage_param(usage: Sequence[UsageRecord]) -> str:
    return json.dumps([fields_of(u) for u in usage], separators=(",", ":"))


def _step_params(step: StepRecord, now: dt.datetime, output_json: str | None) -> list[Any]:
    values = fields_of(step)
    values["started_at"] = values["started_at"] or now
    values["status"] = str(values["status"])
    values["replay"] = str(values["replay"])
    params = [
        jsonb(values[c]) if c in sql.STEP_JSON_COLUMNS else values[c]
        for c in sql.STEP_WRITE_COLUMNS
    ]
    if output_json is not None:
        params[sql.STEP_WRITE_COLUMNS.index("output")] = output_json
    return params


def driver_dsn(url: str) -> str:
    """The asyncpg DSN of a ``postgresql+asyncpg://`` SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class WriterPool:
    """A few long-lived asyncpg connections for the single-statement writes."""

    def __init__(self, dsn: str, size: int = 4) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            except BaseException:
                # Interrupted mid-statement (cancelled, connection lost): don't reuse it.
                conn.terminate()
                raise
            self._idle.append(conn)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn)
        # JSON parameters are passed as text, as the statements expect.
        await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog")
        return conn

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class PostgresStore(Store):
    backend: ClassVar[str] = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._writers = WriterPool(driver_dsn(url))

    def _make_engine(self) -> AsyncEngine:
        return create_async_engine(self.url, pool_size=10, max_overflow=20)

    async def _open(self) -> None:
        revision = await self.schema_revision()
        if revision != SCHEMA_REVISION:
            state = "has no tidebase tables" if revision is None else f"is at {revision}"
            raise SchemaNotMigrated(
                f"database {redact(self.url)} {state}; this version of tidebase-agents needs "
                f"{SCHEMA_REVISION}. Run `tidebase-agents migrate` (or `alembic upgrade head` "
                f"from the repository) with TIDEBASE_DATABASE_URL set to it."
            )

    async def _close_backend(self) -> None:
        await self._writers.close()

    @contextlib.contextmanager
    def driver_errors(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise self.unavailable(exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated or isinstance(
                exc.orig, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
            ):
                raise self.unavailable(exc) from None
            raise

    async def _fetch(self, statement: str, *params: Any) -> Any:
        """The first row of one :mod:`.sql` statement on a writer connection, in autocommit."""
        self.statements += 1
        with self.in_use(), self.driver_errors():
            async with self._writers.connection() as conn:
                return await conn.fetchrow(statement, *params)

    async def _fenced(self, lease: Lease, statement: str, n_events: int, *params: Any) -> None:
        """Run one fenced write; raise the fence's error if the lease no longer holds."""
        row = await self._fetch(statement, lease.run_id, lease.token, n_events, utcnow(), *params)
        if row is None:
            state = await self._fetch(sql.LEASE_STATE, lease.run_id)
            raise fence_error(lease, None if state is None else state["status"])

    # -- acquisition -----------------------------------------------------------------------

    async def _create_run(self, new: NewRun) -> RunRecord | None:
        now = utcnow()
        row = await self._fetch(
            sql.CREATE_RUN,
            new.run_id,
            new.pipeline,
            jsonb(new.input),
            new.input_hash,
            new.owner,
            now + dt.timedelta(seconds=new.lease_seconds),
            now,
            jsonb({"owner": new.owner, "pipeline": new.pipeline}),
        )
        return None if row is None else run_from_mapping(row)

    async def _take_over(self, new: NewRun) -> RunRecord | None:
        now = utcnow()
        row = await self._fetch(
            sql.TAKE_OVER,
            new.run_id,
            new.pipeline,
            new.owner,
            now + dt.timedelta(seconds=new.lease_seconds),
            now,
            jsonb(new.input),
            new.input_hash,
        )
        return None if row is None else run_from_mapping(row)

    # -- fenced writes ---------------------------------------------------------------------

    async def write_step(
        self,
        lease: Lease,
        step: StepRecord,
        *,
        events: Sequence[Event] = (),
        usage: Sequence[UsageRecord] = (),
        output_json: str | None = None,
    ) -> None:
        await self._fenced(
            lease,
            sql.WRITE_STEP,
            len(events),
            *_step_params(step, utcnow(), output_json),
            _events_param(events),
            _usage_param(usage),
        )

    async def record_usage(self, lease: Lease, usage: Sequence[UsageRecord]) -> None:
        await self._fenced(lease, sql.RECORD_USAGE, 0, _usage_param(usage))

    async def append_state(self, lease: Lease, version: int, value: Any) -> None:
        event = Event(EventKind.STATE_SET, data={"version": version})
        await self._fenced(
            lease, sql.APPEND_STATE, 1, version, jsonb(value), _events_param([event])
        )

    async def finish(
        self,
        lease: Lease,
        status: RunStatus,
        *,
        output: Any = None,
        error: Any = None,
        event: Event,
    ) -> None:
        await self._fenced(
            lease,
            sql.FINISH,
            1,
            str(status),
            jsonb(output),
            jsonb(error),
            utcnow() if status in TERMINAL_RUN_STATUSES else None,
            _events_param([event]),
        )

    async def check_lease(self, lease: Lease) -> None:
        row = await self._fetch(sql.LEASE_STATE, lease.run_id)
        if row is None or row["status"] != RunStatus.RUNNING or row["lease_token"] != lease.token:
            raise fence_error(lease, None if row is None else row["status"])

    # -- queue hooks -----------------------------------------------------------------------

    def _insert(self) -> Any:
        return pg_insert

    async def _notify(self, conn: AsyncConnection, queue: str) -> None:
        # Delivered at commit, so a woken worker always finds the run.
        await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, queue)))

    async def _elect_reconciler(self, conn: AsyncConnection) -> bool:
        return bool(
            (
                await conn.execute(select(func.pg_try_advisory_xact_lock(RECONCILER_LOCK_KEY)))
            ).scalar()
        )

    async def listen(self, callback: Callable[[str], None]) -> Listener:
        """A dedicated connection calling ``callback(queue)`` on each enqueue notification."""
        with self.driver_errors():
            conn = await asyncpg.connect(driver_dsn(self.url))
            await conn.add_listener(
                NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: callback(payload)
            )
        return _PgListener(conn)


class _PgListener:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def ping(self, timeout: float) -> None:
        await asyncio.wait_for(self._conn.fetchval("SELECT 1"), timeout)

    def close(self) -> None:
        # terminate(), not close(): this may run while the loop is cancelling us.
        self._conn.terminate()
