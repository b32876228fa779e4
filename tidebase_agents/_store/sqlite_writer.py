"""The embedded store's write path: one stdlib ``sqlite3`` connection, no SQLAlchemy.

An executing run's write is a few prepared statements in one ``BEGIN IMMEDIATE`` transaction.
Built through SQLAlchemy and sent through aiosqlite, the same write cost several milliseconds
of client CPU (statement construction and compilation, a thread hop per statement); here it is
tens of microseconds.

Where it runs: with ``synchronous=NORMAL`` a WAL commit does not wait for the disk, so the
transaction runs on the event loop's thread, with SQLite's busy timeout at zero. Only when
another connection holds the write lock (``SQLITE_BUSY`` at ``BEGIN IMMEDIATE``, before
anything was written) does the write move to a worker thread that waits for the lock up to the
busy timeout. With ``synchronous=FULL`` every commit waits for the disk, so every write runs in
the worker thread.

A write handed to the worker thread is never abandoned midway: a caller cancelled meanwhile
waits for the thread to finish (at most the busy timeout), then sees its cancellation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import Table

from .._errors import CheckpointSerializationError
from .._vocab import SQLiteSynchronous
from .tables import StoredJSON, UTCDateTime

_T = TypeVar("_T")
_SQLITE_BUSY = 5  # the primary result code (sqlite3.SQLITE_BUSY from Python 3.11)
Work = Callable[[sqlite3.Connection], _T]


def sqlite_time(value: dt.datetime | None) -> str | None:
    """A UTC datetime as the text SQLAlchemy's SQLite dialect stores (naive UTC, microseconds),
    so both write paths store comparable values."""
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat(" ", "microseconds")


def sqlite_json(value: Any) -> str:
    """A JSON column's text as SQLAlchemy's JSON type stores it (None as ``null``)."""
    return json.dumps(value)


def _parse_time(text: Any) -> dt.datetime | None:
    if text is None:
        return None
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)


def _parse_json(text: Any) -> Any:
    if not isinstance(text, str):
        # None, or a number: a JSON column has numeric affinity, so SQLite stores the text
        # of a bare number as that number.
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointSerializationError(
            f"a stored checkpoint is not valid JSON ({type(exc).__name__}: "
            f"{str(exc)[:200]}); it was changed outside the library"
        ) from None


def row_decoder(table: Table) -> Callable[[sqlite3.Cursor, tuple[Any, ...]], dict[str, Any]]:
    """A ``row_factory`` giving rows of ``table`` as dicts of Python values, decoded as the
    table's SQLAlchemy types decode them (aware UTC datetimes, parsed JSON)."""
    decoders: dict[str, Callable[[Any], Any]] = {}
    for column in table.c:
        if isinstance(column.type, UTCDateTime):
            decoders[column.name] = _parse_time
        elif isinstance(column.type, StoredJSON):
            decoders[column.name] = _parse_json

    def decode(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (name, *_), value in zip(cursor.description, row, strict=True):
            decoder = decoders.get(name)
            out[name] = value if decoder is None else decoder(value)
        return out

    return decode


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "locked" in str(exc) or "busy" in str(exc)


class _Busy(Exception):
    """Another connection holds the write lock: wait for it off the event loop."""


class SQLiteWriter:
    """One connection for an embedded database's fenced writes, used by one task at a time."""

    def __init__(
        self,
        path: str,
        synchronous: SQLiteSynchronous,
        busy_timeout_s: float,
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_ms = int(busy_timeout_s * 1000)
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        #: Transactions this connection committed.
        self.commits = 0
        # FULL waits for the disk at every commit: never on the event loop.
        self._on_loop = synchronous is SQLiteSynchronous.NORMAL

    async def run(self, work: Work[_T]) -> _T:
        """Run ``work(conn)`` in one ``BEGIN IMMEDIATE`` transaction, committed if it returns."""
        async with self._lock:
            if self._on_loop and self._conn is not None:
                try:
                    return self._transaction(work, wait=False)
                except _Busy:
                    pass
            return await uninterrupted(asyncio.to_thread(self._transaction, work, wait=True))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA synchronous={self._synchronous.value}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _transaction(self, work: Work[_T], *, wait: bool) -> _T:
        if self._conn is None:
            self._conn = self._connect()
            conn = self._conn
        else:
            conn = self._conn
            if wait:
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not wait and _is_busy(exc):
                    raise _Busy from None
                raise
            try:
                result = work(conn)
                conn.execute("COMMIT")
                self.commits += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        finally:
            if wait and self._on_loop:
                conn.execute("PRAGMA busy_timeout=0")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def uninterrupted(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile; the
    cancellation is raised after."""
    task = asyncio.ensure_future(awaitable)
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
