"""The library's own PostgreSQL schema (revision 0003_own_schema): an installation made by an
earlier release, with its runs, moves into it and its runs go on; schemas keep apart; the
migration DDL can be printed instead of applied; an application's psycopg engine lends its
URL. On SQLite (no schemas) an earlier installation migrates itself in place."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from agentkit_common import async_url
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import create_async_engine
from wk_support import assert_gap_free, wait_for

from tidebase_agents import Run, SchemaNotMigrated, Tidebase
from tidebase_agents._codec import encode
from tidebase_agents._hashing import sha256_hex
from tidebase_agents._ids import derive_idempotency_key
from tidebase_agents._store.migrate import alembic_config
from tidebase_agents._store.tables import (
    SCHEMA_REVISION,
    TABLE_NAMES,
    VERSION_TABLE,
    EventRow,
    RunRow,
    StepRow,
)

BEFORE = "0002_drop_cancel_requested"
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without any table: a new SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'earlier.db'}"
    else:
        yield request.getfixturevalue("empty_pg_url")


async def install_earlier_release(url: str) -> None:
    """What the first release left: its migrations run as its env.py ran them (unqualified,
    in the connection's default schema, public), and runs written by it."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)

    def migrate(conn: Any) -> None:
        with EnvironmentContext(
            cfg,
            script,
            fn=lambda rev, _ctx: script._upgrade_revs(BEFORE, rev),
            destination_rev=BEFORE,
        ) as env:
            env.configure(
                connection=conn,
                version_table=VERSION_TABLE,
                render_as_batch=conn.dialect.name == "sqlite",
            )
            with env.begin_transaction():
                env.run_migrations()

    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            await conn.run_sync(migrate)
            await conn.commit()
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT)"))
            await conn.execute(text("INSERT INTO orders VALUES (1, 'the app''s own')"))
            await conn.execute(insert(RunRow.__table__), [_run("earlier-1"), _done("earlier-2")])
            await conn.execute(insert(StepRow.__table__), [_research_step("earlier-1")])
            await conn.execute(
                insert(EventRow.__table__),
                [
                    _event("earlier-1", 1, "run_started"),
                    _event("earlier-1", 2, "step_completed", "research"),
                    _event("earlier-1", 3, "run_interrupted"),
                    _event("earlier-2", 1, "run_started"),
                    _event("earlier-2", 2, "run_completed"),
                ],
            )
    finally:
        await engine.dispose()


def _run(run_id: str) -> dict[str, Any]:
    data = encode("tides")
    return dict(
        run_id=run_id,
        pipeline="earlier",
        status="failed_retryable",
        input=data,
        input_hash=sha256_hex(data),
        output=None,
        error={"type": "builtins.RuntimeError", "message": "the writer timed out"},
        attempts=1,
        lease_token=1,
        event_seq=3,
        state_version=0,
        priority=0,
        created_at=NOW,
        updated_at=NOW,
    )


def _done(run_id: str) -> dict[str, Any]:
    return {
        **_run(run_id),
        "status": "completed",
        "output": "POST 2",
        "error": None,
        "event_seq": 2,
    }


def _research_step(run_id: str) -> dict[str, Any]:
    return dict(
        run_id=run_id,
        name="research",
        status="completed",
        input_hash=sha256_hex({"topic": "tides"}),
        output=encode("notes on tides"),
        idempotency_key=derive_idempotency_key(run_id, "research"),
        keyed=False,
        replay="auto",
        attempts=1,
        lease_token=1,
        started_at=NOW,
        completed_at=NOW,
        duration_ms=1.0,
    )


def _event(run_id: str, seq: int, kind: str, step: str | None = None) -> dict[str, Any]:
    return dict(run_id=run_id, seq=seq, kind=kind, step=step, data=None, created_at=NOW)


async def tables_in(url: str, schema: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_an_earlier_installation_moves_in_with_its_runs_and_they_go_on(
    empty_url: str,
) -> None:
    """PostgreSQL: `migrate` moves the first release's tables (with rows, indexes, sequences,
    the version table) from public into the tidebase schema; the app's table stays. SQLite:
    the file migrates itself on first use. Either way the recorded run resumes from its
    checkpoint and the completed one returns its result."""
    await install_earlier_release(empty_url)
    postgres = empty_url.startswith("postgres")
    tide = Tidebase(empty_url)
    calls: list[str] = []

    async def body(run: Run, topic: str) -> str:
        def research() -> str:
            calls.append("research")
            return f"notes on {topic}"

        notes = await run.step("research", research, input={"topic": topic})
        calls.append("write")
        return await run.step("write", lambda: f"POST {notes}", input={"notes": notes})

    try:
        if postgres:
            with pytest.raises(SchemaNotMigrated, match=f"earlier release \\(at {BEFORE}\\)"):
                await tide.get_run("earlier-1")
            assert await tide.migrate() == (None, SCHEMA_REVISION)  # nothing in the new place
            assert await tables_in(empty_url, "tidebase") == {*TABLE_NAMES, VERSION_TABLE}
            assert await tables_in(empty_url, "public") == {"orders"}
        assert (await tide.get_run("earlier-2")).output == "POST 2"
        assert await tide.run("earlier", body, run_id="earlier-2", input="tides") == "POST 2"
        assert calls == []
        result = await tide.run("earlier", body, run_id="earlier-1", input="tides")
        assert result == "POST notes on tides"
        assert calls == ["write"]  # research replayed from the earlier release's checkpoint
        steps = {s.name: s for s in await tide.steps("earlier-1")}
        assert (steps["research"].input, steps["write"].input) == (
            None,
            {"notes": "notes on tides"},
        )
        kinds = await assert_gap_free(tide.store, "earlier-1")
        assert kinds[:3] == ["run_started", "step_completed", "run_interrupted"]
        assert kinds[3:] == ["run_resumed", "step_completed", "run_completed"]
        # A new run gets a step id from the moved sequence.
        assert await tide.run("earlier", body, run_id="later-1", input="tides") == result
    finally:
        await tide.close()
    engine = create_async_engine(async_url(empty_url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, note FROM orders"))).all()
        assert [tuple(r) for r in rows] == [(1, "the app's own")]
    finally:
        await engine.dispose()


async def run_once(tide: Tidebase, run_id: str) -> str:
    async def body(run: Run, inp: None) -> str:
        return await run.step("s", lambda: tide.schema)

    return await tide.run("per-schema", body, run_id=run_id)


@pytest.mark.postgres
async def test_two_schemas_in_one_database_keep_apart(pg_url: str) -> None:
    default, team = Tidebase(pg_url), Tidebase(pg_url, schema="team_b")
    try:
        with pytest.raises(SchemaNotMigrated, match="schema team_b"):
            await run_once(team, "r")
        await team.migrate()
        assert await tables_in(pg_url, "team_b") == {*TABLE_NAMES, VERSION_TABLE}
        assert await run_once(default, "r") == "tidebase"
        assert await run_once(team, "r") == "team_b"  # the same run id, another run
        assert [r.run_id for r in await team.list_runs()] == ["r"]
        assert (await default.steps("r"))[0].output == "tidebase"
        assert (await team.steps("r"))[0].output == "team_b"
        # Enqueues wake the workers of their own schema only.
        woken: list[tuple[str, str]] = []
        listeners = [
            await tide.store.listen(lambda queue, who=who: woken.append((who, queue)))
            for who, tide in (("default", default), ("team", team))
        ]
        try:
            await team._enqueue("per-schema", None, None, queue="q-team")
            await default._enqueue("per-schema", None, None, queue="q-default")
            await wait_for(lambda: len(woken) >= 2, "both enqueues to wake their workers")
            for listener in listeners:
                assert listener is not None
                await listener.ping(timeout=10)  # a stray notification would be in by now
            await asyncio.sleep(0.1)
            assert sorted(woken) == [("default", "q-default"), ("team", "q-team")]
        finally:
            for listener in listeners:
                if listener is not None:
                    listener.close()
    finally:
        await default.close()
        await team.close()


@pytest.mark.postgres
async def test_migration_sql_is_printed_not_applied_and_applies_as_printed(
    empty_pg_url: str, pg_url: str
) -> None:
    tide = Tidebase(empty_pg_url)
    try:
        sql = await tide.migration_sql()
    finally:
        await tide.close()
    for needle in (
        'CREATE SCHEMA IF NOT EXISTS "tidebase"',
        'SET LOCAL search_path TO "tidebase", "public"',
        "CREATE TABLE tidebase_runs",
        f"CREATE TABLE {VERSION_TABLE}",
        "ALTER TABLE tidebase.tidebase_steps ADD COLUMN input JSONB",
        f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('0001_initial')",
    ):
        assert needle in sql, needle
    assert await tables_in(empty_pg_url, "tidebase") == set()  # nothing was applied

    conn = await asyncpg.connect(empty_pg_url)
    try:
        await conn.execute(sql)  # what a DBA would run
    finally:
        await conn.close()
    tide = Tidebase(empty_pg_url)
    try:
        assert await tide.store.schema_revision() == SCHEMA_REVISION
        assert await run_once(tide, "applied") == "tidebase"
        assert await tide.migration_sql() == (
            f"-- the database is at {SCHEMA_REVISION}: nothing to migrate\n"
        )
    finally:
        await tide.close()


@pytest.mark.postgres
async def test_migration_sql_of_an_earlier_installation_starts_at_its_revision(
    empty_pg_url: str,
) -> None:
    await install_earlier_release(empty_pg_url)
    tide = Tidebase(empty_pg_url)
    try:
        sql = await tide.migration_sql()
        assert f"Running upgrade {BEFORE} -> " in sql and f" -> {SCHEMA_REVISION}\n" in sql
        # Its tables are moved, not created anew (later revisions add tables of their own).
        assert "CREATE TABLE tidebase_runs" not in sql and "SET SCHEMA" in sql
        conn = await asyncpg.connect(empty_pg_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        assert await tables_in(empty_pg_url, "public") == {"orders"}
        assert (await tide.get_run("earlier-2")).output == "POST 2"
    finally:
        await tide.close()


@pytest.mark.postgres
async def test_an_application_psycopg_engine_lends_its_url_and_is_left_alone(pg_url: str) -> None:
    rest = pg_url.split("://", 1)[1]
    app_engine = create_async_engine(f"postgresql+psycopg://{rest}")
    try:
        tide = Tidebase(engine=app_engine)
        assert await run_once(tide, "via-engine") == "tidebase"
        await tide.close()
        assert app_engine.pool.checkedout() == 0  # the library never borrowed its connections
        async with app_engine.connect() as conn:  # and never disposed of it
            count = await conn.scalar(text("SELECT count(*) FROM tidebase.tidebase_runs"))
        assert count == 1
        for spelling in ("postgresql+psycopg", "postgresql+psycopg2"):
            other = Tidebase(f"{spelling}://{rest}")
            try:
                assert (await other.get_run("via-engine")).status == "completed"
            finally:
                await other.close()
    finally:
        await app_engine.dispose()
