"""``tidebase-agents runs fork`` and ``steps reset`` (P5) against embedded SQLite and
PostgreSQL: their output, their JSON, and one-line errors with exit code 1; the refusal of a
run that executes, with the console script in a process of its own.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner
from wk_support import cli_many

from tidebase_agents import Run, RunStatus, Tidebase
from tidebase_agents._cli import app


@pytest.fixture
async def tide(db_url: str) -> AsyncIterator[Tidebase]:
    t = Tidebase(db_url)
    yield t
    await t.close()


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return str(result.stdout)


def failed(result: Any, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line  # one line, no traceback
    for needle in needles:
        assert needle in line, line


calls: collections.Counter[str] = collections.Counter()


async def body(run: Run, topic: str) -> str:
    out = topic
    for name in ("a", "b", "c"):

        def call(name: str = name, value: str = out) -> str:
            calls[name] += 1
            return f"{value}>{name}"

        out = await run.step(name, call)
    return out


def test_runs_fork_and_steps_reset(db_url: str) -> None:
    """Output, JSON and errors, through the app in this process (no start-up cost)."""
    calls.clear()

    def run(run_id: str) -> str:
        async def go() -> str:
            tide = Tidebase(db_url)
            try:
                return await tide.run("cli-fork", body, run_id=run_id, input="t")
            finally:
                await tide.close()

        return asyncio.run(go())

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(app, ["--database-url", db_url, *args])

    def refused(result: Any, *needles: str) -> None:
        assert result.exit_code == 1, (result.exit_code, result.output)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        for needle in needles:
            assert needle in result.stderr, result.stderr

    run("c1")
    forked = invoke("runs", "fork", "c1", "--from", "b", "--run-id", "c1-f")
    assert forked.exit_code == 0, forked.output
    assert "run c1-f: forked from c1 at step b (1 checkpoint copied); failed_retryable" in (
        forked.stdout
    )
    assert "tidebase-agents runs resume c1-f" in forked.stdout
    copy = json.loads(invoke("runs", "fork", "c1", "--json").stdout)
    assert copy["forked"]["from_run"] == "c1" and copy["forked"]["steps_copied"] == 3
    assert copy["run"]["status"] == RunStatus.FAILED_RETRYABLE
    assert run("c1-f") == "t>a>b>c"
    assert calls == {"a": 1, "b": 2, "c": 2}
    shown = " ".join(invoke("runs", "show", "c1-f").stdout.split())
    assert "forked from c1 at step b" in shown
    assert re.search(r"1\. a completed, 1 try, [^;]*; copied from run c1 when it was forked", shown)
    assert re.search(r"2\. b completed, 1 try, [^;]*; executed in attempt 1", shown)

    reset = invoke("steps", "reset", "c1", "b")
    assert reset.exit_code == 0, reset.output
    assert "run c1: 2 checkpoints discarded from step b on" in reset.stdout
    assert "run: failed_retryable" in reset.stdout
    assert run("c1") == "t>a>b>c"
    assert calls == {"a": 1, "b": 3, "c": 3}
    as_json = json.loads(invoke("steps", "reset", "c1", "c", "--json").stdout)
    assert (as_json["discarded"], as_json["status"]) == (["c"], "failed_retryable")

    refused(invoke("steps", "reset", "nope", "a"), "no run with id 'nope'")
    refused(invoke("runs", "fork", "nope"), "no run with id 'nope'")
    refused(
        invoke("steps", "reset", "c1", "zzz"), "run 'c1' has no recorded step 'zzz'", "runs show c1"
    )
    refused(invoke("runs", "fork", "c1", "--from", "zzz"), "has no recorded step 'zzz'")
    refused(invoke("runs", "fork", "c1", "--run-id", "c1-f"), "run id 'c1-f' exists")
    refused(invoke("runs", "fork", "c1", "--run-id", "bad id"), "invalid run id 'bad id'")


async def test_both_are_refused_on_a_run_that_executes(db_url: str, tide: Tidebase) -> None:
    inside, release = asyncio.Event(), asyncio.Event()

    async def held(run: Run, _: None) -> str:
        await run.step("first", lambda: 1)

        async def wait() -> int:
            inside.set()
            await release.wait()
            return 2

        await run.step("second", wait)
        return "done"

    task = asyncio.create_task(tide.run("cli-held", held, run_id="live"))
    await asyncio.wait_for(inside.wait(), 30)
    reset, fork = await asyncio.to_thread(
        cli_many, [["steps", "reset", "live", "first"], ["runs", "fork", "live"]], url=db_url
    )
    release.set()
    assert await task == "done"
    failed(reset, "run 'live' is being executed", "lease is live until")
    failed(fork, "run 'live' is being executed")
    assert [s.name for s in await tide.steps("live")] == ["first", "second"]


def test_steps_reset_hands_a_queued_run_back_to_its_workers(db_url: str) -> None:
    from tidebase_agents import checkpointed_pipeline, current_run
    from tidebase_agents._store import get_store

    async def finish_one() -> str:
        tide = Tidebase(db_url)

        @checkpointed_pipeline("cli-queued-reset", tide=tide)
        async def queued(x: int) -> int:
            return int(await current_run().step("double", lambda: x * 2))

        try:
            run_id = await queued.enqueue_with(queue="slow")(4)
            (claim,) = await get_store(db_url).claim(
                owner="w", lease_seconds=30, queues=["slow"], pipelines=["cli-queued-reset"]
            )
            assert await queued.run_claimed(run_id, owner="w", claim_token=claim.token) == 8
            return run_id
        finally:
            await tide.close()

    async def status(run_id: str) -> RunStatus:
        tide = Tidebase(db_url)
        try:
            return (await tide.get_run(run_id)).status
        finally:
            await tide.close()

    def reset(run_id: str, *extra: str) -> str:
        result = CliRunner().invoke(
            app, ["--database-url", db_url, "steps", "reset", run_id, "double", *extra]
        )
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    kept, handed = asyncio.run(finish_one()), asyncio.run(finish_one())
    assert "run: failed_retryable" in reset(kept, "--no-enqueue")
    assert "run: queued" in reset(handed)
    assert asyncio.run(status(kept)) == RunStatus.FAILED_RETRYABLE
    assert asyncio.run(status(handed)) == RunStatus.QUEUED
