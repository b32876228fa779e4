"""One store per (database URL, schema, event loop): pooled connections belong to the loop that
made them."""

from __future__ import annotations

import asyncio
import weakref

from .._config import resolve_database_url, resolve_schema, resolve_synchronous
from .._vocab import SQLiteSynchronous
from .base import Store
from .postgres import PostgresStore
from .sqlite import SQLiteStore

_stores: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str | None], Store]
] = weakref.WeakKeyDictionary()


def get_store(
    url: str | None = None,
    schema: str | None = None,
    *,
    sqlite_synchronous: SQLiteSynchronous | str | None = None,
) -> Store:
    """The shared store for ``url`` (resolved per ``resolve_database_url``) and, on
    PostgreSQL, ``schema`` (per ``resolve_schema``) on this loop; on SQLite, one per
    ``sqlite_synchronous`` setting (per ``resolve_synchronous``)."""
    resolved = resolve_database_url(url)
    backend = resolved.split(":", 1)[0].split("+", 1)[0]
    option = (
        resolve_schema(schema)
        if backend == "postgresql"
        else str(resolve_synchronous(sqlite_synchronous))
    )
    key = (resolved, option)
    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(key)
    if store is None:
        store = per_loop[key] = (
            PostgresStore(resolved, option)
            if backend == "postgresql"
            else SQLiteStore(resolved, None, option)
        )
        store.on_close = _forget
    return store


def _forget(store: Store) -> None:
    for per_loop in _stores.values():
        for key, held in list(per_loop.items()):
            if held is store:
                del per_loop[key]


async def close_stores() -> None:
    """Close every store made on the running loop."""
    for store in list(_stores.pop(asyncio.get_running_loop(), {}).values()):
        await store.close()
