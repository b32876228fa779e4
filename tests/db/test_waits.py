"""Durable waits and approvals in one process, on both backends (W1): ``wait_for`` / ``send``
exactly once before and after the wait, a typed timeout, sleeps, decisions recorded once,
and waiting runs that hold no lease, connection or task.

The cross-process halves (a new process approves, crashes inside an approved tool, workers)
are in ``tests/process/test_approvals_across_processes.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import waits_app
from harness import library_engine
from sqlalchemy import func, or_, select, text

from tidebase_agents import (
    ApprovalNotFound,
    ApprovalRequired,
    DecisionConflict,
    RunStatus,
    RunWaiting,
    Tidebase,
    WaitTimeout,
)
from tidebase_agents._store.tables import RunRow


async def _runs_holding_leases(url: str) -> int:
    engine = library_engine(url)
    try:
        async with engine.connect() as conn:
            holders = select(func.count()).where(
                or_(RunRow.lease_owner.is_not(None), RunRow.lease_expires_at.is_not(None))
            )
            return int((await conn.execute(holders)).scalar_one())
    finally:
        await engine.dispose()


async def test_send_before_and_after_wait_for_is_delivered_exactly_once(db_url: str) -> None:
    tide = Tidebase(db_url)
    waiter = waits_app.waiting_pipeline(db_url)
    try:
        with pytest.raises(RunWaiting) as parked:
            await waiter.with_run_id("late")("go")
        assert parked.value.topic == "go" and parked.value.wake_at is None
        assert (await tide.get_run("late")).status == RunStatus.WAITING
        assert await _runs_holding_leases(db_url) == 0

        # Still nothing sent: invoking it again parks it again, writing no second wait.
        with pytest.raises(RunWaiting):
            await waiter.resume("late")
        await tide.send("late", "go", {"n": 1})
        await tide.send("late", "go", {"n": 2})  # for a later wait: never handed out here
        assert await waiter.resume("late") == {"got": {"n": 1}}
        assert await waiter.resume("late") == {"got": {"n": 1}}  # completed (R7)
        messages = await tide.messages("late")
        assert [(m.payload, m.consumed_by) for m in messages] == [
            ({"n": 1}, "wait:go#1"),
            ({"n": 2}, None),
        ]
    finally:
        await waiter.tide.close()
        await tide.close()


async def test_a_message_sent_before_the_wait_starts_is_taken_by_it(db_url: str) -> None:
    tide = Tidebase(db_url)
    gate = asyncio.Event()
    seen: list[Any] = []

    async def body(run: Any, _input: Any) -> Any:
        await run.step("first", lambda: "x")
        await gate.wait()
        seen.append(await run.wait_for("answer", timeout=60))
        return seen[-1]

    try:
        task = asyncio.create_task(tide.run("early-send", body, run_id="early"))
        for _ in range(500):
            if any(s.name == "first" for s in await tide.steps("early")):
                break
            await asyncio.sleep(0.01)
        await tide.send("early", "answer", "yes")  # while the run executes, before wait_for
        gate.set()
        assert await task == "yes"
        assert seen == ["yes"]
        (message,) = await tide.messages("early")
        assert message.consumed_by == "wait:answer#1"
    finally:
        await tide.close()


async def test_wait_timeout_is_typed_recorded_and_catchable(db_url: str) -> None:
    tide = Tidebase(db_url)
    caught: list[str] = []

    async def body(run: Any, _input: Any) -> Any:
        try:
            return await run.wait_for("never", timeout=0.3)
        except WaitTimeout as exc:
            caught.append(exc.topic)
            return "timed out"

    try:
        with pytest.raises(RunWaiting) as parked:
            await tide.run("timeouts", body, run_id="t")
        assert parked.value.wake_at is not None  # due when the timeout ends
        run = await tide.get_run("t")
        assert run.status == RunStatus.WAITING and run.scheduled_at == parked.value.wake_at
        await asyncio.sleep(0.4)
        assert await tide.run("timeouts", body, run_id="t") == "timed out"
        assert caught == ["never"]
        # A message arriving after the timeout is not delivered to the ended wait.
        with pytest.raises(Exception, match="ended"):
            await tide.send("t", "never", 1)
    finally:
        await tide.close()


async def test_sleep_parks_until_due_then_goes_on(db_url: str) -> None:
    tide = Tidebase(db_url)
    ran: list[str] = []

    async def body(run: Any, _input: Any) -> str:
        await run.step("before", lambda: ran.append("before"))
        await run.sleep(0.3)
        await run.step("after", lambda: ran.append("after"))
        return "slept"

    try:
        with pytest.raises(RunWaiting) as parked:
            await tide.run("sleeps", body, run_id="s")
        assert parked.value.topic is None and parked.value.wake_at is not None
        with pytest.raises(RunWaiting):  # not due yet: parks again
            await tide.run("sleeps", body, run_id="s")
        await asyncio.sleep(0.35)
        assert await tide.run("sleeps", body, run_id="s") == "slept"
        assert ran == ["before", "after"]
        statuses = {s.name: s.status for s in await tide.steps("s")}
        assert statuses["sleep#1"] == "completed"
    finally:
        await tide.close()


async def test_decisions_are_recorded_once_and_a_conflict_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    report = await waits_app.start_refund(db_url, "d1", str(tmp_path))
    (pending,) = report["pending"]
    assert pending == {
        "call_id": pending["call_id"],
        "agent": "payer",
        "tool": "refund",
        "arguments": '{"amount":5}',
    }
    tide = Tidebase(db_url)
    try:
        with pytest.raises(ApprovalNotFound):
            await tide.approve("d1", "no-such-call")
        first = await tide.approve("d1", pending["call_id"])
        again = await tide.approve("d1", pending["call_id"])  # the same decision: a no-op
        assert first.decision == again.decision == "approve"
        assert first.decided_at == again.decided_at
        with pytest.raises(DecisionConflict):
            await tide.reject("d1", pending["call_id"], message="no")
        (record,) = await tide.approvals("d1")
        assert record.decision == "approve" and record.message is None
        decided = [e for e in await tide.events("d1") if e.kind == "approval_decided"]
        assert len(decided) == 1
        run = await tide.get_run("d1")
        assert run.status == RunStatus.WAITING and run.scheduled_at is not None  # due now
    finally:
        await tide.close()
    resumed = await waits_app.resume_refund(db_url, "d1", str(tmp_path))
    assert resumed["result"].startswith("payer: refunded 5")


async def test_rejected_call_never_runs_and_the_model_sees_the_message(
    db_url: str, tmp_path: Path
) -> None:
    report = await waits_app.start_refund(db_url, "rj", str(tmp_path))
    call_id = report["pending"][0]["call_id"]
    tide = Tidebase(db_url)
    try:
        await tide.reject("rj", call_id, message="refunds over 3 need a manager")
    finally:
        await tide.close()
    resumed = await waits_app.resume_refund(db_url, "rj", str(tmp_path))
    assert resumed["result"] == "payer: refunds over 3 need a manager"
    assert not (tmp_path / "api-attempts.log").exists()


async def test_an_undecided_run_parks_again_and_holds_nothing(db_url: str, tmp_path: Path) -> None:
    await waits_app.start_refund(db_url, "u1", str(tmp_path))
    pipeline = waits_app.refund_pipeline(db_url, str(tmp_path))
    try:
        with pytest.raises(ApprovalRequired) as again:
            await pipeline.resume("u1")
        assert [p.tool for p in again.value.pending] == ["refund"]
        assert len(await pipeline.tide.approvals("u1")) == 1  # not recorded twice
    finally:
        await pipeline.tide.close()


async def test_a_thousand_waiting_runs_hold_no_lease_connection_or_task(db_url: str) -> None:
    """1,000 runs parked in wait_for / sleep / approvals: no lease holder in the database,
    no connection checked out of the pool (on PostgreSQL, no session of the library's left
    once its store closes), and no task of theirs left in the process."""
    tide = Tidebase(db_url)
    n = 1000

    async def body(run: Any, i: int) -> Any:
        if i % 10 == 0:
            return await run.wait_for("go")
        await run.sleep(3600)
        return None

    async def park(i: int) -> None:
        with pytest.raises(RunWaiting):
            await tide.run("many", body, run_id=f"m{i}", input=i)

    try:
        for start in range(0, n, 100):
            await asyncio.gather(*(park(i) for i in range(start, start + 100)))
        waiting = await tide.list_runs(status=RunStatus.WAITING, limit=n + 1)
        assert len(waiting) == n
        assert await _runs_holding_leases(db_url) == 0
        assert tide.store.engine.pool.checkedout() == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}
        print(f"{n} waiting runs: 0 lease holders, 0 connections checked out")
    finally:
        await tide.close()
    if db_url.startswith("postgresql"):
        engine = library_engine(db_url)
        try:
            async with engine.connect() as conn:
                others = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid()"
                        )
                    )
                ).scalar_one()
                still = (
                    await conn.execute(
                        select(func.count()).where(RunRow.status == RunStatus.WAITING)
                    )
                ).scalar_one()
        finally:
            await engine.dispose()
        assert (others, still) == (0, n)
