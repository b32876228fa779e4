"""The embedded SQLite store, in WAL mode: every write of an executing run is one
``BEGIN IMMEDIATE`` transaction (fence, rows, events), so writers queue on the busy timeout
instead of failing on a read-to-write upgrade. Those writes go through one plain ``sqlite3``
connection (:mod:`.sqlite_writer`); reads and operator actions use the SQLAlchemy engine.

``synchronous`` is ``NORMAL`` unless configured ``FULL`` (:class:`SQLiteSynchronous`): a commit
survives the process crashing, and with ``FULL`` also the machine losing power.

No database call is ever cancelled midway: a task cancelled while its store operation runs
waits for that operation (at most the busy timeout), then sees its cancellation. A cancelled
aiosqlite call makes SQLAlchemy tear the connection down in a shielded task, and if that task
is cancelled in turn (a second cancellation, or ``asyncio.run`` ending) aiosqlite's close waits
forever on its already stopped thread, and the process never exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import inspect
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .._config import resolve_synchronous
from .._errors import TidebaseError
from .._vocab import TERMINAL_RUN_STATUSES, EventKind, RunStatus, SQLiteSynchronous
from . import sql
from .base import Store
from .holders import this_process
from .records import (
    USAGE_FIELDS,
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
from .rows import fence_error
from .sqlite_writer import SQLiteWriter, row_decoder, sqlite_json, sqlite_time, uninterrupted
from .tables import RunRow, StepRow, UTCDateTime
from .tables import StoredJSON as _StoredJSON

_MIGRATING = threading.Lock()
#: Seconds a writer waits for SQLite's write lock before giving up.
BUSY_TIMEOUT = 30

_T = TypeVar("_T")
_RUN_ROW = row_decoder(RunRow.__table__)  # type: ignore[arg-type]
_STEP_TIMES = [c.name for c in StepRow.__table__.c if isinstance(c.type, UTCDateTime)]
_STEP_JSON = [c.name for c in StepRow.__table__.c if isinstance(c.type, _StoredJSON)]


class SQLiteStore(Store):
    backend: ClassVar[str] = "sqlite"

    def __init__(
        self,
        url: str,
        schema: str | None = None,
        synchronous: SQLiteSynchronous | str | None = None,
    ) -> None:
        self.synchronous = resolve_synchronous(synchronous)
        super().__init__(url, schema)
        self._writer = SQLiteWriter(
            self.engine.url.database or "tidebase.db", self.synchronous, BUSY_TIMEOUT
        )

    def _make_engine(self) -> AsyncEngine:
        engine = create_async_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            # Take transaction control from the driver so every transaction is
            # BEGIN IMMEDIATE (see the module docstring).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA synchronous={self.synchronous.value}")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    async def _open(self) -> None:
        try:
            Path(self.engine.url.database or "tidebase.db").parent.mkdir(
                parents=True, exist_ok=True
            )
        except OSError as exc:
            raise self.unavailable(exc) from None
        # Alembic's migration context is global to the process: event loops in several threads
        # opening embedded databases at once take turns (acquired off the loop, which may be
        # migrating another store meanwhile).
        acquiring = asyncio.ensure_future(asyncio.to_thread(_MIGRATING.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The worker thread takes the lock all the same: give it back when it has.
            acquiring.add_done_callback(lambda _f: _MIGRATING.release())
            raise
        try:
            await self.migrate()
        finally:
            _MIGRATING.release()

    @contextlib.contextmanager
    def driver_errors(self) -> Iterator[None]:
        try:
            yield
        except TidebaseError:
            raise
        except (OSError, sqlite3.Error, DBAPIError) as exc:
            # Locked past the busy timeout, disk full or I/O errors, a file that is not a
            # database: the checkpoint could not be written or read.
            raise self.unavailable(exc) from None

    @property
    def writer_commits(self) -> int:
        """Transactions committed by the write path (outside the SQLAlchemy engine)."""
        return self._writer.commits

    def _insert(self) -> Any:
        return sqlite_insert

    async def _close_backend(self) -> None:
        self._writer.close()

    # -- acquisition -----------------------------------------------------------------------

    async def _create_run(self, new: NewRun) -> RunRecord | None:
        now = utcnow()
        params = dict(
            run_id=new.run_id,
            pipeline=new.pipeline,
            input=sqlite_json(new.input),
            input_hash=new.input_hash,
            owner=new.owner,
            expires=sqlite_time(now + dt.timedelta(seconds=new.lease_seconds)),
            now=sqlite_time(now),
            process=this_process(),
        )
        started = Event(EventKind.RUN_STARTED, data={"owner": new.owner, "pipeline": new.pipeline})

        def work(conn: sqlite3.Connection) -> RunRecord | None:
            cursor = conn.cursor()
            cursor.row_factory = _RUN_ROW
            row = self._write(cursor, sql.SQLITE_CREATE_RUN, params).fetchone()
            if row is None:
                return None
            self._events(conn, new.run_id, 1, (started,), params["now"])
            return run_from_mapping(row)

        return await self._run(work)

    async def _take_over(self, new: NewRun, dead: DeadHolder | None = None) -> RunRecord | None:
        moment = utcnow()
        now = sqlite_time(moment)
        params: dict[str, str | int | None] = dict(
            run_id=new.run_id,
            pipeline=new.pipeline,
            owner=new.owner,
            expires=sqlite_time(moment + dt.timedelta(seconds=new.lease_seconds)),
            now=now,
            input=sqlite_json(new.input),
            input_hash=new.input_hash,
            process=this_process(),
            dead_token=None if dead is None else dead.token,
        )

        def work(conn: sqlite3.Connection) -> RunRecord | None:
            old = self._write(conn, sql.SQLITE_OLD_HOLDER, (new.run_id,)).fetchone()
            if old is None:
                return None
            cursor = conn.cursor()
            cursor.row_factory = _RUN_ROW
            row = self._write(cursor, sql.SQLITE_TAKE_OVER, params).fetchone()
            if row is None:
                return None
            run = run_from_mapping(row)
            old_status, old_owner = old
            kind = (
                EventKind.LEASE_TAKEN_OVER
                if old_status == RunStatus.RUNNING
                else EventKind.RUN_RESUMED
            )
            data = {
                "owner": new.owner,
                "from_status": old_status,
                "previous_owner": old_owner,
                "token": run.lease_token,
                "holder_dead": None if dead is None else str(dead.how),
            }
            self._events(conn, new.run_id, run.event_seq, (Event(kind, data=data),), now)
            return run

        return await self._run(work)

    # -- fenced writes ---------------------------------------------------------------------

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self.in_use(), self.driver_errors():
            return await self._writer.run(work)

    def _write(self, conn: Any, statement: str, params: Any) -> sqlite3.Cursor:
        self.statements += 1
        return conn.execute(statement, params)  # type: ignore[no-any-return]

    def _fence(
        self,
        conn: sqlite3.Connection,
        lease: Lease,
        n_events: int,
        now: str | None,
        statement: str = sql.SQLITE_FENCE,
        **values: Any,
    ) -> int:
        """Bump the event counter by ``n_events`` if ``lease`` still holds the run; the last
        sequence number handed out, or the fence's error."""
        params = dict(run_id=lease.run_id, token=lease.token, n=n_events, now=now, **values)
        row = self._write(conn, statement, params).fetchone()
        if row is None:
            state = self._write(conn, sql.SQLITE_LEASE_STATE, (lease.run_id,)).fetchone()
            raise fence_error(lease, None if state is None else state[0])
        return int(row[0])

    def _events(
        self,
        conn: sqlite3.Connection,
        run_id: str,
        seq: int,
        events: Sequence[Event],
        now: str | None,
    ) -> None:
        """Append ``events`` numbered up to ``seq`` (the last number handed out for them)."""
        if not events:
            return
        first = seq - len(events) + 1
        rows = [
            (run_id, first + i, str(e.kind), e.step, sqlite_json(e.data), now)
            for i, e in enumerate(events)
        ]
        self.statements += 1
        conn.executemany(sql.SQLITE_INSERT_EVENT, rows)

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
        now = sqlite_time(utcnow())
        values = fields_of(step)
        values["run_id"] = lease.run_id
        values["status"] = str(step.status)
        values["replay"] = str(step.replay)
        for column in _STEP_TIMES:
            values[column] = sqlite_time(values[column])
        values["started_at"] = values["started_at"] or now
        for column in _STEP_JSON:
            values[column] = sqlite_json(values[column])
        if output_json is not None:
            values["output"] = output_json
        if input_json is not None:
            values["input"] = input_json
        usage_rows = [(lease.run_id, *(getattr(u, f) for f in USAGE_FIELDS), now) for u in usage]

        def work(conn: sqlite3.Connection) -> None:
            seq = self._fence(conn, lease, len(events), now)
            self._write(conn, sql.SQLITE_WRITE_STEP, values)
            self._events(conn, lease.run_id, seq, events, now)
            for record in usage:
                self._write(
                    conn, sql.SQLITE_USAGE_LOST, (lease.run_id, record.step, record.dedupe_key)
                )
            if usage_rows:
                self.statements += 1
                conn.executemany(sql.SQLITE_INSERT_USAGE, usage_rows)
            if transient:
                below, segment = sql.transient_patterns(step.name, transient)
                self._write(conn, sql.SQLITE_DROP_NESTED, (lease.run_id, below, segment))

        await self._run(work)

    async def delete_steps(
        self,
        lease: Lease,
        names: Sequence[str],
        *,
        event: Event,
        timeout: float | None = None,
    ) -> None:
        now = sqlite_time(utcnow())
        placeholders = ", ".join("?" for _ in names)

        def work(conn: sqlite3.Connection) -> None:
            seq = self._fence(conn, lease, 1, now)
            self._write(
                conn,
                f"DELETE FROM {sql.STEPS} WHERE run_id = ? AND name IN ({placeholders})",
                (lease.run_id, *names),
            )
            self._events(conn, lease.run_id, seq, (event,), now)

        await self._run(work)

    async def record_usage(
        self, lease: Lease, usage: Sequence[UsageRecord], *, timeout: float | None = None
    ) -> None:
        now = sqlite_time(utcnow())
        rows = [(lease.run_id, *(getattr(u, f) for f in USAGE_FIELDS), now) for u in usage]

        def work(conn: sqlite3.Connection) -> None:
            self._fence(conn, lease, 0, now)
            if rows:
                self.statements += 1
                conn.executemany(sql.SQLITE_INSERT_USAGE, rows)

        await self._run(work)

    async def append_state(
        self, lease: Lease, version: int, value: Any, *, timeout: float | None = None
    ) -> None:
        now = sqlite_time(utcnow())
        text = sqlite_json(value)
        event = Event(EventKind.STATE_SET, data={"version": version})

        def work(conn: sqlite3.Connection) -> None:
            seq = self._fence(conn, lease, 1, now, sql.SQLITE_APPEND_STATE_FENCE, version=version)
            self._write(conn, sql.SQLITE_INSERT_STATE, (lease.run_id, version, text, now))
            self._events(conn, lease.run_id, seq, (event,), now)

        await self._run(work)

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
        now = sqlite_time(utcnow())
        values = dict(
            status=str(status),
            output=sqlite_json(output),
            error=sqlite_json(error),
            finished_at=now if status in TERMINAL_RUN_STATUSES else None,
        )

        def work(conn: sqlite3.Connection) -> None:
            seq = self._fence(conn, lease, 1, now, sql.SQLITE_FINISH, **values)
            self._events(conn, lease.run_id, seq, (event,), now)

        await self._run(work)

    async def heartbeat(
        self, lease: Lease, lease_seconds: float, *, timeout: float | None = None
    ) -> None:
        now = utcnow()
        expires = sqlite_time(now + dt.timedelta(seconds=lease_seconds))
        await self._run(
            lambda conn: self._fence(
                conn, lease, 0, sqlite_time(now), sql.SQLITE_EXTEND_LEASE, expires=expires
            )
        )

    async def mark_keyed(self, lease: Lease, step: str) -> None:
        now = sqlite_time(utcnow())

        def work(conn: sqlite3.Connection) -> None:
            seq = self._fence(conn, lease, 1, now)
            self._write(conn, sql.SQLITE_MARK_KEYED, (lease.run_id, step))
            self._events(conn, lease.run_id, seq, (Event(EventKind.STEP_KEY_READ, step),), now)

        await self._run(work)

    async def check_lease(self, lease: Lease, *, timeout: float | None = None) -> None:
        def read(conn: sqlite3.Connection) -> Any:
            return self._write(conn, sql.SQLITE_LEASE_STATE, (lease.run_id,)).fetchone()

        row = await self._run(read)
        if row is None or row[0] != RunStatus.RUNNING or row[1] != lease.token:
            raise fence_error(lease, None if row is None else row[0])


def _whole(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Run ``method`` as a task of its own that its caller's cancellation cannot interrupt."""

    @functools.wraps(method)
    async def whole(*args: Any, **kwargs: Any) -> _T:
        return await uninterrupted(method(*args, **kwargs))

    return whole


def _talks_to_the_database(name: str, method: Any) -> bool:
    # Lifecycle and composite operations are made of these; helpers handed an open
    # connection run inside an operation already.
    if not inspect.iscoroutinefunction(method) or name in _COMPOSITE or name.startswith("__"):
        return False
    params = list(inspect.signature(method).parameters)
    return params[1:2] != ["conn"]


_COMPOSITE = frozenset(
    {"open", "_open", "close", "_close_backend", "acquire", "_with_steps", "listen", "_run"}
)
# Writes through the writer connection: it never abandons a transaction midway itself, and on
# the event loop's thread a transaction has no point at which it could be cancelled.
_WRITER_OPS = frozenset(
    {
        "_create_run",
        "_take_over",
        "write_step",
        "delete_steps",
        "record_usage",
        "append_state",
        "finish",
        "heartbeat",
        "mark_keyed",
        "check_lease",
    }
)

for _name in dir(SQLiteStore):
    if _name not in _WRITER_OPS and _talks_to_the_database(_name, getattr(SQLiteStore, _name)):
        setattr(SQLiteStore, _name, _whole(getattr(SQLiteStore, _name)))
