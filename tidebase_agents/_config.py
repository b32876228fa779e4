"""Configuration: which database and schema, how a URL is spelled for SQLAlchemy's async
drivers, and settings read from the environment."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError
from ._vocab import SQLiteSynchronous, parse

ENV_URL = "TIDEBASE_DATABASE_URL"
ENV_SCHEMA = "TIDEBASE_SCHEMA"
ENV_SQLITE_SYNCHRONOUS = "TIDEBASE_SQLITE_SYNCHRONOUS"
DEFAULT_SQLITE_FILE = "tidebase.db"
#: The PostgreSQL schema holding the library's tables when none is configured.
DEFAULT_SCHEMA = "tidebase"

# Whatever driver an application uses for PostgreSQL, the library talks through asyncpg.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "postgresql+psycopg_async": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def resolve_database_url(url: str | None = None) -> str:
    """The async SQLAlchemy URL to use: ``url``, else ``$TIDEBASE_DATABASE_URL``, else the
    embedded SQLite file ``./tidebase.db``. Every PostgreSQL spelling (``postgresql://``,
    ``postgres://``, ``+psycopg``, ``+psycopg2``) means asyncpg."""
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
            f"unsupported PostgreSQL driver {parsed.drivername!r}: use postgresql://, "
            f"postgresql+asyncpg://, postgresql+psycopg:// or postgresql+psycopg2://"
        )
    return parsed.render_as_string(hide_password=False)


def url_of_engine(engine: Any) -> str:
    """The URL (credentials included) of an application's SQLAlchemy ``Engine`` or
    ``AsyncEngine``, for the library to open its own connections with."""
    url = getattr(engine, "url", None)
    if url is None or not hasattr(url, "render_as_string"):
        raise ConfigurationError(
            f"engine= takes a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}"
        )
    return str(url.render_as_string(hide_password=False))


def missing_sqlite_file(url: str | None) -> Path | None:
    """The file of an SQLite URL (resolved as :func:`resolve_database_url` does) if it does
    not exist; None for an existing file, an in-memory database or another backend."""
    resolved = make_url(resolve_database_url(url))
    if resolved.get_backend_name() != "sqlite" or resolved.database in (None, "", ":memory:"):
        return None
    path = Path(resolved.database)
    return None if path.exists() else path.resolve()


def resolve_schema(schema: str | None = None) -> str:
    """The PostgreSQL schema of the library's tables: ``schema``, else ``$TIDEBASE_SCHEMA``,
    else ``tidebase``."""
    name = schema or os.environ.get(ENV_SCHEMA) or DEFAULT_SCHEMA
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name) or name.startswith("pg_"):
        raise ConfigurationError(
            f"invalid schema name {name!r}: use 1 to 63 letters, digits and underscores, "
            f"starting with a letter or underscore (and not pg_)"
        )
    return name


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"


# -- settings from the environment ---------------------------------------------------------

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


_PARSERS: dict[str, Callable[[str], Any]] = {
    "float": float,
    "int": int,
    "str": str,
    "bool": _parse_bool,
    "list": _parse_list,
}


def env_setting(name: str, kind: str) -> Any:
    """The value of environment variable ``name`` parsed as ``kind`` (float, int, bool, str,
    or list: comma-separated), or None when it is unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return _PARSERS[kind](raw)
    except ValueError as exc:
        raise ConfigurationError(f"${name}={raw!r} is not a valid {kind}: {exc}") from None


def setting(value: T | None, env: str, kind: str, default: T) -> T:
    """An explicit ``value`` if given, else ``$env`` (parsed as ``kind``), else ``default``."""
    if value is not None:
        return value
    from_env = env_setting(env, kind)
    return default if from_env is None else from_env


def resolve_synchronous(value: SQLiteSynchronous | str | None = None) -> SQLiteSynchronous:
    """How an embedded database commits: ``value``, else ``$TIDEBASE_SQLITE_SYNCHRONOUS``,
    else ``NORMAL`` (case-insensitive)."""
    chosen = setting(value, ENV_SQLITE_SYNCHRONOUS, "str", None)
    if chosen is None:
        return SQLiteSynchronous.NORMAL
    return parse(SQLiteSynchronous, str(chosen).upper(), "sqlite_synchronous")
