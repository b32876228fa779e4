"""Shared fixtures: every storage test runs against embedded SQLite and a fresh PostgreSQL database.

PostgreSQL comes from ``TIDEBASE_TEST_PG_URL`` (an admin URL; default the local server's
``postgres`` database). Each test gets its own database cloned from a migrated template and
dropped afterwards. With ``TIDEBASE_TEST_REQUIRE_PG=1`` (as CI sets it) an unreachable
PostgreSQL fails the run instead of skipping the PostgreSQL half.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("TIDEBASE_DATABASE_URL", None)

# Helpers (and the modules child processes import) live in tests/support.
sys.path.insert(0, str(Path(__file__).parent / "support"))

from agents import set_tracing_disabled
from harness import REQUIRE_PG, fresh_pg_database, pg_admin, pg_url_of

set_tracing_disabled(True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str | None]:
    """Name of a migrated template database, or None when PostgreSQL is not reachable."""
    try:
        pg_admin("SELECT 1")
    except Exception as exc:
        if REQUIRE_PG:
            pytest.fail(
                f"PostgreSQL is required (TIDEBASE_TEST_REQUIRE_PG=1) but unreachable: {exc}"
            )
        yield None
        return
    name = f"tidebase_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_admin(f'CREATE DATABASE "{name}"')

    from tidebase_agents import Tidebase

    async def migrate() -> None:
        tide = Tidebase(pg_url_of(name))
        await tide.migrate()
        await tide.close()

    asyncio.run(migrate())
    yield name
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _temporary_pg_database(pg_template: str | None, *, migrated: bool) -> Iterator[str]:
    """A PostgreSQL database of the test's own (migrated from the template, or empty)."""
    if pg_template is None:
        pytest.skip("PostgreSQL not reachable (set TIDEBASE_TEST_REQUIRE_PG=1 to require it)")
    if migrated:
        name = fresh_pg_database(pg_template)
    else:
        name = f"tidebase_e_{uuid.uuid4().hex[:12]}"
        pg_admin(f'CREATE DATABASE "{name}"')
    yield pg_url_of(name)
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_template: str | None
) -> Iterator[str]:
    """A fresh, migrated database URL: embedded SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tidebase.db'}"
        return
    yield from _temporary_pg_database(pg_template, migrated=True)


@pytest.fixture
def pg_url(pg_template: str | None) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database URL (for PostgreSQL-only probes)."""
    yield from _temporary_pg_database(pg_template, migrated=True)


@pytest.fixture
def empty_pg_url(pg_template: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database with no tables at all."""
    yield from _temporary_pg_database(pg_template, migrated=False)


@pytest.fixture
def calls_table(pg_url: str) -> Iterator[str]:
    """A PostgreSQL database with the ``wk_calls`` table the worker test app records its
    external calls in (see ``wk_app``)."""

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "CREATE TABLE wk_calls (id serial PRIMARY KEY, kind text, run_id text, "
                "key text, pid int)"
            )
        finally:
            await conn.close()

    asyncio.run(create())
    yield pg_url
