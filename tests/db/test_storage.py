"""Storage: migrations (Alembic at the repository root and from a built wheel), model/migration
drift, living beside a user's own tables and Alembic history, database URLs, and the errors of
R13 for bad run ids and unreachable or unmigrated databases."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from child_support import retry_locked
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tidebase_agents import (
    ConfigurationError,
    DatabaseUnavailable,
    SchemaNotMigrated,
    Tidebase,
)

REPO = Path(__file__).resolve().parents[2]
TIDEBASE_TABLES = {
    "tidebase_runs",
    "tidebase_steps",
    "tidebase_events",
    "tidebase_state",
    "tidebase_usage",
    "tidebase_usage_daily",
    "tidebase_approvals",
    "tidebase_messages",
}
VERSION_TABLE = "tidebase_alembic_version"
from tidebase_agents._store.tables import SCHEMA_REVISION as HEAD  # noqa: E402


def async_url(url: str) -> str:
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


async def query(url: str, *statements: str) -> list[list[Any]]:
    """Run statements on a plain engine (not the library's); return each one's rows."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            out = []
            for sql in statements:
                result = await conn.execute(text(sql))
                out.append([tuple(r) for r in result] if result.returns_rows else [])
            return out
    finally:
        await engine.dispose()


async def table_names(url: str, schema: str | None = None) -> set[str]:
    """Tables of ``schema`` (default: the connection's default schema)."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: sa_inspect(c).get_table_names(schema)))
    finally:
        await engine.dispose()


def library_schema(url: str) -> str | None:
    """Where the library's tables live: their own schema on PostgreSQL; SQLite has none."""
    return "tidebase" if url.startswith("postgres") else None


def qualified(url: str, table: str) -> str:
    schema = library_schema(url)
    return f"{schema}.{table}" if schema else table


async def library_tables(url: str) -> set[str]:
    return await table_names(url, library_schema(url))


def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``alembic ARGS`` as a subprocess at the repository root with TIDEBASE_DATABASE_URL=url."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        env={**os.environ, "TIDEBASE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def run_pipeline(url: str | None, run_id: str = "r") -> Any:
    tide = Tidebase(url)

    async def body(run: Any, inp: Any) -> Any:
        return await run.step("s", lambda: {"ok": True})

    try:
        return await tide.run("storage", body, run_id=run_id)
    finally:
        await tide.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables at all: a new SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


# -- migrations ----------------------------------------------------------------------------------


def test_alembic_upgrade_check_downgrade_beside_the_users_own_tables(fresh_url: str) -> None:
    """`alembic upgrade head` / `check` / `downgrade base` at the repository root work on a
    fresh database; the version table is tidebase_alembic_version; the user's own tables and
    own alembic_version are untouched throughout."""
    asyncio.run(
        query(
            fresh_url,
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, note VARCHAR(50))",
            "INSERT INTO orders (id, note) VALUES (1, 'keep me')",
            "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)",
            "INSERT INTO alembic_version (version_num) VALUES ('users_rev_1')",
        )
    )
    user_rows = [[(1, "keep me")], [("users_rev_1",)]]
    user_queries = ("SELECT id, note FROM orders", "SELECT version_num FROM alembic_version")

    up = alembic(fresh_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    version = qualified(fresh_url, VERSION_TABLE)
    if library_schema(fresh_url):
        assert asyncio.run(table_names(fresh_url)) == {"orders", "alembic_version"}
        assert asyncio.run(library_tables(fresh_url)) == {*TIDEBASE_TABLES, VERSION_TABLE}
    else:
        assert asyncio.run(table_names(fresh_url)) == {
            *TIDEBASE_TABLES,
            VERSION_TABLE,
            "orders",
            "alembic_version",
        }
    assert asyncio.run(query(fresh_url, f"SELECT version_num FROM {version}")) == [[(HEAD,)]]
    assert asyncio.run(query(fresh_url, *user_queries)) == user_rows

    check = alembic(fresh_url, "check")
    assert check.returncode == 0, check.stdout + check.stderr

    assert asyncio.run(run_pipeline(fresh_url)) == {"ok": True}

    down = alembic(fresh_url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    left = asyncio.run(table_names(fresh_url))
    assert not (left & TIDEBASE_TABLES)
    assert not (asyncio.run(library_tables(fresh_url)) & TIDEBASE_TABLES)
    assert left - {VERSION_TABLE} == {"orders", "alembic_version"}
    if VERSION_TABLE in left:
        assert asyncio.run(query(fresh_url, f"SELECT * FROM {VERSION_TABLE}")) == [[]]
    assert asyncio.run(query(fresh_url, *user_queries)) == user_rows


async def test_models_and_migrations_do_not_drift(db_url: str) -> None:
    """Autogenerate comparing the models with the migrated schema finds no difference (only
    tidebase_ tables are considered), and the library's version table is its own."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tidebase_agents._store.tables import Base

    tide = Tidebase(db_url)
    await tide.migrate()
    await tide.close()

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "table":
            return bool(name) and name.startswith("tidebase_") and name != VERSION_TABLE
        return True

    def diff(conn: Any) -> list[Any]:
        schema = library_schema(db_url)
        if schema:  # the models name no schema: compare them with the library's, as env.py does
            conn.exec_driver_sql(f"SET search_path TO {schema}")
            conn.dialect.default_schema_name = schema
        ctx = MigrationContext.configure(
            conn, opts={"include_name": include_name, "compare_type": True}
        )
        return compare_metadata(ctx, Base.metadata)  # type: ignore[no-any-return]

    engine = create_async_engine(async_url(db_url))
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()
    names = await library_tables(db_url)
    assert names == {*TIDEBASE_TABLES, VERSION_TABLE}
    version = qualified(db_url, VERSION_TABLE)
    assert await query(db_url, f"SELECT version_num FROM {version}") == [[(HEAD,)]]


def test_sqlite_default_creates_and_migrates_tidebase_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no URL and no TIDEBASE_DATABASE_URL, ./tidebase.db is created and migrated on first
    use; a second use (new instance, new loop) finds its checkpoints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TIDEBASE_DATABASE_URL", raising=False)
    assert not (tmp_path / "tidebase.db").exists()
    assert asyncio.run(run_pipeline(None, "default-run")) == {"ok": True}
    db = tmp_path / "tidebase.db"
    assert db.is_file()
    url = f"sqlite:///{db}"
    assert asyncio.run(table_names(url)) == {*TIDEBASE_TABLES, VERSION_TABLE}
    assert asyncio.run(query(url, f"SELECT version_num FROM {VERSION_TABLE}")) == [[(HEAD,)]]

    async def second() -> Any:
        tide = Tidebase()
        try:
            return (await tide.get_run("default-run")).status
        finally:
            await tide.close()

    assert asyncio.run(second()) == "completed"


def test_wheel_installed_outside_the_repo_runs_tidebase_agents_migrate(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """A wheel built from the repository, installed into a fresh venv outside it, ships the
    migrations: `tidebase-agents migrate` brings a fresh PostgreSQL database to head."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("tidebase_agents-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr

    migrate = subprocess.run(
        [str(venv / "bin" / "tidebase-agents"), "migrate"],
        cwd=tmp_path,
        env={**env, "TIDEBASE_DATABASE_URL": empty_pg_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    version = subprocess.run(
        [str(venv / "bin" / "tidebase-agents"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.stdout == f"tidebase-agents {wheel.name.split('-')[1]}\n", version.stderr
    assert asyncio.run(library_tables(empty_pg_url)) == {*TIDEBASE_TABLES, VERSION_TABLE}
    version = qualified(empty_pg_url, VERSION_TABLE)
    assert asyncio.run(query(empty_pg_url, f"SELECT version_num FROM {version}")) == [[(HEAD,)]]
    assert asyncio.run(run_pipeline(empty_pg_url)) == {"ok": True}


# -- R13: databases that cannot be used ----------------------------------------------------------


async def test_r13_unreachable_postgres_raises_database_unavailable() -> None:
    """R13: an unreachable database raises DatabaseUnavailable (not a driver traceback), from
    every entry point, and the message never shows the password."""
    tide = Tidebase("postgresql://postgres:s3cret@127.0.0.1:1/x")

    async def body(run: Any, inp: Any) -> Any:
        raise AssertionError("the body must not run")

    calls = (
        lambda: tide.run("p", body, run_id="r"),
        lambda: tide.cancel("r"),
        lambda: tide.get_run("r"),
    )
    try:
        for call in calls:
            with pytest.raises(DatabaseUnavailable) as info:
                await call()
            assert type(info.value) is DatabaseUnavailable
            assert "127.0.0.1:1" in str(info.value)
            assert "s3cret" not in str(info.value)
            assert info.value.__cause__ is None
    finally:
        await tide.close()


async def test_r13_unopenable_sqlite_path_raises_database_unavailable(tmp_path: Path) -> None:
    """R13: an SQLite file that cannot be created (its directory is a regular file) raises
    DatabaseUnavailable, not an OSError from deep inside."""
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(DatabaseUnavailable):
        await run_pipeline(f"sqlite:///{tmp_path / 'not-a-dir' / 'tidebase.db'}")


async def test_r13_unmigrated_postgres_raises_schema_not_migrated_and_is_left_alone(
    empty_pg_url: str,
) -> None:
    """R13: PostgreSQL without the tidebase tables raises SchemaNotMigrated naming
    `tidebase-agents migrate`, and is never migrated implicitly."""
    tide = Tidebase(empty_pg_url)

    async def body(run: Any, inp: Any) -> Any:
        raise AssertionError("the body must not run")

    try:
        with pytest.raises(SchemaNotMigrated) as info:
            await tide.run("p", body, run_id="r")
        assert "tidebase-agents migrate" in str(info.value)
        with pytest.raises(SchemaNotMigrated):
            await tide.cancel("r")
    finally:
        await tide.close()
    assert await table_names(empty_pg_url) == set()
    assert await library_tables(empty_pg_url) == set()


async def test_r13_postgres_at_another_revision_raises_schema_not_migrated(pg_url: str) -> None:
    """R13: a PostgreSQL schema at another revision than the library's is not used."""
    await query(pg_url, f"UPDATE {qualified(pg_url, VERSION_TABLE)} SET version_num = '0000_older'")
    with pytest.raises(SchemaNotMigrated) as info:
        await run_pipeline(pg_url)
    assert "0000_older" in str(info.value)
    assert "tidebase-agents migrate" in str(info.value)


# -- R13: run ids; URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "a b", "x" * 300, "tab\there", "nl\n", 42, b"bytes", ("t",)], ids=repr
)
async def test_r13_invalid_run_id_raises_configuration_error_and_writes_nothing(
    db_url: str, bad: Any
) -> None:
    """R13: an invalid run id raises ConfigurationError before anything is written."""
    tide = Tidebase(db_url)
    calls = []

    async def body(run: Any, inp: Any) -> Any:
        calls.append(1)

    try:
        with pytest.raises(ConfigurationError):
            await tide.run("p", body, run_id=bad)
        with pytest.raises(ConfigurationError):
            await tide.cancel(bad)
        await tide.migrate()
        assert await tide.store.list_runs() == []
    finally:
        await tide.close()
    assert calls == []


def test_valid_run_id_limits_are_accepted(db_url: str) -> None:
    """The boundary: 255 characters and punctuation/unicode without whitespace are fine."""
    for run_id in ("x" * 255, "run/42:ü-é_.~"):
        assert asyncio.run(run_pipeline(db_url, run_id)) == {"ok": True}


def test_postgres_url_spellings_all_mean_asyncpg(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`postgresql://`, `postgres://`, `postgresql+asyncpg://` and TIDEBASE_DATABASE_URL all reach
    the same database."""
    rest = pg_url.split("://", 1)[1]
    for i, spelling in enumerate(("postgresql", "postgres", "postgresql+asyncpg")):
        assert asyncio.run(run_pipeline(f"{spelling}://{rest}", f"url-{i}")) == {"ok": True}
    monkeypatch.setenv("TIDEBASE_DATABASE_URL", f"postgres://{rest}")
    assert asyncio.run(run_pipeline(None, "url-env")) == {"ok": True}
    rows = asyncio.run(query(pg_url, "SELECT run_id FROM tidebase.tidebase_runs ORDER BY run_id"))
    assert rows == [[("url-0",), ("url-1",), ("url-2",), ("url-env",)]]


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "oracle://x"])
def test_unsupported_database_url_raises_configuration_error(url: str) -> None:
    """A URL of another database (or no URL at all) is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        asyncio.run(run_pipeline(url))


# -- closing a Tidebase with work in flight ------------------------------------------------------


async def test_r13_closing_mid_run_keeps_what_was_committed_and_stops_leftover_work(
    db_url: str,
) -> None:
    """R13: a Tidebase closed while one of its runs waits between steps keeps that run's
    committed step; the leftover execution can no longer checkpoint (DatabaseUnavailable, no
    write through released connections); the same Tidebase serves new calls, and the run
    resumes once its lease expires, replaying the committed step instead of re-running it."""
    tide = Tidebase(db_url, lease_seconds=1)
    calls: collections.Counter[str] = collections.Counter()
    inside, gate = asyncio.Event(), asyncio.Event()

    def counted(name: str) -> Any:
        def fn() -> str:
            calls[name] += 1
            return name

        return fn

    async def body(run: Any, inp: Any) -> list[str]:
        first = await run.step("one", counted("one"))
        inside.set()
        await gate.wait()
        return [first, await run.step("two", counted("two"))]

    task = asyncio.create_task(tide.run("closing", body, run_id="c"))
    await asyncio.wait_for(inside.wait(), 30)
    await tide.close()
    gate.set()
    with pytest.raises(DatabaseUnavailable, match="closed"):
        await task
    try:
        steps = {s.name: s.status for s in await tide.steps("c")}
        assert steps == {"one": "completed"}
        result = await retry_locked(lambda: tide.run("closing", body, run_id="c"))
        assert result == ["one", "two"]
        assert calls["one"] == 1, "the committed step ran again"
    finally:
        await tide.close()


async def test_close_waits_for_a_checkpoint_write_in_flight(pg_url: str) -> None:
    """close() does not abandon a checkpoint write midway: held up by a row lock, the write
    keeps close() waiting, then commits; only the run's later work finds the store closed."""
    tide = Tidebase(pg_url)
    inside, gate = asyncio.Event(), asyncio.Event()

    async def body(run: Any, inp: Any) -> str:
        inside.set()
        await gate.wait()
        return str(await run.step("s", lambda: "v"))

    blocker = await asyncpg.connect(pg_url)
    try:
        task = asyncio.create_task(tide.run("inflight", body, run_id="w"))
        await asyncio.wait_for(inside.wait(), 30)
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM tidebase.tidebase_runs WHERE run_id = 'w' FOR UPDATE")
        gate.set()
        for _ in range(3000):  # until the step's write waits on the lock
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the step's write never reached the lock"
        closing = asyncio.create_task(tide.close())
        await asyncio.sleep(0.2)
        assert not closing.done(), "close() returned while a checkpoint write was in flight"
        await lock.rollback()
        await asyncio.wait_for(closing, 30)
        with pytest.raises(DatabaseUnavailable, match="closed"):
            await task
    finally:
        await blocker.close()
    other = Tidebase(pg_url)
    try:
        steps = {s.name: (s.status, s.output) for s in await other.steps("w")}
        assert steps == {"s": ("completed", "v")}
    finally:
        await other.close()
