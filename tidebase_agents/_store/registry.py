"""One store per (database URL, event loop): pooled connections belong to the loop that made them."""

from __future__ import annotations

import asyncio
import weakref

from .._config import resolve_database_url
from .base import Store
from .postgres import PostgresStore
from .sqlite import SQLiteStore

_BACKENDS: dict[str, type[Store]] = {cls.backend: cls for cls in (PostgresStore, SQLiteStore)}
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Store]] = (
    weakref.WeakKeyDictionary()
)


def get_store(url: str | None = None) -> Store:
    """The shared store for ``url`` (resolved per ``resolve_database_url``) on this loop."""
    resolved = resolve_database_url(url)
    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(resolved)
    if store is None:
        backend = resolved.split(":", 1)[0].split("+", 1)[0]
        store = per_loop[resolved] = _BACKENDS[backend](resolved)
        store.on_close = _forget
    return store


def _forget(store: Store) -> None:
    for per_loop in _stores.values():
        if per_loop.get(store.url) is store:
            del per_loop[store.url]


async def close_stores() -> None:
    """Close every store made on the running loop."""
    for store in list(_stores.pop(asyncio.get_running_loop(), {}).values()):
        await store.close()
