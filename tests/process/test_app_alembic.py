"""The library inside an application that has its own SQLAlchemy models and Alembic history on
PostgreSQL (psycopg, a sync env.py with ``target_metadata = Base.metadata``), run as real
``alembic`` and ``tidebase-agents`` processes from the application's folder:

- after ``tidebase-agents migrate``, the application's ``alembic check`` finds nothing to do and
  its ``upgrade head`` / ``downgrade base`` leave the library's tables and runs alone;
- the library's migrations run from the application's own ``alembic.ini`` (``[tidebase]``);
- when the application's Alembic ran the library's migrations into its own version table,
  ``migrate`` says so in one line, and following what it says repairs the installation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from wk_support import CLI, child_env

import tidebase_agents
from tidebase_agents import Run, Tidebase
from tidebase_agents._store.tables import SCHEMA_REVISION, TABLE_NAMES, VERSION_TABLE

pytestmark = pytest.mark.postgres

LIBRARY_VERSIONS = Path(tidebase_agents.__file__).parent / "migrations" / "versions"

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))
"""

# The env.py `alembic init` writes, with the application's metadata and URL.
ENV = """
import os

from alembic import context
from sqlalchemy import create_engine

from models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = create_engine(os.environ["APP_DATABASE_URL"])
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
"""

FIRST_REVISION = '''
"""orders"""
import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("note", sa.String(length=100), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("orders")
'''

INI = """
[alembic]
script_location = %(here)s/migrations
prepend_sys_path = .
{version_locations}

[tidebase]
script_location = tidebase_agents:migrations
"""


def make_app(root: Path, *, version_locations: str = "") -> Path:
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "models.py").write_text(MODELS)
    (root / "migrations" / "env.py").write_text(ENV)
    (root / "migrations" / "script.py.mako").write_text(
        (LIBRARY_VERSIONS.parent / "script.py.mako").read_text()
    )
    (root / "migrations" / "versions" / "app_0001_orders.py").write_text(FIRST_REVISION)
    (root / "alembic.ini").write_text(INI.format(version_locations=version_locations))
    return root


def psycopg_url(url: str) -> str:
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def run(root: Path, url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A command run from the application's folder, as its developers run it."""
    env = child_env(url=psycopg_url(url), APP_DATABASE_URL=psycopg_url(url))
    env.pop("PYTHONPATH", None)
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=180)


def alembic(root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(root, url, sys.executable, "-m", "alembic", *args)


def tidebase(root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(root, url, *CLI, *args)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


async def tables(url: str) -> dict[str, set[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await conn.close()
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(r["schemaname"], set()).add(r["tablename"])
    return found


async def some_runs(url: str) -> list[str]:
    tide = Tidebase(url)

    async def body(run: Run, n: int) -> int:
        return await run.step("double", lambda: n * 2)

    try:
        return [
            str(await tide.run("app-pipeline", body, run_id=f"app-{n}", input=n)) for n in (1, 2)
        ]
    finally:
        await tide.close()


async def run_ids(url: str) -> list[str]:
    tide = Tidebase(url)
    try:
        return sorted(r.run_id for r in await tide.list_runs())
    finally:
        await tide.close()


LIBRARY = {*TABLE_NAMES, VERSION_TABLE}


def test_the_applications_alembic_and_the_library_leave_each_other_alone(
    empty_pg_url: str, tmp_path: Path
) -> None:
    url = empty_pg_url
    app = make_app(tmp_path / "app")
    ok(alembic(app, url, "upgrade", "head"))
    # The library's migrations from the application's own alembic.ini, then its command.
    ok(alembic(app, url, "-n", "tidebase", "upgrade", "head"))
    assert SCHEMA_REVISION in ok(alembic(app, url, "-n", "tidebase", "current"))
    assert f"{SCHEMA_REVISION} -> {SCHEMA_REVISION}" in ok(tidebase(app, url, "migrate"))
    assert asyncio.run(tables(url)) == {
        "public": {"orders", "alembic_version"},
        "tidebase": LIBRARY,
    }
    assert asyncio.run(some_runs(url)) == ["2", "4"]

    # The application's autogenerate sees only its own models: nothing to do.
    check = ok(alembic(app, url, "check"))
    assert "No new upgrade operations detected" in check
    ok(alembic(app, url, "revision", "--autogenerate", "-m", "nothing"))
    (revision,) = (app / "migrations" / "versions").glob("*_nothing.py")
    assert "tidebase" not in revision.read_text() and "op.drop_table" not in revision.read_text()
    revision.unlink()

    # Its downgrade and upgrade touch its own tables only.
    ok(alembic(app, url, "downgrade", "base"))
    assert asyncio.run(tables(url)) == {"public": {"alembic_version"}, "tidebase": LIBRARY}
    assert asyncio.run(run_ids(url)) == ["app-1", "app-2"]
    ok(alembic(app, url, "upgrade", "head"))
    assert asyncio.run(tables(url))["public"] == {"orders", "alembic_version"}
    assert asyncio.run(run_ids(url)) == ["app-1", "app-2"]
    assert "No new upgrade operations detected" in ok(alembic(app, url, "check"))


def test_migrate_explains_tables_an_applications_alembic_made_and_the_fix_works(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """The mistake: the library's versions in the application's version_locations; `upgrade
    heads` runs them, records their revision in the application's alembic_version, and
    leaves the library without a version table of its own."""
    url = empty_pg_url
    app = make_app(
        tmp_path / "app",
        version_locations=f"version_locations = %(here)s/migrations/versions {LIBRARY_VERSIONS}",
    )
    heads = alembic(app, url, "upgrade", "head")
    assert heads.returncode != 0 and "Multiple head revisions" in heads.stdout + heads.stderr
    ok(alembic(app, url, "upgrade", "heads"))
    assert asyncio.run(tables(url))["tidebase"] == set(TABLE_NAMES)  # no version table of its own

    unmigrated = tidebase(app, url, "runs", "list")
    assert unmigrated.returncode == 3
    assert "has tidebase tables in schema tidebase but no record of their revision" in (
        unmigrated.stderr
    )
    refused = tidebase(app, url, "migrate")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    line = refused.stderr
    assert line.count("\n") == 1 and "Traceback" not in line, line
    for needle in (
        "has tidebase tables (",
        "public.alembic_version (an application's own version table) records the library's "
        f"revision {SCHEMA_REVISION}",
        f"DELETE FROM public.alembic_version WHERE version_num = '{SCHEMA_REVISION}'",
        f"`tidebase-agents migrate --stamp {SCHEMA_REVISION}`",
    ):
        assert needle in line, line

    # What it says to do: take the record out of the application's table, stamp, migrate.
    async def delete_record() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "DELETE FROM public.alembic_version WHERE version_num = $1", SCHEMA_REVISION
            )
        finally:
            await conn.close()

    asyncio.run(delete_record())
    assert "stamped" in ok(tidebase(app, url, "migrate", "--stamp", SCHEMA_REVISION))
    assert f"{SCHEMA_REVISION} -> {SCHEMA_REVISION}" in ok(tidebase(app, url, "migrate"))
    assert asyncio.run(tables(url))["tidebase"] == LIBRARY
    assert asyncio.run(some_runs(url)) == ["2", "4"]
