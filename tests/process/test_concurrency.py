"""Concurrency probes: one live executor per run (R6) and gap-free event logs (R11), with real
processes (both backends; the multi-writer probe on PostgreSQL) and with asyncio tasks."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

from child_support import (
    event_writer,
    finish,
    read_lines,
    retry_locked,
    start,
    wait_file_or_exit,
)

from tidebase_agents import RunLocked, Tidebase


async def migrated(url: str) -> None:
    """Create and migrate the database up front (a fresh SQLite file)."""
    tide = Tidebase(url)
    try:
        await tide.migrate()
    finally:
        await tide.close()


async def records(db_url: str, run_id: str) -> tuple[Any, dict[str, Any], list[Any]]:
    tide = Tidebase(db_url)
    try:
        run = await tide.get_run(run_id)
        steps = {s.name: s for s in await tide.steps(run_id)}
        events = await tide.store.get_events(run_id)
        return run, steps, events
    finally:
        await tide.close()


async def wait_ready(directory: Path, procs: list[Any], n: int) -> None:
    """Wait until ``n`` children wrote their ready-<pid> file."""
    for _ in range(6000):
        if len(list(directory.glob("ready-*"))) >= n:
            return
        for p in procs:
            if p.returncode is not None:
                raise AssertionError(f"child died early:\n{p.result().stderr}")
        await asyncio.sleep(0.01)
    raise TimeoutError("children not ready")


# -- R6 ------------------------------------------------------------------------------------------


async def test_r6_two_processes_started_together_exactly_one_executes(
    db_url: str, tmp_path: Path
) -> None:
    """R6: two processes invoking the same run id at the same moment: exactly one executes the
    body, the other raises RunLocked while the first holds the lease."""
    await migrated(db_url)
    procs = [
        await start("lease_race", url=db_url, run_id="race", dir=str(tmp_path)) for _ in range(2)
    ]
    await wait_ready(tmp_path, procs, 2)
    (tmp_path / "go").touch()
    try:
        for _ in range(9000):  # the loser exits while the winner waits for "release"
            if any(p.returncode is not None for p in procs):
                break
            await asyncio.sleep(0.01)
        exited = [p for p in procs if p.returncode is not None]
        assert len(exited) == 1, "expected exactly one child to return while the other waits"
        loser = await finish(exited[0])
        assert loser.outcome == "RunLocked", loser.stderr
    finally:
        (tmp_path / "release").touch()
    (running,) = [p for p in procs if p is not exited[0]]
    winner = await finish(running)
    assert winner.outcome == "ok", winner.stderr
    assert read_lines(tmp_path / "entered") == [str(winner.report["pid"])]

    run, steps, _ = await records(db_url, "race")
    assert run.status == "completed"
    assert steps["work"].output == winner.report["pid"]


async def test_r6_concurrent_invocations_in_one_event_loop(db_url: str) -> None:
    """R6 (asyncio): two concurrent invocations of one run id: one executes, one RunLocked."""
    gate = asyncio.Event()
    calls: collections.Counter[str] = collections.Counter()

    async def body(run: Any, inp: Any) -> str:
        calls["body"] += 1
        await run.step("work", lambda: 1)
        await gate.wait()
        return "done"

    async def invoke(tide: Tidebase) -> str:
        try:
            return await tide.run("race", body, run_id="race-aio")  # type: ignore[no-any-return]
        except RunLocked:
            gate.set()
            return "locked"

    a, b = Tidebase(db_url), Tidebase(db_url)
    try:
        results = await asyncio.wait_for(asyncio.gather(invoke(a), invoke(b)), 60)
        assert sorted(results) == ["done", "locked"]
        assert calls == {"body": 1}
        run = await a.get_run("race-aio")
        assert (run.status, run.attempts) == ("completed", 1)
    finally:
        await a.close()


async def test_r6_expired_lease_is_taken_over_and_the_zombie_cannot_write(
    db_url: str, tmp_path: Path
) -> None:
    """R6: executor A (3 s lease) stalls inside a step; B takes the expired lease over and
    completes the run; when A goes on, its next write raises LeaseLost and nothing it did
    after the takeover lands: the rows are B's."""
    log = tmp_path / "log"
    proc = await start("zombie", url=db_url, run_id="z", dir=str(tmp_path), log=str(log))
    try:
        await wait_file_or_exit(tmp_path / "in-slow", proc)
        calls: collections.Counter[str] = collections.Counter()

        def fn(name: str, value: str) -> Any:
            def call() -> str:
                calls[name] += 1
                return value

            return call

        async def body(run: Any, inp: Any) -> list[str]:
            return [
                await run.step("first", fn("first", "B-first")),
                await run.step("slow", fn("slow", "B-slow")),
                await run.step("after", fn("after", "B-after")),
            ]

        b = Tidebase(db_url)
        try:
            result = await asyncio.wait_for(
                retry_locked(lambda: b.run("zombie", body, run_id="z")), 60
            )
        finally:
            await b.close()
        assert result == ["A-first", "B-slow", "B-after"]
        assert calls == {"slow": 1, "after": 1}, "B re-ran a step A had completed"
    finally:
        (tmp_path / "b-done").touch()
    zombie = await finish(proc)
    assert zombie.outcome == "LeaseLost", zombie.stderr
    assert read_lines(log) == ["first-A", "slow-A"], "the zombie went past its refused write"

    run, steps, events = await records(db_url, "z")
    assert run.status == "completed"
    assert run.output == ["A-first", "B-slow", "B-after"]
    assert {n: (s.output, s.lease_token) for n, s in steps.items()} == {
        "first": ("A-first", 1),
        "slow": ("B-slow", 2),
        "after": ("B-after", 2),
    }
    kinds = [e.kind for e in events]
    assert kinds.count("lease_taken_over") == 1
    assert kinds[-1] == "run_completed"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_r6_runs_ending_with_writes_in_flight_let_the_process_exit(db_url: str) -> None:
    """R6: runs that lose their lease while sibling steps and the heartbeat are mid-write, each
    followed by Tidebase.close() and the end of asyncio.run, neither hang the process nor lose
    what was committed: a fresh executor resumes every run to its full result."""
    iterations = 40
    proc = await start("close_under_load", url=db_url, iterations=iterations)
    report = (await finish(proc, timeout=180)).report
    assert report["outcome"] == "ok"
    assert len(report["outcomes"]) == iterations
    # With a 0.1 s lease a write may also give up waiting: its wait is bounded by the lease.
    assert set(report["outcomes"]) <= {"ok", "LeaseLost", "DatabaseUnavailable"}

    async def body(run: Any, inp: Any) -> int:
        return sum(await asyncio.gather(*(run.step(f"s{k}", lambda k=k: k) for k in range(60))))

    tide = Tidebase(db_url)
    try:
        for i in range(iterations):
            result = await retry_locked(lambda i=i: tide.run("loaded", body, run_id=f"r{i}"))
            assert result == sum(range(60))
    finally:
        await tide.close()


# -- R11 -----------------------------------------------------------------------------------------


async def test_r11_event_log_is_gap_free_under_concurrent_steps(db_url: str) -> None:
    """R11: 40 concurrent steps (half with side effects: two events each) plus a state_set in
    one run produce events with seq exactly 1..N, each step's events present once."""
    tide = Tidebase(db_url)

    async def body(run: Any, inp: Any) -> int:
        async def work(i: int) -> int:
            await asyncio.sleep(0)
            return i

        out = await asyncio.gather(
            *(
                run.step(f"s{i}", lambda i=i: work(i), side_effects=["x"] if i % 2 else None)
                for i in range(40)
            ),
            run.state_set({"phase": "gathering"}),
        )
        return len(out)

    try:
        assert await tide.run("events", body, run_id="ev") == 41
        events = await tide.store.get_events("ev")
    finally:
        await tide.close()
    assert [e.seq for e in events] == list(range(1, 1 + 1 + 20 + 40 + 1 + 1))
    per_step = collections.Counter((e.step, e.kind) for e in events if e.step)
    assert per_step == {
        **{(f"s{i}", "step_completed"): 1 for i in range(40)},
        **{(f"s{i}", "step_started"): 1 for i in range(1, 40, 2)},
    }
    kinds = [e.kind for e in events]
    assert (kinds[0], kinds[-1], kinds.count("state_set")) == ("run_started", "run_completed", 1)


async def test_r11_r12_gap_free_event_logs_with_writers_in_several_processes(
    pg_url: str, tmp_path: Path
) -> None:
    """R11 (PostgreSQL, processes): a child and this process write events to their own runs
    (concurrent steps) while another child executes a shared run with concurrent steps; then
    both cancel the shared run from outside (R12). Every log is gap-free; the shared run's
    ends with its one run_cancelled, and no step completion landed after it."""
    procs = [
        await start(
            "event_writer", url=pg_url, run_id="w0", dir=str(tmp_path), steps=30, shared="sh"
        ),
        await start("shared_executor", url=pg_url, run_id="sh", dir=str(tmp_path)),
    ]
    try:
        await wait_ready(tmp_path, procs, 2)
        (tmp_path / "go").touch()
        here = await event_writer(pg_url, "w1", str(tmp_path), steps=30, shared="sh")
        results = [await finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert here["cancel"] == "cancelled"
    assert results[0].outcome == "ok", results[0].stderr
    assert results[0].report["cancel"] == "cancelled"
    assert results[1].outcome == "RunCancelled", results[1].stderr

    for run_id in ("w0", "w1"):
        run, steps, events = await records(pg_url, run_id)
        assert run.status == "completed"
        assert [e.seq for e in events] == list(range(1, 1 + 1 + 15 + 30 + 1 + 1))
        assert len(steps) == 30

    run, steps, events = await records(pg_url, "sh")
    assert run.status == "cancelled"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [e.kind for e in events]
    assert kinds.count("run_cancelled") == 1
    assert kinds[-1] == "run_cancelled"
    completed = {n for n, s in steps.items() if s.status == "completed"}
    assert len(completed) >= 8  # the first batch finished before anyone cancelled
    assert completed == {e.step for e in events if e.kind == "step_completed"}
