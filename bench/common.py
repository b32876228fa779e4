"""Helpers shared by the orchestrator and the configuration processes (no SDK imports here)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

RESULT_PREFIX = "@@BENCH "
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/tidebase_bench"
PG_URL_ENV = "TIDEBASE_BENCH_PG_URL"
# Databases this harness must never create, drop or write to.
PROTECTED_DATABASES = frozenset({"postgres", "test", "root", "template0", "template1"})
# Only databases whose name starts with this prefix are dropped and recreated for a fresh run.
RECREATABLE_PREFIX = "tidebase_bench"


def emit(payload: dict[str, Any]) -> None:
    """Report one JSON result line to the orchestrator (stdout, flushed at once)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_results(stdout: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(RESULT_PREFIX) :])
        for line in stdout.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]


def pg_url() -> str:
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def asyncpg_dsn(url: str) -> str:
    """asyncpg accepts only ``postgresql://`` / ``postgres://`` (no ``+driver`` suffix)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def payload_1kb(i: int) -> dict[str, Any]:
    """A ~1 KB JSON document (step outputs and floor inserts use the same shape)."""
    return {"i": i, "kind": "bench", "text": "x" * 960}


async def ensure_database(url: str, *, fresh: bool) -> str:
    """Create the database named in ``url`` if missing (``fresh``: drop and recreate it first).

    Connects to the server's ``postgres`` database only to issue CREATE/DROP DATABASE. Refuses
    protected names, and only ever drops databases whose name starts with ``tidebase_bench``.
    Returns what was done.
    """
    import asyncpg

    name = database_name(url)
    if not name or name in PROTECTED_DATABASES:
        raise ValueError(f"refusing to use database {name!r} for benchmarks")
    quoted = '"' + name.replace('"', '""') + '"'
    admin = await asyncpg.connect(asyncpg_dsn(with_database(url, "postgres")))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and fresh and name.startswith(RECREATABLE_PREFIX):
            await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {quoted}")
            return "recreated"
        if not exists:
            await admin.execute(f"CREATE DATABASE {quoted}")
            return "created"
        return "reused"
    finally:
        await admin.close()


async def server_version(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


@dataclass
class Timing:
    """Iterations actually run, their total wall time and the process's CPU time over them
    (every thread of the client process: driver threads and in-process SQLite included)."""

    n: int
    total_s: float
    cpu_s: float = 0.0

    @property
    def mean_us(self) -> float:
        return self.total_s / self.n * 1e6 if self.n else float("nan")

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.n * 1e6 if self.n else float("nan")


async def timed_loop(
    fn: Callable[[], Awaitable[object]],
    *,
    n: int,
    warmup: int,
    budget_s: float,
    min_n: int = 10,
) -> Timing:
    """Run ``fn`` sequentially ``warmup`` times untimed, then up to ``n`` times timed.

    Stops early (after at least ``min_n`` timed runs) once ``budget_s`` seconds have passed, so a
    slow configuration cannot push a full run past its time limit.
    """
    for _ in range(warmup):
        await fn()
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while done < n:
        await fn()
        done += 1
        if done >= min_n and time.perf_counter() - start > budget_s:
            break
    return Timing(done, time.perf_counter() - start, time.process_time() - cpu)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def quartiles(values: list[float]) -> tuple[float, float] | None:
    """(p25, p75) of ``values`` (the values themselves when fewer than 4)."""
    if not values:
        return None
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]
