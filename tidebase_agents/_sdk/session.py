"""Sessions under replay: a journaling proxy for an Agents SDK ``Session``.

The SDK reads and writes a run's session while the run executes (the new user input before the
first model call, each turn's items after it). If the process dies mid-run, the agent step is
re-executed and would write the same input again and see a history that differs from the first
attempt's. Each session call made inside an agent step is therefore a step of its own:

- ``get_items`` returns what the first attempt read, so the re-executed run sees the same
  history and the same model input;
- ``add_items`` / ``pop_item`` / ``clear_session`` that completed are not repeated.

What remains: a crash in the moment between the session's own commit and the commit of that
call's checkpoint repeats that one write on resume (the session store and the checkpoint store
do not share a transaction).

A run replayed from its checkpoint does not touch its session, so a session must outlive the
process to hold the conversation after a crash: one kept in memory (``SQLiteSession`` without a
file, a SQLAlchemy session on an in-memory SQLite, fakeredis) comes back empty. Using one in a
pipeline warns once per session type.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from .._engine import Executor, StepSpec, current_scope
from .._errors import NotDurableWarning
from .._hashing import sha256_hex

_warned: set[type] = set()
_warned_lock = threading.Lock()


def kept_in_memory(session: Any, depth: int = 0) -> bool:
    """Whether ``session`` keeps its items only in this process (attribute reads, no I/O).

    Knows the SDK's own stores and the wrappers around them; unknown sessions count as
    durable.
    """
    if depth > 8:
        return False
    for attribute in ("inner", "underlying_session"):  # DurableSession, encryption, compaction
        inner = getattr(session, attribute, None)
        if inner is not None and inner is not session:
            return kept_in_memory(inner, depth + 1)
    db_path = vars(session).get("db_path") if hasattr(session, "__dict__") else None
    if db_path is not None:  # SQLiteSession, AdvancedSQLiteSession, AsyncSQLiteSession
        # "" is a private temporary file, deleted when the connection closes.
        return str(db_path) in (":memory:", "")
    url = getattr(getattr(session, "_engine", None), "url", None)  # SQLAlchemySession
    if url is not None and hasattr(url, "get_backend_name"):
        database = str(url.database or "")
        return url.get_backend_name() == "sqlite" and (
            database in ("", ":memory:")
            or database.startswith("file::memory:")
            or url.query.get("mode") == "memory"
        )
    redis = getattr(session, "_redis", None)  # RedisSession
    return redis is not None and type(redis).__module__.startswith("fakeredis")


def warn_if_kept_in_memory(session: Any) -> None:
    """Warn once per session type that an in-memory session loses the conversation on a
    crash."""
    cls = type(session)
    if not kept_in_memory(session):
        return
    with _warned_lock:
        if cls in _warned:
            return
        _warned.add(cls)
    warnings.warn(
        f"the session ({cls.__module__}.{cls.__qualname__}) is kept in memory: after a crash "
        f"the resumed run replays its finished agent runs without writing to the session, so "
        f"it comes back without the conversation and the next turn starts from nothing. Use a "
        f"session stored outside the process (SQLiteSession with a file, SQLAlchemySession on "
        f"your database)",
        NotDurableWarning,
        stacklevel=3,
    )


class DurableSession:
    """Wraps ``inner`` so that its calls inside a pipeline replay instead of repeating."""

    def __init__(self, inner: Any, executor: Executor) -> None:
        warn_if_kept_in_memory(inner)
        self.inner = inner
        self.executor = executor
        self.session_id = inner.session_id
        self.session_settings = getattr(inner, "session_settings", None)

    async def _journal(self, op: str, call: Any, arguments: Any) -> Any:
        scope = current_scope() or self.executor.root
        name = f"{scope.prefix}session:{op}#{scope.next_ordinal('session')}"
        spec = StepSpec(
            name=name,
            fn=call,
            input_hash=sha256_hex({"session": self.session_id, "op": op, "args": arguments}),
        )
        return await self.executor.execute(spec)

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return list(
            await self._journal("get", lambda: self.inner.get_items(limit), {"limit": limit})
        )

    async def add_items(self, items: list[Any]) -> None:
        await self._journal("add", lambda: self.inner.add_items(items), items)

    async def pop_item(self) -> Any:
        return await self._journal("pop", self.inner.pop_item, None)

    async def clear_session(self) -> None:
        await self._journal("clear", self.inner.clear_session, None)
