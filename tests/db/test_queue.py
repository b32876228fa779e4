"""The queue's queries (P1): enqueue with exact dedupe, claims, settling, the reconciler.

Each test runs on embedded SQLite and on a fresh PostgreSQL database; the concurrency probes
use many connections of one process and, on PostgreSQL, several processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import update
from wk_support import assert_gap_free, asyncpg_url, child_env, enqueue

from tidebase_agents import (
    ConfigurationError,
    RunCancelled,
    RunConflict,
    RunLocked,
    Tidebase,
    checkpointed_pipeline,
)
from tidebase_agents._store import (
    Backoff,
    Claim,
    Event,
    NewRun,
    Store,
    close_stores,
    get_store,
    utcnow,
)
from tidebase_agents._store.postgres import reconciler_lock_key
from tidebase_agents._store.tables import RunRow
from tidebase_agents._vocab import FailureClass

P = "queue-test"
NOW = Backoff(0.0, 0.0)  # requeued runs are due at once


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = get_store(db_url)
    await s.open()
    yield s
    await close_stores()


async def put(store: Store, n: int = 0, **options: object) -> str:
    return await enqueue(store, P, {"n": n}, f"hash-{n}", **options)  # type: ignore[arg-type]


async def take(store: Store, owner: str = "w1", lease: float = 60, **options: object) -> Claim:
    claims = await store.claim(
        owner=owner,
        lease_seconds=lease,
        queues=options.pop("queues", ["default"]),  # type: ignore[arg-type]
        pipelines=[P],
    )
    assert len(claims) == 1, claims
    return claims[0]


async def end_retryable(store: Store, c: Claim, owner: str = "w1") -> None:
    """What the runtime does when an execution ends in a retryable error."""
    acquired = await store.acquire(NewRun(c.run_id, P, owner, 60), claim_token=c.token)
    assert acquired.lease is not None
    await store.finish(
        acquired.lease,
        "failed_retryable",
        error={"type": "builtins.RuntimeError", "message": "boom"},
        event=Event("run_interrupted"),
    )


async def set_run(store: Store, run_id: str, **values: object) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(update(RunRow).where(RunRow.run_id == run_id).values(**values))


# -- enqueue ----------------------------------------------------------------------------------


async def test_pipeline_enqueue_records_a_queued_run(db_url: str, store: Store) -> None:
    @checkpointed_pipeline("queue-enqueue-api", tide=Tidebase(db_url))
    async def pipeline(topic: str, *, depth: int = 1) -> str:
        return topic

    deadline = utcnow() + dt.timedelta(hours=1)
    run_id = await pipeline.enqueue(
        "tides",
        depth=3,
        run_id="order-1",
        queue="slow",
        dedupe_key="tides",
        priority=7,
        delay=dt.timedelta(seconds=30),
        max_attempts=3,
        deadline=deadline,
    )
    assert run_id == "order-1"
    run = await store.get_run(run_id)
    assert (run.status, run.pipeline, run.queue, run.dedupe_key) == (
        "queued",
        "queue-enqueue-api",
        "slow",
        "tides",
    )
    assert (run.priority, run.max_attempts, run.attempts, run.lease_token) == (7, 3, 0, 0)
    assert run.input == {"args": ["tides"], "kwargs": {"depth": 3}}
    assert run.scheduled_at is not None and run.scheduled_at > utcnow() + dt.timedelta(seconds=20)
    assert run.deadline == deadline
    assert await assert_gap_free(store, run_id) == ["run_enqueued"]
    # Defaults: queue "default", a generated id, due now, the default attempt budget.
    other = await pipeline.enqueue("reefs")
    assert other.startswith("run-")
    assert (await store.get_run(other)).max_attempts == 5


async def test_enqueue_of_an_existing_run_id(store: Store) -> None:
    assert await put(store, 1, run_id="same") == "same"
    assert await put(store, 1, run_id="same") == "same"  # idempotent
    with pytest.raises(RunConflict):
        await put(store, 2, run_id="same")  # other arguments
    with pytest.raises(ConfigurationError):
        await put(store, run_id="has space")
    with pytest.raises(ConfigurationError):
        await put(store, max_attempts=0)
    with pytest.raises(ConfigurationError):
        await put(store, queue="")
    with pytest.raises(ConfigurationError):
        await put(store, dedupe_key="x" * 300)
    assert len(await store.list_runs()) == 1


async def test_concurrent_enqueues_with_one_dedupe_key_create_one_active_run(
    store: Store,
) -> None:
    ids = await asyncio.gather(*(put(store, i, dedupe_key="invoice-7") for i in range(30)))
    assert len(set(ids)) == 1
    runs = await store.list_runs()
    assert [r.run_id for r in runs] == [ids[0]]
    # Another queue is another dedupe scope.
    elsewhere = await put(store, dedupe_key="invoice-7", queue="other")
    assert elsewhere != ids[0]
    # Once the run is no longer active, the key is free again: exactly one new active run.
    await store.cancel(ids[0])
    again = await asyncio.gather(*(put(store, i, dedupe_key="invoice-7") for i in range(10)))
    assert len(set(again)) == 1 and again[0] != ids[0]
    active = [r for r in await store.list_runs(queues=["default"]) if r.status == "queued"]
    assert [r.run_id for r in active] == [again[0]]


# -- claims -----------------------------------------------------------------------------------


async def test_concurrent_claimers_never_receive_the_same_run(store: Store) -> None:
    ids = {await put(store, i) for i in range(60)}
    claimed: list[tuple[str, Claim]] = []

    async def claimer(owner: str) -> None:
        while batch := await store.claim(
            owner=owner, lease_seconds=60, queues=["default"], pipelines=[P], limit=2
        ):
            claimed.extend((owner, c) for c in batch)

    await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    run_ids = [c.run_id for _, c in claimed]
    assert sorted(run_ids) == sorted(ids)  # every run claimed, none twice
    for owner, c in claimed:
        run = await store.get_run(c.run_id)
        assert (run.status, run.lease_owner, run.lease_token, run.attempts) == (
            "running",
            owner,
            c.token,
            1,
        )
        assert await assert_gap_free(store, c.run_id) == ["run_enqueued", "run_claimed"]


async def test_claim_order_and_filters(store: Store) -> None:
    low = await put(store, 1, priority=0)
    high = await put(store, 2, priority=5)
    later = await put(store, 3, delay=3600)
    await put(store, 4, queue="other")
    await enqueue(store, "not-served", {}, "h", queue="default")
    expired = await put(store, 5, deadline=dt.timedelta(hours=1))
    await set_run(store, expired, deadline=utcnow() - dt.timedelta(seconds=1))

    assert (await take(store)).run_id == high
    assert (await take(store)).run_id == low
    assert await store.claim(owner="w", lease_seconds=9, queues=["default"], pipelines=[P]) == []
    due = await store.next_due(queues=["default"], pipelines=[P])
    run = await store.get_run(later)
    assert due == run.scheduled_at
    assert (await take(store, queues=["other"])).run_id != later


async def test_concurrent_processes_dedupe_and_claim_exactly(pg_url: str, tmp_path: Path) -> None:
    """Three processes enqueue with one dedupe key and claim from one queue at the same time."""
    store = get_store(pg_url)
    try:
        queued = {await enqueue(store, P, {"n": i}, "h", queue="claims") for i in range(120)}
    finally:
        await store.close()
    code = """
import asyncio, json, os, sys, time
from pathlib import Path
from tidebase_agents._store import get_store
from wk_support import enqueue
url, barrier = sys.argv[1], Path(sys.argv[2])
async def main():
    store = get_store(url)
    await store.open()
    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / "go").exists():
        await asyncio.sleep(0.01)
    ids = await asyncio.gather(*(
        enqueue(store, "queue-test", {"i": i}, "h", queue="dd", dedupe_key="one")
        for i in range(8)))
    claimed = []
    async def claimer():
        while batch := await store.claim(owner=str(os.getpid()), lease_seconds=60,
                                   queues=["claims"], pipelines=["queue-test"], limit=2):
            claimed.extend(c.run_id for c in batch)
    await asyncio.gather(*(claimer() for _ in range(3)))
    await store.close()
    print(json.dumps({"ids": ids, "claimed": claimed}))
asyncio.run(main())
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, pg_url, str(tmp_path)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout))
    ids = {i for r in results for i in r["ids"]}
    claimed = [i for r in results for i in r["claimed"]]
    assert len(ids) == 1  # 24 concurrent enqueues, one active run
    assert sorted(claimed) == sorted(queued)  # every run claimed exactly once
    conn = await asyncpg.connect(asyncpg_url(pg_url))
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM tidebase.tidebase_runs WHERE queue = 'dd'")
            == 1
        )
    finally:
        await conn.close()


# -- settling an execution ----------------------------------------------------------------------


async def test_settle_requeues_with_backoff_then_fails_at_max_attempts(store: Store) -> None:
    run_id = await put(store, max_attempts=2)
    c = await take(store)
    await end_retryable(store, c)
    assert await store.settle_claim(c, Backoff(60, 120)) == "queued"
    run = await store.get_run(run_id)
    assert run.status == "queued" and run.lease_owner is None
    assert run.scheduled_at is not None and run.scheduled_at > utcnow() + dt.timedelta(seconds=25)
    assert await store.claim(owner="w", lease_seconds=9, queues=["default"], pipelines=[P]) == []

    await set_run(store, run_id, scheduled_at=utcnow())
    c2 = await take(store, owner="w2")
    assert (c2.attempt, c2.token) == (2, c.token + 1)
    await end_retryable(store, c2, owner="w2")
    assert await store.settle_claim(c2, NOW) == "failed"
    run = await store.get_run(run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert run.error["failure_class"] == FailureClass.RETRIES_EXHAUSTED
    assert run.error["last_error"]["message"] == "boom"
    kinds = await assert_gap_free(store, run_id)
    assert kinds[-1] == "run_failed" and "run_requeued" in kinds


async def test_settle_leaves_other_outcomes_alone(store: Store) -> None:
    # Parked for review: never retried in a loop.
    parked = await put(store, 1)
    c = await take(store)
    acquired = await store.acquire(NewRun(parked, P, "w1", 60), claim_token=c.token)
    assert acquired.lease is not None
    await store.finish(acquired.lease, "manual_review", event=Event("run_parked"))
    assert await store.settle_claim(c, NOW) == "manual_review"
    # Cancelled while running: stays cancelled.
    cancelled = await put(store, 2)
    c = await take(store)
    await store.cancel(cancelled)
    assert await store.settle_claim(c, NOW) == "cancelled"
    # Taken over by another executor (a newer token): not this worker's to settle.
    taken = await put(store, 3)
    c = await take(store, lease=0.001)
    await asyncio.sleep(0.01)
    await store.acquire(NewRun(taken, P, "other", 60))
    assert await store.settle_claim(c, NOW) == "running"
    assert (await store.get_run(taken)).lease_owner == "other"
    # Never executed (the worker stopped before the runtime took the lease): back at once.
    idle = await put(store, 4, max_attempts=1)
    c = await take(store)
    assert await store.settle_claim(c, NOW, interrupted=True) == "queued"
    run = await store.get_run(idle)
    assert (run.status, run.attempts, run.lease_owner) == ("queued", 1, None)
    events = await store.get_events(idle)
    assert events[-1].data["reason"] == "worker_shutdown"


# -- reconciler -------------------------------------------------------------------------------


async def test_reconciler_requeues_expired_leases_then_fails_at_max_attempts(
    store: Store,
) -> None:
    run_id = await put(store, max_attempts=2)
    await take(store, owner="dead-1", lease=0.001)
    in_process = "in-process"
    await store.acquire(NewRun(in_process, P, "dead-2", 0.001))
    await asyncio.sleep(0.01)

    report = await store.reconcile(NOW, orphan_grace=60)
    assert report.elected and report.requeued == [run_id]
    run = await store.get_run(run_id)
    assert (run.status, run.lease_owner, run.lease_expires_at) == ("queued", None, None)
    requeued = (await store.get_events(run_id))[-1]
    assert requeued.kind == "run_requeued"
    assert requeued.data["reason"] == "lease_expired"
    assert requeued.data["previous_owner"] == "dead-1"
    # A run executed in-process (no queue) is its caller's to resume, never the queue's.
    assert (await store.get_run(in_process)).status == "running"

    await take(store, owner="dead-3", lease=0.001)
    await asyncio.sleep(0.01)
    report = await store.reconcile(NOW, orphan_grace=60)
    assert report.failed == [run_id]
    run = await store.get_run(run_id)
    assert run.status == "failed" and run.error["failure_class"] == FailureClass.EXECUTOR_LOST
    assert run.attempts == 2
    await assert_gap_free(store, run_id)


async def test_reconciler_requeues_orphaned_retryable_runs_only(store: Store) -> None:
    orphan = await put(store, 1)
    c = await take(store)
    await end_retryable(store, c)
    parked = await put(store, 2)
    c = await take(store)
    acquired = await store.acquire(NewRun(parked, P, "w1", 60), claim_token=c.token)
    assert acquired.lease is not None
    await store.finish(acquired.lease, "manual_review", event=Event("run_parked"))

    # Within the grace period the worker that ran it settles it itself.
    assert (await store.reconcile(NOW, orphan_grace=60)).requeued == []
    report = await store.reconcile(NOW, orphan_grace=0)
    assert report.requeued == [orphan]
    assert (await store.get_run(parked)).status == "manual_review"
    assert (await store.get_run(orphan)).status == "queued"


async def test_reconciler_cancels_runs_past_their_deadline(store: Store) -> None:
    running = await put(store, 1, deadline=dt.timedelta(hours=1))
    queued = await put(store, 2, deadline=dt.timedelta(hours=1))
    c = await take(store)
    assert c.run_id == running
    acquired = await store.acquire(NewRun(running, P, "w1", 60), claim_token=c.token)
    assert acquired.lease is not None
    live = await put(store, 3, deadline=dt.timedelta(hours=1))
    past = utcnow() - dt.timedelta(seconds=1)
    await set_run(store, queued, deadline=past)
    await set_run(store, running, deadline=past)
    report = await store.reconcile(NOW, orphan_grace=60)
    assert sorted(report.cancelled) == sorted([queued, running])
    for run_id in (queued, running):
        run = await store.get_run(run_id)
        assert (
            run.status == "cancelled"
            and run.error["failure_class"] == FailureClass.DEADLINE_EXCEEDED
        )
        assert (await assert_gap_free(store, run_id))[-1] == "run_cancelled"
    assert (await store.get_run(live)).status == "queued"
    # The executor of the cancelled running run is refused at its next write.
    with pytest.raises(RunCancelled):
        await store.heartbeat(acquired.lease, 60)


async def test_reconciler_is_elected_by_advisory_lock(pg_url: str) -> None:
    store = get_store(pg_url)
    await store.open()
    try:
        run_id = await put(store)
        await take(store, lease=0.001)
        await asyncio.sleep(0.01)
        holder = await asyncpg.connect(asyncpg_url(pg_url))
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", reconciler_lock_key("tidebase"))
            report = await store.reconcile(NOW, orphan_grace=60)
            assert not report.elected
            assert (await store.get_run(run_id)).status == "running"
        finally:
            await holder.close()
        # Many reconcilers at once: the run is requeued exactly once.
        reports = await asyncio.gather(*(store.reconcile(NOW, orphan_grace=60) for _ in range(6)))
        assert sum(len(r.requeued) for r in reports) == 1
        kinds = await assert_gap_free(store, run_id)
        assert kinds.count("run_requeued") == 1
    finally:
        await close_stores()


async def test_operator_requeue(store: Store) -> None:
    retryable = await put(store, 1, max_attempts=1)
    c = await take(store)
    await end_retryable(store, c)
    # An operator's requeue is immediate and not bound by the attempt budget.
    assert await store.requeue(retryable, queue="manual") == "queued"
    run = await store.get_run(retryable)
    assert (run.status, run.queue) == ("queued", "manual")
    assert await store.requeue(retryable) == "queued"  # already queued: unchanged

    live = await put(store, 2)
    await take(store)
    with pytest.raises(RunLocked):
        await store.requeue(live)
    await store.cancel(live)
    with pytest.raises(Exception, match="cancelled"):
        await store.requeue(live)
