"""The embedded SQLite store: every write of an executing run is one ``BEGIN IMMEDIATE``
transaction (fence, rows, events), so writers queue on the busy timeout instead of failing on a
read-to-write upgrade. WAL mode with ``synchronous=NORMAL``.

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
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import bindparam, delete, event, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .._errors import TidebaseError
from .._vocab import TERMINAL_RUN_STATUSES, EventKind, RunStatus
from . import sql
from .base import Store
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
from .rows import append_event, fence_error, fenced_bump
from .tables import JSONType, RunRow, StateRow, StepRow, UsageRow, UTCDateTime

_MIGRATING = threading.Lock()
#: Seconds a writer waits for SQLite's write lock before giving up.
BUSY_TIMEOUT = 30

_TAKE_OVER = (
    text(sql.SQLITE_TAKE_OVER)
    .bindparams(
        bindparam("expires", type_=UTCDateTime()),
        bindparam("now", type_=UTCDateTime()),
        bindparam("input", type_=JSONType),
    )
    .columns(*RunRow.__table__.c)
)


class SQLiteStore(Store):
    backend: ClassVar[str] = "sqlite"

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
            cur.execute("PRAGMA synchronous=NORMAL")
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

    def _insert(self) -> Any:
        return sqlite_insert

    # -- acquisition -----------------------------------------------------------------------

    async def _create_run(self, new: NewRun) -> RunRecord | None:
        now = utcnow()
        values = dict(
            run_id=new.run_id,
            pipeline=new.pipeline,
            status=str(RunStatus.RUNNING),
            input=new.input,
            input_hash=new.input_hash,
            attempts=1,
            lease_owner=new.owner,
            lease_token=1,
            lease_expires_at=now + dt.timedelta(seconds=new.lease_seconds),
            lease_process=this_process(),
            event_seq=1,
            created_at=now,
            updated_at=now,
        )
        async with self.transaction() as conn:
            row = (
                await conn.execute(
                    sqlite_insert(RunRow)
                    .values(**values)
                    .on_conflict_do_nothing()
                    .returning(*RunRow.__table__.c)
                )
            ).first()
            if row is None:
                return None
            await append_event(
                conn,
                new.run_id,
                1,
                Event(EventKind.RUN_STARTED, data={"owner": new.owner, "pipeline": new.pipeline}),
                at=now,
            )
        return run_from_mapping(row._mapping)

    async def _take_over(self, new: NewRun, dead: DeadHolder | None = None) -> RunRecord | None:
        now = utcnow()
        async with self.transaction() as conn:
            old = (
                await conn.execute(
                    select(RunRow.status, RunRow.lease_owner).where(RunRow.run_id == new.run_id)
                )
            ).first()
            if old is None:
                return None
            row = (
                await conn.execute(
                    _TAKE_OVER,
                    dict(
                        run_id=new.run_id,
                        pipeline=new.pipeline,
                        owner=new.owner,
                        expires=now + dt.timedelta(seconds=new.lease_seconds),
                        now=now,
                        input=new.input,
                        input_hash=new.input_hash,
                        process=this_process(),
                        dead_token=None if dead is None else dead.token,
                    ),
                )
            ).first()
            if row is None:
                return None
            run = run_from_mapping(row._mapping)
            kind = (
                EventKind.LEASE_TAKEN_OVER
                if old.status == RunStatus.RUNNING
                else EventKind.RUN_RESUMED
            )
            data = {
                "owner": new.owner,
                "from_status": old.status,
                "previous_owner": old.lease_owner,
                "token": run.lease_token,
                "holder_dead": None if dead is None else str(dead.how),
            }
            await append_event(conn, new.run_id, run.event_seq, Event(kind, data=data), at=now)
        return run

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
        now = utcnow()
        values = fields_of(step)
        values.update(
            run_id=lease.run_id,
            started_at=values["started_at"] or now,
            status=str(step.status),
            replay=str(step.replay),
        )
        if input_json is not None:
            values["input"] = json.loads(input_json)
        stmt = sqlite_insert(StepRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name"],
            set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "name", "started_at")},
        )
        async with self.transaction() as conn:
            seq = await fenced_bump(conn, lease, len(events))
            await conn.execute(stmt)
            await append_event(conn, lease.run_id, seq, *events, at=now)
            for record in usage:
                await conn.execute(
                    update(UsageRow)
                    .where(
                        UsageRow.run_id == lease.run_id,
                        UsageRow.step == record.step,
                        UsageRow.dedupe_key != record.dedupe_key,
                    )
                    .values(lost=True)
                )
            await self._insert_usage(conn, lease.run_id, usage, now)
            if transient:
                below, segment = sql.transient_patterns(step.name, transient)
                await conn.execute(
                    delete(StepRow).where(
                        StepRow.run_id == lease.run_id,
                        StepRow.name.like(below, escape="\\"),
                        StepRow.name.like(segment, escape="\\"),
                    )
                )

    async def delete_steps(
        self,
        lease: Lease,
        names: Sequence[str],
        *,
        event: Event,
        timeout: float | None = None,
    ) -> None:
        async with self.transaction() as conn:
            seq = await fenced_bump(conn, lease, 1)
            await conn.execute(
                delete(StepRow).where(StepRow.run_id == lease.run_id, StepRow.name.in_(names))
            )
            await append_event(conn, lease.run_id, seq, event)

    async def _insert_usage(
        self, conn: Any, run_id: str, usage: Sequence[UsageRecord], now: dt.datetime
    ) -> None:
        if not usage:
            return
        stmt = sqlite_insert(UsageRow).on_conflict_do_nothing(
            index_elements=["run_id", "dedupe_key"]
        )
        await conn.execute(stmt, [dict(fields_of(u), run_id=run_id, created_at=now) for u in usage])

    async def record_usage(
        self, lease: Lease, usage: Sequence[UsageRecord], *, timeout: float | None = None
    ) -> None:
        async with self.transaction() as conn:
            await fenced_bump(conn, lease, 0)
            await self._insert_usage(conn, lease.run_id, usage, utcnow())

    async def append_state(
        self, lease: Lease, version: int, value: Any, *, timeout: float | None = None
    ) -> None:
        now = utcnow()
        async with self.transaction() as conn:
            seq = await fenced_bump(conn, lease, 1, state_version=version)
            await conn.execute(
                insert(StateRow).values(
                    run_id=lease.run_id, version=version, value=value, created_at=now
                )
            )
            await append_event(
                conn,
                lease.run_id,
                seq,
                Event(EventKind.STATE_SET, data={"version": version}),
                at=now,
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
        async with self.transaction() as conn:
            seq = await fenced_bump(
                conn,
                lease,
                1,
                status=str(status),
                output=output,
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=utcnow() if status in TERMINAL_RUN_STATUSES else None,
            )
            await append_event(conn, lease.run_id, seq, event)

    async def check_lease(self, lease: Lease, *, timeout: float | None = None) -> None:
        async with self.connect() as conn:
            row = (
                await conn.execute(
                    select(RunRow.status, RunRow.lease_token).where(RunRow.run_id == lease.run_id)
                )
            ).first()
        if row is None or row.status != RunStatus.RUNNING or row.lease_token != lease.token:
            raise fence_error(lease, None if row is None else row.status)


_T = TypeVar("_T")


def _whole(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Run ``method`` as a task of its own that its caller's cancellation cannot interrupt."""

    @functools.wraps(method)
    async def whole(*args: Any, **kwargs: Any) -> _T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                cancelled = True  # finish the database call first
                continue
            if cancelled:
                raise asyncio.CancelledError
            return result

    return whole


def _talks_to_the_database(name: str, method: Any) -> bool:
    # Lifecycle and composite operations are made of these; helpers handed an open
    # connection run inside an operation already.
    if not inspect.iscoroutinefunction(method) or name in _COMPOSITE or name.startswith("__"):
        return False
    params = list(inspect.signature(method).parameters)
    return params[1:2] != ["conn"]


_COMPOSITE = frozenset(
    {"open", "_open", "close", "_close_backend", "acquire", "_with_steps", "listen"}
)

for _name in dir(SQLiteStore):
    if _talks_to_the_database(_name, getattr(SQLiteStore, _name)):
        setattr(SQLiteStore, _name, _whole(getattr(SQLiteStore, _name)))
