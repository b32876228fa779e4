"""Recovery that needs no one (P3, P4): a run whose executor was SIGKILLed resumes at once when
re-invoked, without waiting out its lease; a live executor still locks its run; on PostgreSQL
a holder on another machine is found dead through its database session; a holder declared dead
that still runs has its writes refused; workers finish the direct-call runs of a killed process.

Every lease here is 60 s, so nothing can pass by waiting for a lease to expire. Children are
real processes (``recovery_app``); ``TIDEBASE_HOST_ID`` makes a child another machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import recovery_app
from recovery_app import lines

from tidebase_agents import RunLocked, Tidebase
from tidebase_agents._store import close_stores
from tidebase_agents._worker import Worker, WorkerOptions

pytestmark = pytest.mark.crash

TESTS_DIR = Path(__file__).parent.parent / "support"
CODE = "import recovery_app, sys; recovery_app.main(sys.argv[1:])"


class Child:
    """A ``recovery_app`` scenario in a child process; output kept in temporary files."""

    def __init__(self, url: str, scenario: str, host: str | None = None, **kwargs: Any) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(TESTS_DIR),
            "TIDEBASE_DATABASE_URL": url,
            "OPENAI_AGENTS_DISABLE_TRACING": "1",
        }
        env.pop("TIDEBASE_HOST_ID", None)
        if host is not None:
            env["TIDEBASE_HOST_ID"] = host
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (read after the child exits)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-c", CODE, scenario, json.dumps(kwargs)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    async def report(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"child did not exit in {timeout} s:\n{self.stderr()}")
            await asyncio.sleep(0.02)
        self._out.seek(0)
        out = [ln for ln in self._out.read().decode().splitlines() if ln.startswith("{")]
        assert out, f"child printed no report (rc={self.popen.returncode}):\n{self.stderr()}"
        return json.loads(out[-1])  # type: ignore[no-any-return]

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            if child.popen.poll() is None:
                child.kill()


async def wait_files(child: Child, *paths: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if child.popen.poll() is not None:
            raise AssertionError(f"child exited before {paths}:\n{child.stderr()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{paths} did not appear")
        await asyncio.sleep(0.02)


@pytest.fixture
async def tide(db_url: str) -> AsyncIterator[Tidebase]:
    t = Tidebase(db_url)
    yield t
    await close_stores()


def plan(tmp_path: Path, hang: dict[str, list[str]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"log": str(tmp_path / "log"), "markers": str(tmp_path), "hang": hang or {}, **extra}


async def takeovers(tide: Tidebase, run_id: str) -> list[dict[str, Any]]:
    return [e.data for e in await tide.events(run_id) if e.kind == "lease_taken_over"]


async def test_a_killed_pipeline_resumes_at_once_in_a_fresh_process(
    db_url: str, tide: Tidebase, tmp_path: Path
) -> None:
    """P3: SIGKILL a process inside the keyed external write of its run; a fresh process
    re-invoking the run id at once (the 60 s lease still live) takes it over as the holder's
    process is gone: think replays, charge re-executes with its key (R5), notify runs once."""
    hang = plan(tmp_path, {"rc-1": ["charge"]})
    with children() as started:
        first = Child(db_url, "orders", ns=[1], plan=hang)
        started.append(first)
        await wait_files(first, tmp_path / "charge-rc-1")
        first.kill()
        run = await tide.get_run("rc-1")
        assert run.status == "running" and run.lease_expires_at is not None
        again = Child(db_url, "orders", ns=[1], plan=plan(tmp_path))
        started.append(again)
        report = await again.report()
    assert report["outcome"] == "ok" and report["result"] == ["order 1: 2"], again.stderr()
    log = lines(tmp_path / "log")
    assert log.count("think rc-1") == 1, "a finished step ran again"
    charges = [ln for ln in log if ln.startswith("charge rc-1")]
    assert len(charges) == 2 and len(set(charges)) == 1, "re-executed with another key"
    assert log.count("notify rc-1") == 1
    (taken,) = await takeovers(tide, "rc-1")
    assert taken["holder_dead"] == "process"
    run = await tide.get_run("rc-1")
    assert run.status == "completed" and run.attempts == 2


async def test_a_live_run_is_still_locked_and_says_until_when(
    db_url: str, tide: Tidebase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P3, R6: while its executor lives, a second invocation gets RunLocked naming the holder
    and when its lease expires; nothing is taken over."""
    monkeypatch.setenv("TIDEBASE_DATABASE_URL", db_url)
    hang = plan(tmp_path, {"rc-2": ["think"]})
    with children() as started:
        holder = Child(db_url, "orders", ns=[2], plan=hang)
        started.append(holder)
        await wait_files(holder, tmp_path / "think-rc-2")
        run = await tide.get_run("rc-2")
        assert run.lease_expires_at is not None and run.lease_owner is not None
        with pytest.raises(RunLocked) as caught:
            await recovery_app.order.with_run_id("rc-2")(2)
        message = str(caught.value)
        assert run.lease_owner in message
        assert run.lease_expires_at.isoformat(timespec="seconds") in message
        assert caught.value.expires_at == run.lease_expires_at
        assert holder.popen.poll() is None
    assert await takeovers(tide, "rc-2") == []


@pytest.mark.postgres
async def test_a_dead_holder_on_another_machine_is_found_through_its_session(
    pg_url: str, tmp_path: Path
) -> None:
    """P3 on PostgreSQL: the holder runs as machine A, the re-invocation as machine B, so B
    cannot look at A's process: it learns of A's death from A's session lock, which the server
    released when A's connection dropped, and takes the run over with the lease still live."""
    tide = Tidebase(pg_url)
    hang = plan(tmp_path, {"rc-3": ["think"]})
    try:
        with children() as started:
            holder = Child(pg_url, "orders", host="machine-a", ns=[3], plan=hang)
            started.append(holder)
            await wait_files(holder, tmp_path / "think-rc-3")
            run = await tide.get_run("rc-3")
            assert run.lease_session is not None and run.lease_process is not None
            assert run.lease_process.startswith("machine-a:")
            holder.kill()
            taker = Child(pg_url, "orders", host="machine-b", ns=[3], plan=plan(tmp_path))
            started.append(taker)
            report = await taker.report()
        assert report["outcome"] == "ok", taker.stderr()
        (taken,) = await takeovers(tide, "rc-3")
        assert taken["holder_dead"] == "session"
        run = await tide.get_run("rc-3")
        assert run.status == "completed"
        # The lease the dead holder took was still 60 s long when it was taken over.
        assert run.finished_at is not None
    finally:
        await close_stores()


@pytest.mark.postgres
async def test_a_holder_that_lost_its_session_but_runs_on_has_every_write_refused(
    pg_url: str, tmp_path: Path
) -> None:
    """R6 with P3: machine A's session connection is terminated while A keeps running inside
    step s1; machine B finds the session gone and takes the run over, then A carries on: its
    step, state, usage and next step are all refused (LeaseLost), and none of them lands."""
    tide = Tidebase(pg_url)
    go = tmp_path / "go"
    hang = plan(tmp_path, {"rc-4": ["s1"]}, go=str(go), report=str(tmp_path / "zombie.json"))
    try:
        with children() as started:
            zombie = Child(pg_url, "writes", host="machine-a", run_id="rc-4", plan=hang)
            started.append(zombie)
            await wait_files(zombie, tmp_path / "s1-rc-4")
            run = await tide.get_run("rc-4")
            assert run.lease_session is not None
            conn = await asyncpg.connect(pg_url)
            try:
                # The backend holding A's session lock (bigint keys: classid high, objid low).
                terminated = await conn.fetchval(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = "
                    "'advisory' AND granted AND ((classid::bigint << 32) | objid::bigint) = $1",
                    run.lease_session,
                )
            finally:
                await conn.close()
            assert terminated
            taker = Child(pg_url, "writes", host="machine-b", run_id="rc-4", plan=plan(tmp_path))
            started.append(taker)
            taken_report = await taker.report()
            assert taken_report["outcome"] == "ok", taker.stderr()
            assert taken_report["result"] == {"s1": "ok", "state": "ok", "usage": "ok", "s2": "ok"}
            go.write_text("")
            zombie_report = await zombie.report()
        assert zombie_report["outcome"] == "LeaseLost", zombie.stderr()
        refused = json.loads((tmp_path / "zombie.json").read_text())
        assert refused == dict.fromkeys(["s1", "state", "usage", "s2"], "LeaseLost")
        (taken,) = await takeovers(tide, "rc-4")
        assert taken["holder_dead"] == "session"
        # Nothing of the zombie landed: every checkpoint, state and usage row is the taker's.
        run = await tide.get_run("rc-4")
        assert run.status == "completed" and run.lease_token == taken["token"]
        assert {s.name: s.lease_token for s in await tide.steps("rc-4")} == {
            "s1": taken["token"],
            "s2": taken["token"],
        }
        assert [v.value for v in await tide.state_versions("rc-4")] == [{"after": "s1"}]
        assert len(await tide.usage_records("rc-4")) == 1
        assert lines(tmp_path / "log").count("s2 rc-4") == 1
    finally:
        await close_stores()


async def wait_until(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_workers_finish_the_direct_call_runs_of_a_killed_process(
    db_url: str, tide: Tidebase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P4: 50 direct-call runs in 3 processes; the victim's 17 runs hang in think, charge or
    notify and it is SIGKILLed. A worker serving the pipeline adopts the orphans at once: none
    is lost, the keyed write re-executes with its key, the unkeyed one in doubt parks for review
    (R5) and never runs twice; a cancelled run and a pipeline that opted out (recover=False)
    are left alone."""
    monkeypatch.setenv("TIDEBASE_DATABASE_URL", db_url)
    stuck = {"think": [0, 9, 18, 27, 36, 45], "charge": [3, 12, 21, 30, 39, 48]}
    stuck["notify"] = [6, 15, 24, 33, 42]
    hang = {f"rc-{n}": [what] for what, ns in stuck.items() for n in ns}
    hang["rc-keep"] = ["work"]
    await tide.list_runs(limit=1)  # an embedded database is migrated before the children race
    with children() as started:
        victim = Child(
            db_url, "orders", ns=list(range(0, 50, 3)), keep="rc-keep", plan=plan(tmp_path, hang)
        )
        others = [
            Child(db_url, "orders", ns=list(range(i, 50, 3)), plan=plan(tmp_path)) for i in (1, 2)
        ]
        started += [victim, *others]
        for i, child in zip((1, 2), others, strict=True):
            report = await child.report()
            assert report["result"] == [f"order {n}: {2 * n}" for n in range(i, 50, 3)]
        markers = [tmp_path / f"{w}-rc-{n}" for w, ns in stuck.items() for n in ns]
        await wait_files(victim, *markers, tmp_path / "work-rc-keep")
        assert await tide.cancel("rc-9") == "cancelled"
        victim.kill()

    # The worker runs in this process: its steps log like the children's and hang nowhere.
    monkeypatch.setattr(recovery_app, "PLAN", plan(tmp_path))
    worker = Worker(
        db_url,
        WorkerOptions(
            pipelines=["rc-order", "rc-keep"],
            concurrency=20,
            recover_interval=0.2,
            poll_interval=0.2,
            grace_seconds=5,
        ),
    )
    started_at = time.monotonic()
    task = asyncio.create_task(worker.run())
    ids = [f"rc-{n}" for n in range(50)]
    try:

        async def settled() -> bool:
            runs = [r for r in await tide.list_runs(limit=100) if r.run_id != "rc-keep"]
            return all(r.status in ("completed", "manual_review", "cancelled") for r in runs)

        await wait_until(settled, "every orphan to be finished or parked")
        print(f"orphans finished {time.monotonic() - started_at:.2f} s after the worker started")
    finally:
        worker.stop()
        await task

    log = lines(tmp_path / "log")
    runs = {r: await tide.get_run(r) for r in ids}
    assert len(await tide.list_runs(limit=1000)) == 51, "a run was lost or invented"
    for n, run_id in enumerate(ids):
        notified = log.count(f"notify {run_id}")
        charges = {ln for ln in log if ln.startswith(f"charge {run_id} ")}
        assert len(charges) <= 1, "a keyed write re-executed with another key"
        assert notified <= 1, "an unkeyed external write ran twice"
        if n in stuck["notify"]:
            # In doubt when its process died: parked, its write never repeated (R5).
            assert runs[run_id].status == "manual_review" and notified == 1
            kinds = [e.kind for e in await tide.events(run_id)]
            assert "step_in_doubt" in kinds
        elif n == 9:
            assert runs[run_id].status == "cancelled"
            assert await takeovers(tide, run_id) == []
        else:
            assert runs[run_id].status == "completed", run_id
            assert runs[run_id].output == f"order {n}: {2 * n}"
            assert log.count(f"think {run_id}") == 1 and notified == 1
        if n % 3 == 0 and n != 9:
            (taken,) = await takeovers(tide, run_id)
            assert taken["holder_dead"] == "process" and taken["adopted"] is True
        if n in stuck["charge"]:
            assert [ln for ln in log if ln.startswith(f"charge {run_id} ")] == [*charges] * 2
    # The pipeline that opted out keeps its run for its caller to re-invoke.
    kept = await tide.get_run("rc-keep")
    assert kept.status == "running" and await takeovers(tide, "rc-keep") == []
