"""`tidebase-agents runs prune` on SQLite and PostgreSQL, run in this process as the console
script runs: what it prints (and --json), --dry-run, the filters, that `usage` totals read the
same afterwards, and bad input as a usage error without a traceback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

from harness import library_engine
from sqlalchemy import update
from typer.testing import CliRunner

from tidebase_agents import Run, Tidebase
from tidebase_agents._cli import app
from tidebase_agents._store import close_stores
from tidebase_agents._store.tables import RunRow

LONG_AGO = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def invoke(url: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--database-url", url, *args], env={"COLUMNS": "120"})


def ok(result: Any) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return str(result.stdout)


def usage_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


def three_old_runs(url: str) -> None:
    """Runs a1, a2 of pipeline `a` and b1 of `b`, each with usage, ended long ago; b1 failed."""

    async def spend(run: Run, n: int) -> int:
        await run.usage_record(model="gpt-4o-mini", input_tokens=1000 * n, output_tokens=n)
        return n

    async def main() -> None:
        tide = Tidebase(url)
        try:
            for run_id, pipeline, n in (("a1", "a", 1), ("a2", "a", 2), ("b1", "b", 3)):
                await tide.run(pipeline, spend, run_id=run_id, input=n)
            await tide.run("a", spend, run_id="fresh", input=4)
        finally:
            await close_stores()
        engine = library_engine(url)
        try:
            async with engine.begin() as conn:
                old = RunRow.run_id.in_(["a1", "a2", "b1"])
                await conn.execute(update(RunRow).where(old).values(finished_at=LONG_AGO))
                failed = RunRow.run_id == "b1"
                await conn.execute(update(RunRow).where(failed).values(status="failed"))
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_runs_prune_prints_what_it_deleted_and_usage_reads_the_same(db_url: str) -> None:
    three_old_runs(db_url)
    usage_before = ok(invoke(db_url, "usage", "--json"))

    out = ok(invoke(db_url, "runs", "prune", "--older-than", "30d", "--dry-run"))
    assert out.startswith("would prune 3 runs (completed, failed, cancelled) that ended before ")
    out = ok(invoke(db_url, "runs", "prune", "--older-than", "30d", "--status", "failed"))
    assert out.startswith("pruned 1 run (failed) that ended before ")
    out = ok(invoke(db_url, "runs", "prune", "--older-than", "30d", "--pipeline", "a", "--json"))
    report = json.loads(out)
    assert {k: report[k] for k in ("runs", "dry_run", "statuses")} == {
        "runs": 2,
        "dry_run": False,
        "statuses": ["completed", "failed", "cancelled"],
    }
    assert dt.datetime.fromisoformat(report["ended_before"]) < dt.datetime.now(dt.timezone.utc)

    runs = json.loads(ok(invoke(db_url, "runs", "list", "--json")))
    assert [r["run_id"] for r in runs] == ["fresh"]
    assert ok(invoke(db_url, "usage", "--json")) == usage_before


def test_runs_prune_refuses_bad_input_as_a_usage_error(db_url: str) -> None:
    three_old_runs(db_url)
    usage_error(
        invoke(db_url, "runs", "prune", "--older-than", "banana"),
        "--older-than",
        "'banana' is neither a duration",
    )
    usage_error(invoke(db_url, "runs", "prune"), "--older-than")
    for status in ("running", "queued", "manual_review", "waiting", "nonsense"):
        usage_error(
            invoke(db_url, "runs", "prune", "--older-than", "1d", "--status", status),
            "--status",
            f"{status!r} cannot be pruned",
        )
    runs = json.loads(ok(invoke(db_url, "runs", "list", "--json")))
    assert len(runs) == 4  # nothing was deleted
