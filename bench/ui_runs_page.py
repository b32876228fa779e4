"""How fast the run inspector's runs page answers over 100,000 runs on PostgreSQL.

    python -m bench.ui_runs_page                 # 100,000 runs, 30 timed requests per case
    python -m bench.ui_runs_page --runs 20000 --requests 10

Creates the database ``tidebase_bench_ui`` on ``$TIDEBASE_BENCH_PG_URL``'s server (dropped and
recreated each time; only ``tidebase_bench*`` databases are ever dropped), migrates it, and
bulk-inserts valid runs: the statuses, pipelines and queues a busy deployment has, created over 30
days, with the fields each status implies (finished runs have an end and an output or error,
running ones a lease, queued ones a schedule) and two usage records per finished run, so the
page's per-run cost read has work to do. Then it serves the inspector with the real command
(``tidebase-agents ui``, its own process) and times GET requests of the runs page, first and deep
pages, with and without status filters, printing the median and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import PROTECTED_DATABASES, RECREATABLE_PREFIX, asyncpg_dsn, pg_url, with_database

DATABASE = "tidebase_bench_ui"
TARGET_MS = 300
STATUSES = [  # (status, share of runs)
    ("completed", 0.80),
    ("failed", 0.08),
    ("failed_retryable", 0.04),
    ("cancelled", 0.03),
    ("manual_review", 0.02),
    ("running", 0.02),
    ("queued", 0.01),
]
PIPELINES = [f"pipeline-{name}" for name in ("research", "triage", "digest", "support", "etl")]
QUEUES = [None, None, None, "default", "mail"]
MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"]

RUN_COLUMNS = [
    "run_id", "pipeline", "status", "input", "input_hash", "output", "error", "attempts",
    "lease_owner", "lease_token", "lease_expires_at", "event_seq", "state_version", "queue",
    "dedupe_key", "priority", "scheduled_at", "max_attempts", "deadline", "created_at",
    "updated_at", "finished_at",
]  # fmt: skip
USAGE_COLUMNS = [
    "run_id", "dedupe_key", "step", "kind", "provider", "model", "requests", "input_tokens",
    "output_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_usd",
    "created_at",
]  # fmt: skip


def _rows(n: int, now: dt.datetime, rnd: random.Random) -> tuple[list[tuple[Any, ...]], list[Any]]:
    statuses = rnd.choices([s for s, _ in STATUSES], [w for _, w in STATUSES], k=n)
    runs, usage = [], []
    for i, status in enumerate(statuses):
        run_id = f"run-{i:07d}-{rnd.getrandbits(32):08x}"
        created = now - dt.timedelta(seconds=rnd.uniform(0, 30 * 86400))
        args = {"args": [f"topic {i}"], "kwargs": {}}
        input_hash = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
        attempts = 1 if rnd.random() < 0.9 else rnd.randint(2, 4)
        queue = rnd.choice(QUEUES)
        ended = status in ("completed", "failed", "cancelled")
        took = dt.timedelta(seconds=rnd.uniform(0.5, 90))
        finished = created + took if ended else None
        output = json.dumps(f"result {i}") if status == "completed" else None
        error = (
            json.dumps({"type": "builtins.RuntimeError", "message": f"step {i % 7} failed"})
            if status in ("failed", "failed_retryable", "manual_review")
            else None
        )
        running = status == "running"
        runs.append(
            (
                run_id,
                rnd.choice(PIPELINES),
                status,
                json.dumps(args),
                input_hash,
                output,
                error,
                0 if status == "queued" else attempts,
                f"host:{1000 + i % 50}:abcdef" if running else None,
                0 if status == "queued" else attempts,
                created + dt.timedelta(seconds=30) if running else None,
                1 if status == "queued" else 6 * attempts,
                0,
                queue if status != "queued" else (queue or "default"),
                None,
                0,
                created if (queue or status == "queued") else None,
                5 if (queue or status == "queued") else None,
                None,
                created,
                finished or created + took,
                finished,
            )
        )
        if status == "completed":
            for k, model in enumerate(rnd.sample(MODELS, 2), 1):
                tokens_in, tokens_out = rnd.randint(200, 20000), rnd.randint(50, 4000)
                usage.append(
                    (
                        run_id, f"agent:worker#{k}/model#1", f"agent:worker#{k}", "llm", None,
                        model, 1, tokens_in, tokens_out, 0, 0, tokens_in + tokens_out, None,
                        created + took,
                    )
                )  # fmt: skip
    return runs, usage


async def _prepare(server_url: str, n: int) -> str:
    url = with_database(server_url, DATABASE)
    assert DATABASE.startswith(RECREATABLE_PREFIX) and DATABASE not in PROTECTED_DATABASES
    # Connected to the server's maintenance database, which is only read.
    admin = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    from tidebase_agents import Tidebase

    tide = Tidebase(url)
    await tide.migrate()
    await tide.close()
    t0 = time.perf_counter()
    runs, usage = _rows(n, dt.datetime.now(dt.timezone.utc), random.Random(7))
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.copy_records_to_table("tidebase_runs", records=runs, columns=RUN_COLUMNS)
        await conn.copy_records_to_table("tidebase_usage", records=usage, columns=USAGE_COLUMNS)
        for table in ("tidebase_runs", "tidebase_usage"):
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    print(
        f"seeded {len(runs):,} runs and {len(usage):,} usage records "
        f"in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return url


async def _cursor(url: str, offset: int, status: str | None = None) -> str:
    """The page cursor after ``offset`` runs (of ``status``), newest first, as the page writes it."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        where = "WHERE status = $2" if status else ""
        row = await conn.fetchrow(
            f"SELECT created_at, run_id FROM tidebase_runs {where} "
            f"ORDER BY created_at DESC, run_id DESC OFFSET $1 LIMIT 1",
            offset,
            *([status] if status else []),
        )
    finally:
        await conn.close()
    assert row is not None, f"fewer than {offset} runs"
    return f"{row['created_at'].isoformat()}|{row['run_id']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read().decode()
        assert response.status == 200, response.status
    return (time.perf_counter() - t0) * 1000, body


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "tidebase-agents"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tidebase_agents._cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per case")
    options = parser.parse_args()

    url = asyncio.run(_prepare(pg_url(), options.runs))
    deep = int(options.runs * 0.9)
    cases = {
        "first page": "",
        f"deep page (after {deep:,} runs)": "before=" + asyncio.run(_cursor(url, deep)),
        "first page, status=failed": "status=failed",
    }
    failed = int(options.runs * 0.08 * 0.9)
    cases[f"deep page, status=failed (after {failed:,})"] = "status=failed&before=" + asyncio.run(
        _cursor(url, failed, "failed")
    )
    cases["first page, status=running&status=queued"] = "status=running&status=queued"
    cases["first page, pipeline and since=7d"] = "pipeline=pipeline-triage&since=7d"

    port = _free_port()
    env = {**os.environ, "TIDEBASE_DATABASE_URL": url}
    server = subprocess.Popen([*_cli(), "ui", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}/runs"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(base)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the inspector did not start") from None
                time.sleep(0.2)
        print(f"\n{'case':<48} {'rows':>5} {'median ms':>10} {'p95 ms':>8}")
        worst = 0.0
        for name, query in cases.items():
            target = base + ("?" + urllib.parse.quote(query, safe="=&") if query else "")
            for _ in range(3):  # warm-up
                _get(target)
            times = []
            for _ in range(options.requests):
                ms, body = _get(target)
                times.append(ms)
            rows = body.count('<tr class="run"')
            p95 = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
            worst = max(worst, p95)
            print(f"{name:<48} {rows:>5} {statistics.median(times):>10.1f} {p95:>8.1f}")
        verdict = "within" if worst < TARGET_MS else "OVER"
        print(f"\nworst p95 {worst:.1f} ms: {verdict} the {TARGET_MS} ms target")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
