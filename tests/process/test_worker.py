"""The worker (P1): execution of queued runs, retries with backoff, parking, cancellation,
LISTEN/NOTIFY, graceful SIGTERM, and recovery from a worker killed with SIGKILL.

In-process workers run on both backends; the crash and signal tests start real
``tidebase-agents worker`` processes against PostgreSQL (pipelines in ``wk_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from wk_support import (
    assert_gap_free,
    asyncpg_url,
    enqueue,
    start_worker,
    stop_process,
    wait_for,
)

from tidebase_agents import Tidebase, checkpointed_pipeline, current_run
from tidebase_agents._hashing import sha256_hex
from tidebase_agents._store import Store, close_stores, get_store
from tidebase_agents._vocab import FailureClass
from tidebase_agents._worker import Worker, WorkerOptions


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = get_store(db_url)
    await s.open()
    yield s
    await close_stores()


def fast_worker(url: str, *pipelines: str, **options: Any) -> Worker:
    settings: dict[str, Any] = dict(
        pipelines=list(pipelines),
        poll_interval=0.1,
        reconcile_interval=0.1,
        retry_backoff=0.05,
        grace_seconds=10,
    )
    return Worker(url, WorkerOptions(**{**settings, **options}))


@contextlib.asynccontextmanager
async def working(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def statuses(store: Store, run_ids: list[str]) -> list[str]:
    return [(await store.get_run(r)).status for r in run_ids]


async def test_worker_executes_queued_runs(db_url: str, store: Store) -> None:
    @checkpointed_pipeline("wk-basic", tide=Tidebase(db_url))
    async def basic(n: int) -> int:
        run = current_run()
        doubled = await run.step("double", lambda: n * 2)
        await asyncio.sleep(0.01)
        return int(await run.step("inc", lambda: doubled + 1))

    ids = [await basic.enqueue(i) for i in range(12)]
    orphan = await enqueue(store, "wk-nobody-serves", {}, None)
    async with working(fast_worker(db_url, "wk-basic", concurrency=3)) as worker:

        async def done() -> bool:
            return set(await statuses(store, ids)) == {"completed"}

        await wait_for(done, "12 runs to complete")
    for n, run_id in enumerate(ids):
        run = await store.get_run(run_id)
        assert (run.output, run.attempts, run.lease_owner) == (2 * n + 1, 1, None)
        kinds = await assert_gap_free(store, run_id)
        assert kinds == [
            "run_enqueued",
            "run_claimed",
            "step_completed",
            "step_completed",
            "run_completed",
        ]
        claimed = (await store.get_events(run_id))[1]
        assert claimed.data["owner"] == worker.owner
    assert worker.outcomes == Counter(completed=12)
    # A pipeline this worker does not have registered is never claimed.
    run = await store.get_run(orphan)
    assert (run.status, run.attempts) == ("queued", 0)


async def test_retryable_failures_back_off_then_fail_at_max_attempts(
    db_url: str, store: Store
) -> None:
    @checkpointed_pipeline("wk-flaky", tide=Tidebase(db_url))
    async def flaky(succeed_on: int) -> str:
        run = current_run()

        def call() -> int:
            if run.attempt < succeed_on:
                raise RuntimeError(f"attempt {run.attempt} fails")
            return run.attempt

        return f"ok on attempt {await run.step('call', call)}"

    recovers = await flaky.enqueue(3, max_attempts=5)
    doomed = await flaky.enqueue(99, max_attempts=2)
    async with working(fast_worker(db_url, "wk-flaky")):

        async def settled() -> bool:
            return await statuses(store, [recovers, doomed]) == ["completed", "failed"]

        await wait_for(settled, "one run to recover and one to give up")
    run = await store.get_run(recovers)
    assert (run.output, run.attempts) == ("ok on attempt 3", 3)
    requeues = [e for e in await store.get_events(recovers) if e.kind == "run_requeued"]
    assert [e.data["reason"] for e in requeues] == ["retryable_error"] * 2
    delays = [e.data["delay_seconds"] for e in requeues]
    assert 0 < delays[0] <= delays[1]  # exponential: 0.05 * 2**(n-1), jittered down to half
    run = await store.get_run(doomed)
    assert run.attempts == 2 and run.error["failure_class"] == FailureClass.RETRIES_EXHAUSTED
    assert "attempt 2 fails" in run.error["last_error"]["message"]
    assert (await assert_gap_free(store, doomed))[-1] == "run_failed"


async def test_manual_review_is_parked_not_retried(db_url: str, store: Store) -> None:
    sent: list[int] = []

    @checkpointed_pipeline("wk-review", tide=Tidebase(db_url))
    async def notify(user: str) -> str:
        run = current_run()

        def send() -> str:
            sent.append(run.attempt)
            if len(sent) == 1:
                raise RuntimeError("mail server answered 500 after accepting the message")
            return f"sent to {user}"

        return str(await run.step("send", send, side_effects=["mail"]))

    run_id = await notify.enqueue("ada")
    async with working(fast_worker(db_url, "wk-review")) as worker:

        async def parked() -> bool:
            return worker.outcomes["manual_review"] == 1

        await wait_for(parked, "the run to park")
        # Many reconciler passes and claim rounds later it is still parked, not retried.
        await asyncio.sleep(1.0)
        run = await store.get_run(run_id)
        assert (run.status, run.attempts, sent) == ("manual_review", 1, [1])

        # The operator decides to retry (what `steps review --retry` does); a worker runs it.
        await store.review_step(run_id, "send", "retry")
        assert await store.requeue(run_id) == "queued"

        async def completed() -> bool:
            return (await store.get_run(run_id)).status == "completed"

        await wait_for(completed, "the reviewed run to complete")
    run = await store.get_run(run_id)
    assert (run.output, run.attempts, sent) == ("sent to ada", 2, [1, 2])
    await assert_gap_free(store, run_id)


async def test_cancellation_reaches_a_running_worker_at_its_next_step(
    db_url: str, store: Store
) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()
    after: list[str] = []

    @checkpointed_pipeline("wk-cancel", tide=Tidebase(db_url))
    async def long_job(name: str) -> str:
        run = current_run()

        async def first() -> int:
            entered.set()
            await gate.wait()
            return 1

        await run.step("first", first)
        await run.step("second", lambda: after.append(name))
        return "done"

    never = await long_job.enqueue("queued-then-cancelled")
    await store.cancel(never)
    run_id = await long_job.enqueue("running")
    async with working(fast_worker(db_url, "wk-cancel")) as worker:
        await wait_for(entered.is_set, "the first step to start")
        assert await store.cancel(run_id, reason="operator") == "cancelled"
        gate.set()

        async def stopped() -> bool:
            return worker.outcomes["cancelled"] == 1

        await wait_for(stopped, "the worker to observe the cancellation")
        # Re-enqueueing the id and many reconciler passes do not bring it back.
        assert await long_job.enqueue("running", run_id=run_id) == run_id
        await asyncio.sleep(0.5)
    run = await store.get_run(run_id)
    assert (run.status, run.attempts, after) == ("cancelled", 1, [])
    assert await store.load_steps(run_id) == {}  # the late completion of `first` was refused
    assert (await assert_gap_free(store, run_id))[-1] == "run_cancelled"
    run = await store.get_run(never)
    assert (run.status, run.attempts) == ("cancelled", 0)


async def test_listen_notify_wakes_an_idle_worker(pg_url: str) -> None:
    store = get_store(pg_url)
    await store.open()

    @checkpointed_pipeline("wk-notify", tide=Tidebase(pg_url))
    async def ping() -> str:
        return "pong"

    try:
        # Polling alone would take 5 minutes; only the NOTIFY can wake the worker in time.
        async with working(fast_worker(pg_url, "wk-notify", poll_interval=300)) as worker:
            await wait_for(lambda: worker.listening, "LISTEN to be up")
            await asyncio.sleep(0.2)  # the worker is idle, waiting
            run_id = await ping.enqueue()

            async def completed() -> bool:
                return (await store.get_run(run_id)).status == "completed"

            await wait_for(completed, "the notified worker to run it", timeout=60)
    finally:
        await close_stores()


# -- real worker processes ----------------------------------------------------------------------


def order_input(n: int) -> tuple[dict[str, Any], str]:
    data = {"args": [n], "kwargs": {}}
    return data, sha256_hex(data)


async def external_calls(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_url(url))
    try:
        return list(await conn.fetch("SELECT kind, run_id, key, pid FROM wk_calls ORDER BY id"))
    finally:
        await conn.close()


async def wait_ready(*logs: Path) -> None:
    async def ready() -> bool:
        return all("pipelines ['wk-order']" in log.read_text() for log in logs)

    await wait_for(ready, "workers to start", timeout=90)


async def executors(store: Store, run_id: str) -> list[str]:
    """Owners of each claim or adoption of the run, in order."""
    return [
        e.data["owner"]
        for e in await store.get_events(run_id)
        if e.kind in ("run_claimed", "lease_taken_over")
    ]


@pytest.mark.crash
async def test_three_workers_fifty_runs_one_killed(calls_table: str, tmp_path: Path) -> None:
    url = calls_table
    options = ["--concurrency", "2", "--poll-interval", "0.5", "--reconcile-interval", "0.5"]
    options += ["--retry-backoff", "0.2", "--grace", "20"]
    env = {"WK_LEASE": "2", "WK_THINK": "0.25", "WK_MARKERS": str(tmp_path)}
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    victim = start_worker(url, logs[0], *options, **env, WK_HANG_AFTER="3")
    others = [start_worker(url, log, *options, **env) for log in logs[1:]]
    store = get_store(url)
    try:
        await wait_ready(*logs)
        ids = []
        for n in range(50):
            data, digest = order_input(n)
            ids.append(await enqueue(store, "wk-order", data, digest))

        # The victim finished three runs; now both of its slots hang inside `think`.
        async def hung() -> list[Path]:
            markers = list(tmp_path.glob(f"hang-{victim.pid}-*"))
            return markers if len(markers) == 2 else []

        markers = await wait_for(hung, "the victim to be inside two steps", timeout=90)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        killed_runs = [m.name.split("-", 2)[2] for m in markers]

        async def all_done() -> bool:
            return set(await statuses(store, ids)) == {"completed"}

        await wait_for(all_done, "every run to complete", timeout=120, interval=0.3)
        for proc in others:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc in others] == [0, 0]

        # Every run completed once with its own result; none lost, none duplicated.
        assert len(await store.list_runs(limit=1000)) == 50
        for n, run_id in enumerate(ids):
            run = await store.get_run(run_id)
            assert run.output == f"order {n}: {2 * n}" and run.lease_owner is None
            await assert_gap_free(store, run_id)
        # The unkeyed external write ran exactly once per run; the keyed one once per run,
        # always with the run's own idempotency key.
        calls = await external_calls(url)
        notify = Counter(c["run_id"] for c in calls if c["kind"] == "notify")
        charge = Counter(c["run_id"] for c in calls if c["kind"] == "charge")
        assert notify == Counter(dict.fromkeys(ids, 1))
        assert charge == Counter(dict.fromkeys(ids, 1))
        assert all(c["key"] == f"charge-{c['run_id']}" for c in calls if c["kind"] == "charge")
        # The killed worker's runs: adopted by another worker once the victim's process was
        # provably gone (or requeued by the reconciler once its lease expired), finished there.
        victim_tag = f":{victim.pid}:"
        for run_id in killed_runs:
            owners = await executors(store, run_id)
            assert victim_tag in owners[0] and victim_tag not in owners[-1]
            recovered = [
                e
                for e in await store.get_events(run_id)
                if e.kind in ("lease_taken_over", "run_requeued")
            ]
            assert victim_tag in recovered[0].data["previous_owner"]
        # The victim did real work before it hung, and so did the others (not exactly three
        # runs: under load a 2 s lease can lapse, and any worker may adopt such a run).
        finishers = Counter([(await executors(store, r))[-1].split(":")[2] for r in ids])
        assert finishers[str(victim.pid)] >= 1
        assert len(finishers) == 3
    finally:
        for proc in [victim, *others]:
            stop_process(proc)
        await close_stores()


@pytest.mark.crash
async def test_in_doubt_external_writes_after_sigkill(
    calls_table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker dies inside two external writes: the keyed one is re-executed with the same
    key, the unkeyed one parks for review and is never executed again."""
    url = calls_table
    victim = start_worker(
        url,
        tmp_path / "victim.log",
        "--concurrency",
        "2",
        WK_LEASE="2",
        WK_MARKERS=str(tmp_path),
        WK_HANG_STEP="charge:1001,notify:1002",
    )
    store = get_store(url)
    try:
        keyed = await enqueue(store, "wk-order", *order_input(1001))
        unkeyed = await enqueue(store, "wk-order", *order_input(1002))

        async def both_hung() -> bool:
            return (tmp_path / f"hang-charge-{keyed}").exists() and (
                tmp_path / f"hang-notify-{unkeyed}"
            ).exists()

        await wait_for(both_hung, "the victim to be inside both writes", timeout=90)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)

        # The rescuer: a worker in this process.
        monkeypatch.setenv("TIDEBASE_DATABASE_URL", url)
        import wk_app

        rescuer = fast_worker(url, "wk-order", reconcile_interval=0.2)
        assert wk_app.order.name == "wk-order"
        async with working(rescuer):

            async def settled() -> bool:
                return await statuses(store, [keyed, unkeyed]) == ["completed", "manual_review"]

            await wait_for(settled, "recovery of both runs", timeout=60)
            await asyncio.sleep(1.0)  # several reconciler passes: the parked run stays parked
        calls = Counter((c["kind"], c["run_id"], c["key"]) for c in await external_calls(url))
        assert calls == Counter(
            {
                ("charge", keyed, f"charge-{keyed}"): 2,  # same key twice: the API dedupes
                ("notify", keyed, None): 1,
                ("charge", unkeyed, f"charge-{unkeyed}"): 1,
                ("notify", unkeyed, None): 1,  # in doubt, never executed again
            }
        )
        run = await store.get_run(unkeyed)
        assert (run.status, run.attempts) == ("manual_review", 2)
        step = (await store.load_steps(unkeyed))["notify"]
        assert step.status == "manual_review"
        assert "step_in_doubt" in await assert_gap_free(store, unkeyed)
    finally:
        stop_process(victim)
        await close_stores()


@pytest.mark.crash
async def test_sigterm_lets_running_steps_finish_then_requeues(
    calls_table: str, tmp_path: Path
) -> None:
    """Worker A's run finishes within the grace period; worker B's exceeds it and is requeued.
    Neither claims anything after SIGTERM, and both exit 0."""
    url = calls_table
    common = ["--concurrency", "1", "--poll-interval", "0.2"]
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    # Leases no machine load can outlast: this test is about shutdown, not expiry.
    worker_a = start_worker(
        url, log_a, *common, "--queue", "a", "--grace", "60", WK_THINK="3", WK_LEASE="30"
    )
    worker_b = start_worker(
        url, log_b, *common, "--queue", "b", "--grace", "0.2", WK_THINK="60", WK_LEASE="30"
    )
    store = get_store(url)
    try:
        await wait_ready(log_a, log_b)
        first_a = await enqueue(store, "wk-order", *order_input(1), queue="a")
        second_a = await enqueue(store, "wk-order", *order_input(2), queue="a")
        only_b = await enqueue(store, "wk-order", *order_input(3), queue="b")

        async def running() -> bool:
            return await statuses(store, [first_a, only_b]) == ["running", "running"]

        await wait_for(running, "both workers to be inside a step")
        worker_a.send_signal(signal.SIGTERM)
        worker_b.send_signal(signal.SIGTERM)
        assert worker_a.wait(timeout=60) == 0, log_a.read_text()
        assert worker_b.wait(timeout=60) == 0, log_b.read_text()

        assert "waiting up to 60s for 1 running pipelines" in log_a.read_text()
        run = await store.get_run(first_a)
        assert (run.status, run.output) == ("completed", "order 1: 2")
        run = await store.get_run(second_a)
        assert (run.status, run.attempts) == ("queued", 0)  # not claimed after SIGTERM

        run = await store.get_run(only_b)
        assert (run.status, run.attempts, run.lease_owner) == ("queued", 1, None)
        last = (await store.get_events(only_b))[-1]
        assert (last.kind, last.data["reason"]) == ("run_requeued", "worker_shutdown")
        assert "stopped" in log_b.read_text()
    finally:
        for proc in (worker_a, worker_b):
            stop_process(proc)
        await close_stores()
