"""Alembic environment for tidebase-agents (async; URL from TIDEBASE_DATABASE_URL).

Used by ``alembic`` at the repository root, by an application's own ``alembic.ini`` through a
section of its own (``[tidebase]`` with ``script_location = tidebase_agents:migrations``, run
as ``alembic -n tidebase upgrade head``), and by ``tidebase-agents migrate``, which hands in an
open connection through ``config.attributes["connection"]``.

The URL is the section's ``sqlalchemy.url``, else ``$TIDEBASE_DATABASE_URL``, else the
``[alembic]`` section's ``sqlalchemy.url``. On PostgreSQL the tables live in their own schema
(the section's ``schema``, else ``$TIDEBASE_SCHEMA``, else ``tidebase``); see
``tidebase_agents._store.migrate``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tidebase_agents._config import ENV_URL, resolve_database_url
from tidebase_agents._store.migrate import HOME_ATTRIBUTE, migration_schema, prepare_postgres
from tidebase_agents._store.tables import VERSION_TABLE, Base

config = context.config
target_metadata = Base.metadata


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # Live beside the user's own tables and Alembic history: only look at ours.
    if type_ == "table":
        return name is not None and name.startswith("tidebase_") and name != VERSION_TABLE
    return True


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(ENV_URL)
    if not url and config.file_config.has_section("alembic"):
        # Run from an application's alembic.ini: its own database by default.
        url = config.file_config.get("alembic", "sqlalchemy.url", fallback=None)
    return resolve_database_url(url or None)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=_include_name,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _run_sync(connection: Connection) -> None:
    if connection.dialect.name != "postgresql":
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    schema = migration_schema(config)
    # Unqualified names resolve through search_path (Alembic's own ALTER statements do not
    # honour schema_translate_map); the version table is found there too, in the home
    # schema before revision 0003 moves it.
    connection = connection.execution_options(schema_translate_map=None)
    prepare_postgres(connection, schema)
    dialect = connection.dialect
    default_schema = dialect.default_schema_name
    dialect.default_schema_name = schema  # autogenerate compares the library's schema
    try:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        dialect.default_schema_name = default_schema


async def _run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run_sync)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        if url.startswith("postgresql"):
            schema = migration_schema(config)
            home = config.attributes.get(HOME_ATTRIBUTE) or "public"
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            context.execute(f'SET LOCAL search_path TO "{schema}", "{home}"')
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
        return
    asyncio.run(_run_async(_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
