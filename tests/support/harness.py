"""Test harness helpers: the PostgreSQL admin connection and real child processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get(
    "TIDEBASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = os.environ.get("TIDEBASE_TEST_REQUIRE_PG") == "1"
SUPPORT_DIR = Path(__file__).parent


def pg_url_of(database: str) -> str:
    """The URL of ``database`` on the admin URL's server."""
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


async def _pg_admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL.replace("postgresql+asyncpg", "postgresql"))
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def pg_admin(*statements: str) -> None:
    """Run statements on the admin database (CREATE / DROP DATABASE)."""
    asyncio.run(_pg_admin(*statements))


def fresh_pg_database(template: str) -> str:
    """A new database cloned from ``template``; returns its name."""
    name = f"tidebase_t_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def run_child(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` in a fresh interpreter (a real child process) and wait for it."""
    full_env = {**os.environ, "PYTHONPATH": str(SUPPORT_DIR), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def library_engine(url: str) -> Any:
    """An engine that finds the library's tables where the library keeps them (on
    PostgreSQL, its own schema), for tests that arrange rows by hand."""
    from sqlalchemy.ext.asyncio import create_async_engine

    if url.startswith("postgresql://"):
        engine = create_async_engine("postgresql+asyncpg://" + url[len("postgresql://") :])
        return engine.execution_options(schema_translate_map={None: "tidebase"})
    return create_async_engine(url.replace("sqlite:///", "sqlite+aiosqlite:///", 1))
