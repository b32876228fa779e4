"""One store per (database URL, schema, event loop): pooled connections belong to the loop that
made them."""

from __future__ import annotations

import asyncio
import weakref

from .._config import resolve_database_url, resolve_schema
from .base import Store
from .postgres import PostgresStore
from .sqlite import SQLiteStore

_BACKENDS: dict[str, type[Store]] = {cls.backend: cls for cls in (PostgresStore, SQLiteStore)}
_stores: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str | None], Store]
] = weakref.WeakKeyDictionary()


def get_store(url: str | None = None, schema: str | None = None) -> Store:
    """The shared store for ``url`` (resolved per ``resolve_database_url``) and, on
    PostgreSQL, ``schema`` (per ``resolve_schema``) on this loop."""
    resolved = resolve_database_url(url)
    backend = resolved.split(":", 1)[0].split("+", 1)[0]
    key = (resolved, resolve_schema(schema) if backend == "postgresql" else None)
    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(key)
    if store is None:
        store = per_loop[key] = _BACKENDS[backend](*key)
        store.on_close = _forget
    return store


def _forget(store: Store) -> None:
    for per_loop in _stores.values():
        key = (store.url, store.schema)
        if per_loop.get(key) is store:
            del per_loop[key]


async def close_stores() -> None:
    """Close every store made on the running loop."""
    for store in list(_stores.pop(asyncio.get_running_loop(), {}).values()):
        await store.close()
