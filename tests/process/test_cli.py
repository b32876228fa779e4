"""The ``tidebase-agents`` CLI (P2), run as the installed console script against PostgreSQL.

Runs are prepared in this process through the library; each command then runs as a real
subprocess and its output (table and ``--json``) and exit code are checked. Independent
commands run at once to keep the suite quick.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from wk_support import (
    CLI,
    child_env,
    cli,
    cli_many,
    enqueue,
    start_worker,
    stop_process,
    wait_for,
)

from tidebase_agents import Run, Tidebase, checkpointed_pipeline, current_run
from tidebase_agents._cli import app
from tidebase_agents._hashing import sha256_hex
from tidebase_agents._store import close_stores, get_store
from tidebase_agents._store.tables import SCHEMA_REVISION

pytestmark = pytest.mark.postgres


@pytest.fixture
async def tide(pg_url: str) -> AsyncIterator[Tidebase]:
    yield Tidebase(pg_url)
    await close_stores()


def step_blocks(text: str) -> list[str]:
    """The step entries of `runs show` output, each on one line (wrapping undone)."""
    section = text.split("\n\n")[1]
    blocks = re.split(r"^ *\d+\. ", section, flags=re.M)[1:]
    return [" ".join(block.split()) for block in blocks]


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return str(result.stdout)


def failed(result: Any, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line  # one line, no traceback
    for needle in needles:
        assert needle in line, line


async def report_run(tide: Tidebase) -> None:
    """report-1: `research` executed in attempt 1 and replayed in 2; `write` failed once."""
    writes: list[int] = []

    async def body(run: Run, topic: str) -> str:
        notes = await run.step("research", lambda: f"notes on {topic}")
        await run.usage_record(
            model="gpt-4o-mini", input_tokens=1000, output_tokens=500, cached_tokens=200
        )

        def write() -> str:
            writes.append(run.attempt)
            if len(writes) == 1:
                raise RuntimeError("writer timed out")
            return str(notes).upper()

        return str(await run.step("write", write))

    with pytest.raises(RuntimeError):
        await tide.run("cli-report", body, run_id="report-1", input="tides")
    assert await tide.run("cli-report", body, run_id="report-1", input="tides") == "NOTES ON TIDES"


async def test_migrate_and_database_errors(empty_pg_url: str) -> None:
    unmigrated, bad, unreachable = cli_many(
        [
            ["runs", "list"],
            ["--database-url", "mysql://root@localhost/x", "runs", "list"],
            ["--database-url", "postgresql://postgres@127.0.0.1:1/none", "runs", "show", "r"],
        ],
        url=empty_pg_url,
    )
    failed(unmigrated, 3, "has no tidebase tables", "tidebase-agents migrate")
    failed(bad, 1, "unsupported database")
    failed(unreachable, 4, "cannot reach database")

    # The URL is accepted after the command too, where people tend to type it.
    assert f"empty -> {SCHEMA_REVISION}" in ok(cli("migrate", "--database-url", empty_pg_url))
    assert f"{SCHEMA_REVISION} -> {SCHEMA_REVISION}" in ok(cli("migrate", url=empty_pg_url))
    store = get_store(empty_pg_url)
    try:
        assert await store.schema_revision() == SCHEMA_REVISION
    finally:
        await store.close()


async def test_runs_list_show_and_usage(pg_url: str, tide: Tidebase, tmp_path: Path) -> None:
    await report_run(tide)
    await tide.run("cli-other", _mystery, run_id="other-1", input=None)
    store = tide.store
    queued = await enqueue(store, "cli-report", {}, None, queue="slow", run_id="queued-1")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 1, "output": 2}}))

    since = ["--queue", "slow", "--since", "1h"]
    table, filtered, show, show_json, usage_table, usage_json = cli_many(
        [
            ["runs", "list"],
            ["runs", "list", "--json", "--status", "queued", "--pipeline", "cli-report", *since],
            ["runs", "show", "report-1"],
            ["runs", "show", "report-1", "--json"],
            ["usage"],
            ["usage", "--by", "run,model", "--json", "--prices", str(prices)],
        ],
        url=pg_url,
    )
    text = ok(table)
    assert "3 runs" in text
    for needle in ("report-1", "cli-report", "completed", "queued-1", "slow", "other-1"):
        assert needle in text
    listed = json.loads(ok(filtered))
    assert [(r["run_id"], r["status"], r["queue"]) for r in listed] == [(queued, "queued", "slow")]

    text = ok(show)
    assert re.search(r"^status +completed$", text, re.M), text
    assert re.search(r"^attempts +2$", text, re.M), text
    research, write = step_blocks(text)
    assert "executed in attempt 1; replayed from its checkpoint in attempt 2" in research
    assert "failed in attempt 1 (RuntimeError: writer timed out); executed in attempt 2" in write
    assert "gpt-4o-mini" in text and "total cost: $0.000435" in text
    for kind in ("run_started", "step_failed_retryable", "run_resumed", "run_completed"):
        assert kind in text
    doc = json.loads(ok(show_json))
    assert doc["run"]["status"] == "completed" and doc["run"]["output"] == "NOTES ON TIDES"
    steps = {s["step"]: s for s in doc["steps"]}
    assert (steps["research"]["executed_in_attempt"], steps["research"]["replayed"]) == (1, 1)
    assert (steps["write"]["executed_in_attempt"], steps["write"]["attempts"]) == (2, 2)
    assert doc["cost_usd"] == pytest.approx(0.000435)
    assert [e["seq"] for e in doc["events"]] == list(range(1, len(doc["events"]) + 1))

    text = ok(usage_table)
    assert "cli-report" in text and "0.000435" in text
    assert "mystery-model" in text and "no price for: mystery-model" in text
    rows = {(r["run"], r["model"]): r for r in json.loads(ok(usage_json))}
    report = rows[("report-1", "gpt-4o-mini")]
    assert (report["input_tokens"], report["output_tokens"], report["cached_tokens"]) == (
        1000,
        500,
        200,
    )
    assert report["cost_usd"] == pytest.approx(0.002)  # the overriding price table
    assert rows[("other-1", "mystery-model")]["cost_usd"] is None


async def _mystery(run: Run, _: Any) -> str:
    await run.usage_record(model="mystery-model", input_tokens=10, output_tokens=5)
    return "ok"


async def test_steps_review(pg_url: str, tide: Tidebase) -> None:
    store = tide.store
    await store.open()

    @checkpointed_pipeline("cli-parked", tide=tide)
    async def parked(to: str) -> Any:
        run = current_run()

        def send() -> Any:
            if run.attempt == 1:
                raise RuntimeError("gateway timeout")
            return {"to": to, "attempt": run.attempt}

        return await run.step("send", send, side_effects=["email"])

    queued = await parked.enqueue("q@example.com", run_id="parked-queued")
    (c,) = await store.claim(
        owner="w", lease_seconds=60, queues=["default"], pipelines=["cli-parked"]
    )
    # Each run executes once (the queued one as a worker would) and parks on the failed write.
    with pytest.raises(RuntimeError):
        await parked.run_claimed(queued, owner="w", claim_token=c.token)
    for run_id in ("parked-output", "parked-fail"):
        with pytest.raises(RuntimeError):
            await parked(f"{run_id}@example.com", run_id=run_id)
    for run_id in (queued, "parked-output", "parked-fail"):
        assert (await store.get_run(run_id)).status == "manual_review"

    retry, output, fail = cli_many(
        [
            ["steps", "review", queued, "send", "--retry"],
            ["steps", "review", "parked-output", "send", "--output", '{"to": "x", "id": 7}'],
            ["steps", "review", "parked-fail", "send", "--fail"],
        ],
        url=pg_url,
    )
    assert "step send of run parked-queued: failed_retryable; run: queued" in ok(retry)
    assert "step send of run parked-output: completed; run: failed_retryable" in ok(output)
    assert "step send of run parked-fail: failed; run: failed" in ok(fail)

    # The supplied output is replayed; the retried run goes back to the workers.
    assert await parked.resume("parked-output") == {"to": "x", "id": 7}
    run = await store.get_run(queued)
    assert (run.status, run.scheduled_at is not None) == ("queued", True)
    assert (await store.get_run("parked-fail")).error["message"] == "failed by operator review"


def order_input(n: int) -> tuple[dict[str, Any], str]:
    data = {"args": [n], "kwargs": {}}
    return data, sha256_hex(data)


async def test_runs_resume_and_cancel(calls_table: str, tide: Tidebase) -> None:
    url = calls_table
    store = tide.store
    await store.open()
    in_process = await enqueue(store, "wk-order", *order_input(5), run_id="resume-here")
    # A run interrupted in-process (failed_retryable) that the operator hands to the workers.
    interrupted = "interrupted-1"

    async def boom(run: Run, _: Any) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        await tide.run("cli-interrupted", boom, run_id=interrupted)
    to_cancel = await enqueue(store, "wk-order", *order_input(6), run_id="cancel-me")
    await tide.run("cli-done", _mystery, run_id="done-1")

    resumed, handed, cancelled, done = cli_many(
        [
            ["runs", "resume", in_process, "--app", "wk_app:tide"],
            ["runs", "resume", interrupted, "--enqueue", "--queue", "ops"],
            ["runs", "cancel", to_cancel, "--reason", "customer left"],
            ["runs", "cancel", "done-1"],
        ],
        url=url,
    )
    text = ok(resumed)
    assert f"run {in_process}: completed" in text and '"order 5: 10"' in text
    assert (await store.get_run(in_process)).status == "completed"
    assert f"run {interrupted}: queued" in ok(handed)
    run = await store.get_run(interrupted)
    assert (run.status, run.queue) == ("queued", "ops")
    assert f"run {to_cancel}: cancelled (was queued)" in ok(cancelled)
    events = await store.get_events(to_cancel)
    assert (events[-1].kind, events[-1].data["reason"]) == ("run_cancelled", "customer left")
    failed(done, 1, "already ended (completed)")


async def test_worker_command(calls_table: str, tmp_path: Path) -> None:
    url = calls_table
    log = tmp_path / "worker.log"
    proc = start_worker(url, log, "--concurrency", "2", "--poll-interval", "0.2")
    store = get_store(url)
    try:
        ids = [await enqueue(store, "wk-order", *order_input(n)) for n in range(4)]

        async def done() -> bool:
            return [(await store.get_run(r)).status for r in ids] == ["completed"] * 4

        await wait_for(done, "the worker to run 4 runs", timeout=90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        text = log.read_text()
        assert "pipelines ['wk-order'], queues ['default'], concurrency 2" in text
        assert sum(f"run {r} attempt 1 ended completed" in text for r in ids) == 4
        assert "stopped" in text
    finally:
        stop_process(proc)
        await close_stores()


def test_errors_and_usage_in_process(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Error paths and usage errors, through the same app in this process (no start-up cost)."""
    monkeypatch.delenv("TIDEBASE_DATABASE_URL", raising=False)  # `worker` sets it

    async def prepare() -> None:
        tide = Tidebase(pg_url)
        await tide.run("cli-done", _mystery, run_id="done-1")
        await enqueue(tide.store, "cli-done", None, None, run_id="gone")
        await tide.cancel("gone")
        await tide.close()

    asyncio.run(prepare())
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, ["--database-url", pg_url, *args])

    def check(result: Any, code: int, needle: str) -> None:
        assert result.exit_code == code, (result.exit_code, result.output)
        assert needle in result.stderr, result.stderr
        if code != 2:
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

    check(invoke("runs", "show", "no-such-run"), 1, "no run with id 'no-such-run'")
    check(invoke("runs", "show", "bad id"), 1, "invalid run id 'bad id'")
    check(invoke("runs", "list", "--status", "bogus"), 2, "bogus")
    check(invoke("runs", "list", "--since", "yesterday"), 2, "neither a duration")
    result = invoke("runs", "cancel", "gone")
    assert result.exit_code == 0 and "run gone: already cancelled" in result.stdout
    check(invoke("runs", "resume", "gone", "--enqueue"), 1, "was cancelled")
    check(invoke("runs", "resume", "done-1", "--enqueue"), 1, "has completed")
    check(invoke("runs", "resume", "done-1"), 2, "exactly one of --app")
    check(invoke("steps", "review", "done-1", "send"), 2, "exactly one of --retry")
    check(invoke("steps", "review", "done-1", "send", "--output", "{nope"), 2, "not JSON")
    check(
        invoke("steps", "review", "done-1", "send", "--retry"),
        1,
        "step 'send' of run 'done-1' does not exist",
    )
    check(invoke("usage", "--by", "colour"), 2, "--by takes a comma list")
    check(invoke("usage", "--prices", "/nonexistent.json"), 1, "cannot read price file")
    check(invoke("worker", "--app", "no_such_module:tide"), 1, "cannot import app module")
    check(invoke("worker", "--app", "wk_app:tide", "--concurrency", "0"), 2, "concurrency")


FOLDER_APP = """
from tidebase_agents import checkpointed_pipeline, current_run


@checkpointed_pipeline("folder-app")
async def double(n: int) -> int:
    return await current_run().step("double", lambda: n * 2)
"""


async def test_worker_imports_its_app_from_the_working_directory_or_app_dir(
    pg_url: str, tmp_path: Path
) -> None:
    """`worker --app module` run from the module's folder serves its pipelines (the working
    directory is on the import path, as with uvicorn and celery), so does `--app-dir DIR`
    from anywhere else; worker options come from TIDEBASE_WORKER_* when not given."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "folder_app.py").write_text(FOLDER_APP)
    store = get_store(pg_url)
    env = child_env(TIDEBASE_WORKER_CONCURRENCY="3", TIDEBASE_WORKER_POLL_INTERVAL="0.2")
    base = [*CLI, "--database-url", pg_url, "worker", "--app", "folder_app"]
    try:
        missing = subprocess.run(base, cwd=elsewhere, env=env, capture_output=True, text=True)
        assert missing.returncode == 1
        assert missing.stderr.startswith("error: cannot import app module 'folder_app'")
        assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
        for n, (cwd, extra) in enumerate([(project, []), (elsewhere, ["--app-dir", str(project)])]):
            log = tmp_path / f"worker-{n}.log"
            with log.open("wb") as fh:
                proc = subprocess.Popen(
                    [*base, *extra], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
                )
            try:
                data = {"args": [n + 1], "kwargs": {}}
                run_id = await enqueue(store, "folder-app", data, sha256_hex(data))

                async def done(run_id: str = run_id) -> bool:
                    return (await store.get_run(run_id)).status == "completed"

                await wait_for(done, f"the worker started from {cwd.name} to run {run_id}")
                assert (await store.get_run(run_id)).output == 2 * (n + 1)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
                text = log.read_text()
                assert "pipelines ['folder-app'], queues ['default'], concurrency 3" in text
            finally:
                stop_process(proc)
    finally:
        await close_stores()
