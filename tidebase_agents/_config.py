"""Configuration: which database, and how its URL is spelled for SQLAlchemy's async drivers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError

ENV_URL = "TIDEBASE_DATABASE_URL"
DEFAULT_SQLITE_FILE = "tidebase.db"

_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def resolve_database_url(url: str | None = None) -> str:
    """The async SQLAlchemy URL to use: ``url``, else ``$TIDEBASE_DATABASE_URL``, else the
    embedded SQLite file ``./tidebase.db``. ``postgresql://`` and ``postgres://`` mean asyncpg."""
    raw = url or os.environ.get(ENV_URL) or ""
    if not raw:
        return f"sqlite+aiosqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}"
    return _normalized(raw)


@functools.lru_cache(maxsize=64)
def _normalized(raw: str) -> str:
    # Every run resolves its URL; parsing it each time was measurable on the hot path.
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL {raw!r}: {exc}") from None
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver:
        parsed = parsed.set(drivername=driver)
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {parsed.drivername!r}: use postgresql:// or sqlite://"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "asyncpg":
        raise ConfigurationError(
            f"use the asyncpg driver for PostgreSQL, not {parsed.drivername!r}"
        )
    return parsed.render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"
