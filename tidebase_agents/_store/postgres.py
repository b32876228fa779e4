"""The PostgreSQL store: every write of an executing run is one statement (:mod:`.sql`).

Those statements go out in autocommit on a few long-lived asyncpg connections
(:class:`WriterPool`): a pool checkout through SQLAlchemy costs several times the client work
of the statement itself. Reads and operator actions use the SQLAlchemy engine.

The tables live in the store's schema. The SQLAlchemy engine qualifies every table it names
(``schema_translate_map``); the asyncpg connections get ``search_path`` set to the schema in
their startup packet, so the :mod:`.sql` statements stay one constant text whatever the schema
(asyncpg prepares and caches them by their text) and naming it costs no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .._config import DEFAULT_SCHEMA, redact
from .._errors import CheckpointSerializationError, SchemaNotMigrated, TidebaseError
from .._vocab import TERMINAL_RUN_STATUSES, EventKind, RunStatus
from . import migrate as _migrate
from . import sql
from .base import Listener, Store
from .group_commit import GroupCommit
from .holders import this_process
from .records import (
    DeadHolder,
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
from .retention import PruneFilter
from .rows import fence_error
from .tables import SCHEMA_REVISION

#: Seconds to wait for a new connection, and for any statement that has no tighter bound
#: (fenced writes wait no longer than the executor's lease has left).
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
#: Seconds to wait for the session connection: without it leases still hold, only a death is
#: noticed later.
SESSION_CONNECT_TIMEOUT = 5.0
#: Connections of the writer pool, and so batches of step writes in flight at once.
WRITERS = 4

log = logging.getLogger("tidebase_agents")
_T = TypeVar("_T")


def notify_channel(schema: str) -> str:
    """The ``NOTIFY`` channel on which enqueues into ``schema`` wake workers (payload: the
    queue); ``tidebase_runs`` for the default schema."""
    return f"{schema}_runs"


def reconciler_lock_key(schema: str) -> int:
    """The ``pg_try_advisory_xact_lock`` key electing the one reconciler of ``schema`` that
    acts in a pass."""
    digest = hashlib.sha256(f"tidebase-reconciler:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


def _step_params(
    step: StepRecord, now: dt.datetime, output_json: str | None, input_json: str | None
) -> list[Any]:
    values = fields_of(step)
    values["started_at"] = values["started_at"] or now
    values["status"] = str(values["status"])
    values["replay"] = str(values["replay"])
    params = [
        jsonb(values[c]) if c in sql.STEP_JSON_COLUMNS else values[c]
        for c in sql.STEP_WRITE_COLUMNS
    ]
    if output_json is not None:
        params[_OUTPUT_PARAM] = output_json
    if input_json is not None:
        params[_INPUT_PARAM] = input_json
    return params


_OUTPUT_PARAM = sql.STEP_WRITE_COLUMNS.index("output")
_INPUT_PARAM = sql.STEP_WRITE_COLUMNS.index("input")


def driver_dsn(url: str) -> str:
    """The asyncpg DSN of a ``postgresql+asyncpg://`` SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect_in(dsn: str, schema: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """An asyncpg connection whose ``search_path`` is ``schema`` (set at connect)."""
    # Generic plans: the fenced writes are CTEs over five tables whose custom plan took as long
    # to make as the write took to run, at every execution; each looks its rows up by key.
    return asyncpg.connect(
        dsn,
        timeout=timeout,
        server_settings={"search_path": f'"{schema}"', "plan_cache_mode": "force_generic_plan"},
    )


def _not_sent(exc: BaseException) -> bool:
    """Whether asyncpg refused to send a statement because the connection was closed: the
    statement provably did not run, so it may be sent again on a fresh connection."""
    return type(exc) is asyncpg.InterfaceError and "connection is closed" in str(exc)


class WriterPool:
    """A few long-lived asyncpg connections for the single-statement writes."""

    def __init__(self, dsn: str, schema: str, size: int = WRITERS) -> None:
        self._dsn = dsn
        self._schema = schema
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []

    async def fetchrow(
        self, statement: str, params: Sequence[Any], timeout: float, *, planned: bool = False
    ) -> Any:
        """The first row of ``statement``, on an idle connection or a new one, in autocommit;
        with ``planned``, in a transaction planned for its parameters' values (the server's own
        choice) instead of with the generic plan these connections ask for."""
        if not planned:
            return await self._call(
                lambda conn, t: conn.fetchrow(statement, *params, timeout=t), timeout
            )

        async def in_transaction(conn: asyncpg.Connection, t: float) -> Any:
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = auto", timeout=t)
                return await conn.fetchrow(statement, *params, timeout=t)

        return await self._call(in_transaction, timeout)

    async def executemany(self, statement: str, rows: list[Sequence[Any]], timeout: float) -> None:
        """``statement`` once per row, pipelined in one round trip and one transaction."""
        await self._call(lambda conn, t: conn.executemany(statement, rows, timeout=t), timeout)

    async def _call(
        self, call: Callable[[asyncpg.Connection, float], Awaitable[_T]], timeout: float
    ) -> _T:
        """``call`` on an idle connection or a new one.

        A connection the server closed while idle (a restart, a terminated backend) is noticed
        before use and replaced; a statement the closed connection refused to send is sent once
        more. A statement interrupted midway is never repeated: it may have committed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(2):
            async with self._slots:
                conn = await self._checkout(max(deadline - loop.time(), 0.01))
                try:
                    result = await call(conn, max(deadline - loop.time(), 0.01))
                except BaseException as exc:
                    # Interrupted (cancelled, timed out, connection lost): don't reuse it.
                    conn.terminate()
                    if attempt == 0 and _not_sent(exc):
                        continue
                    raise
                self._idle.append(conn)
                return result
        raise AssertionError("unreachable")

    async def _checkout(self, timeout: float) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            conn.terminate()
        conn = await connect_in(self._dsn, self._schema, timeout)
        # JSON parameters are passed as text, as the statements expect.
        await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog")
        return conn

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class SessionLock:
    """A connection the store keeps while it holds runs, holding a session-level advisory
    lock on a random key of its own; each lease the store takes records the key.

    The server releases the lock the moment the connection drops (the process died, or its
    machine's connection was reset), so a taker that finds the key free knows the holder's
    session is gone (P3). One connection per store, not per run: a process holding a thousand
    runs costs one connection. A connection the server closed is replaced at the next lease or
    heartbeat, under the same key; runs taken over meanwhile are fenced as usual (R6).
    """

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self._schema = schema
        self.key = secrets.randbits(63)
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def ensure(self) -> int | None:
        """The key, once the lock is held on a live connection; None if it cannot be now."""
        if self._conn is not None and not self._conn.is_closed():
            return self.key
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self.key
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            conn = None
            try:
                conn = await connect_in(self._dsn, self._schema, SESSION_CONNECT_TIMEOUT)
                held = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1)", self.key, timeout=SESSION_CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                held = False
            if not held:
                # Unreachable, or the server has not yet noticed the old connection dropped.
                if conn is not None:
                    conn.terminate()
                log.warning("no session lock for dead-holder detection; leases still hold")
                return None
            self._conn = conn
            return self.key

    def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


class PostgresStore(Store):
    backend: ClassVar[str] = "postgresql"
    schema: str

    def __init__(self, url: str, schema: str | None = None) -> None:
        super().__init__(url, schema or DEFAULT_SCHEMA)
        self._writers = WriterPool(driver_dsn(url), self.schema)
        # Step writes (checkpoints, journal entries, intents) of concurrent runs go in batches.
        self._grouped = {
            sql.WRITE_STEP: GroupCommit(
                self._writers.fetchrow,
                self._writers.executemany,
                sql.WRITE_STEP,
                sql.WRITE_STEP_CHECKED,
                leaders=WRITERS,
            )
        }
        self._session = SessionLock(driver_dsn(url), self.schema)
        self.channel = notify_channel(self.schema)

    def _make_engine(self) -> AsyncEngine:
        # Pooled connections are pinged at checkout, so a server restart costs no failed call;
        # connect and command timeouts keep a frozen server from blocking anyone forever.
        return create_async_engine(
            self.url,
            pool_size=10,
            max_overflow=20,
            pool_pre_ping=True,
            connect_args={"timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT},
            execution_options={"schema_translate_map": {None: self.schema}},
        )

    async def _open(self) -> None:
        async with self.connect() as conn:
            revision, state = await conn.run_sync(_migrate.schema_state, self.schema)
        if revision != SCHEMA_REVISION:
            raise SchemaNotMigrated(
                f"database {redact(self.url)} {state}; this version of tidebase-agents needs "
                f"{SCHEMA_REVISION}. Run `tidebase-agents migrate` (or `alembic upgrade head` "
                f"from the repository) with TIDEBASE_DATABASE_URL set to it."
            )

    async def _close_backend(self) -> None:
        self._session.close()
        await self._writers.close()

    @contextlib.contextmanager
    def driver_errors(self) -> Iterator[None]:
        try:
            yield
        except TidebaseError:
            raise
        except asyncpg.PostgresError as exc:
            raise self._mapped(exc, exc.sqlstate) from None
        except DBAPIError as exc:
            raise self._mapped(exc, getattr(exc.orig, "sqlstate", None)) from None
        except (
            OSError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            SQLAlchemyTimeoutError,
        ) as exc:
            raise self.unavailable(exc) from None

    def _mapped(self, exc: BaseException, sqlstate: str | None) -> TidebaseError:
        if sqlstate is not None and sqlstate.startswith("22"):
            # Class 22 (data exception): a value the database refuses, not a database problem.
            return CheckpointSerializationError(
                f"the database refused a value: {type(exc).__name__}: {exc}"
            )
        return self.unavailable(exc)

    async def _fetch(
        self, statement: str, *params: Any, timeout: float | None = None, planned: bool = False
    ) -> Any:
        """The first row of one :mod:`.sql` statement on a writer connection, in autocommit."""
        self.statements += 1
        group = self._grouped.get(statement)
        with self.in_use(), self.driver_errors():
            if group is not None:
                return await group.fetchrow(params, timeout or COMMAND_TIMEOUT)
            return await self._writers.fetchrow(
                statement, params, timeout or COMMAND_TIMEOUT, planned=planned
            )

    async def _get_run_or_none(self, run_id: str) -> RunRecord | None:
        # On a writer connection: every execution reads its run, and a pool checkout through
        # SQLAlchemy (with its ping) cost more than the read (see the module docstring).
        row = await self._fetch(sql.GET_RUN, run_id)
        return None if row is None else run_from_mapping(row)

    async def _prune_once(self, which: PruneFilter, batch: int) -> int:
        # One statement per batch on a writer connection (its own short transaction), planned
        # for its filters: under the generic plan a prune of 100,000 runs took three times as long.
        row = await self._fetch(
            sql.PRUNE_BATCH,
            sorted(str(s) for s in which.statuses),
            which.before,
            list(which.pipelines),
            batch,
            planned=True,
        )
        return int(row["n"])

    async def _fenced(
        self, lease: Lease, statement: str, n_events: int, *params: Any, timeout: float | None
    ) -> None:
        """Run one fenced write; raise the fence's error if the lease no longer holds."""
        row = await self._fetch(
            statement, lease.run_id, lease.token, n_events, utcnow(), *params, timeout=timeout
        )
        if row is None:
            state = await self._fetch(sql.LEASE_STATE, lease.run_id, timeout=timeout)
            raise fence_error(lease, None if state is None else state["status"])

    # -- holders -------------------------------------------------------------------------

    async def _session_key(self) -> int | None:
        with self.in_use():
            return await self._session.ensure()

    async def _sessions_gone(self, keys: Collection[int], *, wait: float = 0.0) -> set[int]:
        # This store's own key is taken by its own session: trying it would always succeed.
        left = set(keys) - {self._session.key}
        gone: set[int] = set()
        deadline = asyncio.get_running_loop().time() + wait
        while left:
            row = await self._fetch(sql.SESSIONS_GONE, sorted(left))
            found = set(row["gone"]) if row is not None else set()
            gone |= found
            left -= found
            if not left or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        return gone

    # -- acquisition -----------------------------------------------------------------------

    async def _create_run(self, new: NewRun) -> RunRecord | None:
        session = await self._session_key()
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
            this_process(),
            session,
        )
        return None if row is None else run_from_mapping(row)

    async def _take_over(self, new: NewRun, dead: DeadHolder | None = None) -> RunRecord | None:
        session = await self._session_key()
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
            None if dead is None else dead.token,
            this_process(),
            session,
            None if dead is None else str(dead.how),
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
        input_json: str | None = None,
        transient: str | None = None,
        timeout: float | None = None,
    ) -> None:
        await self._fenced(
            lease,
            sql.WRITE_STEP,
            len(events),
            *_step_params(step, utcnow(), output_json, input_json),
            _events_param(events),
            _usage_param(usage),
            *(sql.transient_patterns(step.name, transient) if transient else (None, None)),
            timeout=timeout,
        )

    async def delete_steps(
        self,
        lease: Lease,
        names: Sequence[str],
        *,
        event: Event,
        timeout: float | None = None,
    ) -> None:
        await self._fenced(
            lease, sql.DELETE_STEPS, 1, list(names), _events_param([event]), timeout=timeout
        )

    async def record_usage(
        self, lease: Lease, usage: Sequence[UsageRecord], *, timeout: float | None = None
    ) -> None:
        await self._fenced(lease, sql.RECORD_USAGE, 0, _usage_param(usage), timeout=timeout)

    async def append_state(
        self, lease: Lease, version: int, value: Any, *, timeout: float | None = None
    ) -> None:
        event = Event(EventKind.STATE_SET, data={"version": version})
        await self._fenced(
            lease,
            sql.APPEND_STATE,
            1,
            version,
            jsonb(value),
            _events_param([event]),
            timeout=timeout,
        )

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
        await self._fenced(
            lease,
            sql.FINISH,
            1,
            str(status),
            jsonb(output),
            jsonb(error),
            utcnow() if status in TERMINAL_RUN_STATUSES else None,
            _events_param([event]),
            timeout=timeout,
        )

    async def check_lease(self, lease: Lease, *, timeout: float | None = None) -> None:
        row = await self._fetch(sql.LEASE_STATE, lease.run_id, timeout=timeout)
        if row is None or row["status"] != RunStatus.RUNNING or row["lease_token"] != lease.token:
            raise fence_error(lease, None if row is None else row["status"])

    async def heartbeat(
        self, lease: Lease, lease_seconds: float, *, timeout: float | None = None
    ) -> None:
        await self._fenced(
            lease,
            sql.EXTEND_LEASE,
            0,
            utcnow() + dt.timedelta(seconds=lease_seconds),
            timeout=timeout,
        )
        # A session connection the server closed is replaced, so the holder's death stays
        # detectable (runs taken over while it was down are fenced all the same).
        await self._session_key()

    # -- queue hooks -----------------------------------------------------------------------

    def _insert(self) -> Any:
        return pg_insert

    async def _notify(self, conn: AsyncConnection, queue: str) -> None:
        # Delivered at commit, so a woken worker always finds the run.
        await conn.execute(select(func.pg_notify(self.channel, queue)))

    async def _elect_reconciler(self, conn: AsyncConnection) -> bool:
        return bool(
            (
                await conn.execute(
                    select(func.pg_try_advisory_xact_lock(reconciler_lock_key(self.schema)))
                )
            ).scalar()
        )

    async def listen(self, callback: Callable[[str], None]) -> Listener:
        """A dedicated connection calling ``callback(queue)`` on each enqueue notification."""
        with self.driver_errors():
            conn = await connect_in(driver_dsn(self.url), self.schema)
            await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload: callback(payload))
        return _PgListener(conn)


class _PgListener:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def ping(self, timeout: float) -> None:
        await asyncio.wait_for(self._conn.fetchval("SELECT 1"), timeout)

    def close(self) -> None:
        # terminate(), not close(): this may run while the loop is cancelling us.
        self._conn.terminate()
