"""Cost flat as work grows (PostgreSQL): long runs, deep queues, many concurrent runs, pruning.

Each ``measure_*`` function sets up what it needs in the database ``<bench db>_scale`` (the big
tables are filled with bulk SQL, not through pipelines), measures, and returns its keys:

- ``step_cost_ratio_10000_vs_100``: the median cost of new steps of a run 9,900 steps deep
  (steps 9,901-10,100) over that of a run 100 deep, the two taking turns step by step.
- ``resume_10000_round_trips`` / ``resume_10000_ms``: resuming a run of 10,000 finished steps
  (replayed) up to its first new step: statements sent and wall time.
- ``claim_ratio_100k_vs_empty``: the median time of one claim from a queue holding 100,000 queued
  runs over a claim from a queue holding one, interleaved (both queues in the same table);
  ``claim_ratio_100k_vs_empty_table`` compares with claims made before the 100,000 existed.
- ``worker_1000_concurrent_pps`` (and ``..._vs_ideal``): runs per second one worker completes at
  ``concurrency=1000`` when each run's one step waits 1 s for its "model"; the ideal is 1,000/s.
  ``worker_1000_peak_connections``: the most connections the database saw from it meanwhile.
- ``prune_100k_step_latency_ratio``: the median latency of a pipeline's steps while 100,000 ended
  runs are pruned (as a worker's retention pass does it) over their latency before and after.

``python -m bench.scale`` runs them all and prints the keys as JSON; ``bench.run`` merges them
into ``latest.json``. The machine is shared: ratios come from figures taken side by side.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench.common import asyncpg_dsn, database_name, ensure_database, pg_url, with_database

STEPS = 10_000
WINDOW = 100
QUEUED = 100_000
CLAIMS = 200
WORKER_RUNS = 2_000
CONCURRENCY = 1_000
MODEL_SECONDS = 1.0
PRUNED = 100_000
BASELINE_SECONDS = 3.0
LONG_AGO = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def _spread(key: str, values: list[float]) -> dict[str, float]:
    """``key``'s 10th and 90th percentile (ms), to show the noise of its median."""
    q = statistics.quantiles(values, n=10)
    return {f"{key}_p10": round(q[0] * 1e3, 3), f"{key}_p90": round(q[-1] * 1e3, 3)}


async def _sql(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url), server_settings={"search_path": "tidebase"})
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _runs_with_steps(url: str, runs: dict[str, int]) -> None:
    """Runs of pipeline ``scale-long`` left retryable with this many completed steps ``s0``..
    (two events each), written with bulk SQL; resuming one replays them all."""
    from tidebase_agents import Run, Tidebase

    async def one(run: Run, _: None) -> None:
        await run.step("s0", lambda: 0)

    tide = Tidebase(url)
    await tide.run("scale-template", one, run_id="template")
    input_hash = (await tide.steps("template"))[0].input_hash
    await tide.close()
    for run_id, n in runs.items():
        await _sql(
            url,
            f"INSERT INTO tidebase_runs (run_id, pipeline, status, attempts, lease_token, "
            f"created_at, updated_at, event_seq) VALUES ('{run_id}', 'scale-long', "
            f"'failed_retryable', 1, 1, now(), now(), {2 * n})",
            f"INSERT INTO tidebase_steps (run_id, name, status, input_hash, output, lease_token, "
            f"started_at, completed_at) SELECT '{run_id}', 's' || g, 'completed', "
            f"'{input_hash}', to_jsonb(g), 1, now(), now() FROM generate_series(0, {n - 1}) g",
            f"INSERT INTO tidebase_events (run_id, seq, kind, step, created_at) "
            f"SELECT '{run_id}', g, CASE WHEN g % 2 = 1 THEN 'step_started' "
            f"ELSE 'step_completed' END, 's' || ((g - 1) / 2), now() "
            f"FROM generate_series(1, {2 * n}) g",
        )
    await _sql(url, "ANALYZE")


async def measure_step_cost(url: str) -> dict[str, Any]:
    """``step_cost_ratio_10000_vs_100``: new steps of a run 10,000 steps deep against those of
    a run 100 deep, taken in turns (one step at a time) once both have replayed."""
    from tidebase_agents import Run, Tidebase

    await _runs_with_steps(url, {"deep": STEPS - WINDOW, "shallow": WINDOW})
    tide = Tidebase(url)
    turn = asyncio.Lock()
    replayed = {"deep": asyncio.Event(), "shallow": asyncio.Event()}
    took: dict[str, list[float]] = {"deep": [], "shallow": []}

    async def body(run: Run, depth: int) -> None:
        for i in range(depth):
            await run.step(f"s{i}", lambda i=i: i)  # type: ignore[misc]
        replayed[run.run_id].set()
        await asyncio.gather(*(e.wait() for e in replayed.values()))
        for i in range(depth, depth + 2 * WINDOW):
            async with turn:  # FIFO: the two runs alternate
                t0 = time.perf_counter()
                await run.step(f"s{i}", lambda i=i: i)  # type: ignore[misc]
                took[run.run_id].append(time.perf_counter() - t0)

    await asyncio.gather(
        tide.run("scale-long", body, run_id="deep", input=STEPS - WINDOW),
        tide.run("scale-long", body, run_id="shallow", input=WINDOW),
    )
    await tide.close()
    deep, shallow = took["deep"], took["shallow"]
    return {
        "step_cost_ratio_10000_vs_100": round(_median_ms(deep) / _median_ms(shallow), 3),
        "step_ms_near_100": round(_median_ms(shallow), 3),
        **_spread("step_ms_near_100", shallow),
        "step_ms_near_10000": round(_median_ms(deep), 3),
        **_spread("step_ms_near_10000", deep),
    }


async def measure_resume(url: str) -> dict[str, Any]:
    """``resume_10000_round_trips`` / ``resume_10000_ms``: a run with 10,000 finished steps
    resumed up to its first new step (median of three runs)."""
    from tidebase_agents import Run, Tidebase

    ids = [f"resume-{k}" for k in range(3)]
    await _runs_with_steps(url, dict.fromkeys(ids, STEPS))
    tide = Tidebase(url)
    store = tide.store
    await store.open()
    trips: list[int] = []
    times: list[float] = []
    for run_id in ids:
        t0, s0 = time.perf_counter(), store.statements

        def first_new(t0: float = t0, s0: int = s0) -> int:
            times.append(time.perf_counter() - t0)
            trips.append(store.statements - s0)
            return STEPS

        async def body(run: Run, n: int) -> int:
            for i in range(n):
                await run.step(f"s{i}", lambda i=i: i)  # type: ignore[misc]
            return await run.step(f"s{n}", first_new)

        await tide.run("scale-long", body, run_id=run_id, input=STEPS)
    await tide.close()
    return {
        "resume_10000_round_trips": statistics.median(trips),
        "resume_10000_ms": round(_median_ms(times), 1),
        "resume_10000_ms_max": round(max(times) * 1e3, 1),
    }


async def measure_claims(url: str) -> dict[str, Any]:
    """``claim_ratio_100k_vs_empty``: claims from a deep queue and from a near-empty one."""
    from tidebase_agents import Tidebase
    from tidebase_agents._store import QueuedRun, utcnow

    tide = Tidebase(url)
    store = tide.store
    await store.open()
    pipeline = "scale-claim"

    async def claim(queue: str) -> float:
        t0 = time.perf_counter()
        got = await store.claim(
            owner="bench", lease_seconds=60, queues=[queue], pipelines=[pipeline], limit=1
        )
        took = time.perf_counter() - t0
        assert len(got) == 1, f"nothing to claim in {queue}"
        return took

    async def put(queue: str, i: int) -> None:
        await store.enqueue(
            QueuedRun(f"{queue}-{i}", pipeline, {}, None, queue, None, 0, utcnow(), 5, None)
        )

    empty_table: list[float] = []
    for i in range(CLAIMS):
        await put("small", i)
        empty_table.append(await claim("small"))
    await _sql(
        url,
        f"INSERT INTO tidebase_runs (run_id, pipeline, status, input, queue, priority, "
        f"scheduled_at, max_attempts, created_at, updated_at, event_seq) "
        f"SELECT 'deep-' || g, '{pipeline}', 'queued', '{{}}'::jsonb, 'deep', 0, "
        f"now() - interval '1 minute', 5, now() - interval '1 minute', now(), 0 "
        f"FROM generate_series(1, {QUEUED}) g",
        "ANALYZE tidebase_runs",
    )
    deep: list[float] = []
    shallow: list[float] = []
    for i in range(CLAIMS):
        await put("small", CLAIMS + i)
        deep.append(await claim("deep"))
        shallow.append(await claim("small"))
    await tide.close()
    return {
        "claim_ratio_100k_vs_empty": round(_median_ms(deep) / _median_ms(shallow), 3),
        "claim_ratio_100k_vs_empty_table": round(_median_ms(deep) / _median_ms(empty_table), 3),
        "claim_ms_100k": round(_median_ms(deep), 3),
        **_spread("claim_ms_100k", deep),
        "claim_ms_empty": round(_median_ms(shallow), 3),
        **_spread("claim_ms_empty", shallow),
        "claim_ms_empty_table": round(_median_ms(empty_table), 3),
    }


async def _peak_connections(url: str, done: asyncio.Event) -> int:
    """The most other connections to the database seen while ``done`` is unset."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    peak = 0
    try:
        while not done.is_set():
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> "
                "pg_backend_pid()",
                database_name(url),
            )
            peak = max(peak, int(n))
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return peak


async def measure_worker(url: str) -> dict[str, Any]:
    """``worker_1000_concurrent_pps``: one worker, 1,000 runs at once, each waiting 1 s."""
    from tidebase_agents import Tidebase, checkpointed_pipeline, current_run
    from tidebase_agents._worker import Worker, WorkerOptions

    tide = Tidebase(url)

    @checkpointed_pipeline("scale-worker", tide=tide)
    async def modelled(i: int) -> int:
        async def model() -> int:
            await asyncio.sleep(MODEL_SECONDS)
            return i

        return await current_run().step("model", model)

    # Enqueued with bulk SQL, as `enqueue` records them (arguments and their hash).
    await modelled.enqueue(-1)
    template = await tide.get_run((await tide.list_runs(pipeline="scale-worker"))[0].run_id)
    conn = await asyncpg.connect(asyncpg_dsn(url), server_settings={"search_path": "tidebase"})
    try:
        await conn.executemany(
            "INSERT INTO tidebase_runs (run_id, pipeline, status, input, input_hash, queue, "
            "scheduled_at, max_attempts, created_at, updated_at, event_seq) VALUES "
            "($1, 'scale-worker', 'queued', $2::jsonb, $3, 'default', now(), 5, now(), now(), 0)",
            [
                (f"w-{i}", json.dumps({**template.input, "args": [i]}), f"bench-{i}")
                for i in range(1, WORKER_RUNS)
            ],
        )
    finally:
        await conn.close()
    worker = Worker(
        url,
        WorkerOptions(concurrency=CONCURRENCY, pipelines=["scale-worker"], poll_interval=0.5),
    )
    done = asyncio.Event()
    sampler = asyncio.create_task(_peak_connections(url, done))
    t0 = time.perf_counter()
    task = asyncio.create_task(worker.run())
    check = await asyncpg.connect(asyncpg_dsn(url), server_settings={"search_path": "tidebase"})
    try:
        while True:
            finished = await check.fetchval(
                "SELECT count(*) FROM tidebase_runs WHERE pipeline = 'scale-worker' "
                "AND status = 'completed'"
            )
            if finished >= WORKER_RUNS or time.perf_counter() - t0 > 120:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
    finally:
        await check.close()
        done.set()
        worker.stop()
        await task
    peak = await sampler
    await tide.close()
    pps = finished / elapsed
    ideal = CONCURRENCY / MODEL_SECONDS
    return {
        "worker_1000_concurrent_pps": round(pps, 1),
        "worker_1000_concurrent_pps_vs_ideal": round(pps / ideal, 3),
        "worker_1000_runs": int(finished),
        "worker_1000_seconds": round(elapsed, 2),
        "worker_1000_peak_connections": peak,
    }


async def measure_prune(url: str) -> dict[str, Any]:
    """``prune_100k_step_latency_ratio``: step latency while 100,000 ended runs are pruned."""
    from tidebase_agents import Run, Tidebase
    from tidebase_agents._store.retention import PRUNE_BATCH, PruneFilter
    from tidebase_agents._worker import PRUNE_PAUSE

    await _sql(
        url,
        f"INSERT INTO tidebase_runs (run_id, pipeline, status, queue, created_at, updated_at, "
        f"finished_at, event_seq) SELECT 'ended-' || g, 'scale-ended', 'completed', 'default', "
        f"'{LONG_AGO.isoformat()}', '{LONG_AGO.isoformat()}', '{LONG_AGO.isoformat()}', 2 "
        f"FROM generate_series(1, {PRUNED}) g",
        f"INSERT INTO tidebase_steps (run_id, name, status, input_hash, output, started_at) "
        f"SELECT 'ended-' || g, 'only', 'completed', 'h', '1'::jsonb, '{LONG_AGO.isoformat()}' "
        f"FROM generate_series(1, {PRUNED}) g",
        f"INSERT INTO tidebase_events (run_id, seq, kind, created_at) "
        f"SELECT 'ended-' || g, s, 'step_completed', '{LONG_AGO.isoformat()}' "
        f"FROM generate_series(1, {PRUNED}) g, generate_series(1, 2) s",
        f"INSERT INTO tidebase_usage (run_id, dedupe_key, model, requests, input_tokens, "
        f"total_tokens, created_at) SELECT 'ended-' || g, 'k', 'gpt-4o-mini', 1, 10, 10, "
        f"'{LONG_AGO.isoformat()}' FROM generate_series(1, {PRUNED}) g",
        "ANALYZE",
    )
    tide = Tidebase(url)
    store = tide.store
    await store.open()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def steady(run: Run, _: None) -> None:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            await run.step(f"s{i}", lambda i=i: i)  # type: ignore[misc]
            samples.append((t0, time.perf_counter() - t0))
            i += 1

    async def phases() -> tuple[float, float, int]:
        await asyncio.sleep(BASELINE_SECONDS)
        p0 = time.perf_counter()
        n = await store.prune(
            PruneFilter(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)),
            batch=PRUNE_BATCH,
            pause=PRUNE_PAUSE,
        )
        p1 = time.perf_counter()
        await asyncio.sleep(BASELINE_SECONDS)
        stop.set()
        return p0, p1, n

    _, (p0, p1, n) = await asyncio.gather(
        tide.run("scale-steady", steady, run_id="steady-1"), phases()
    )
    await tide.close()
    during = [d for t, d in samples if p0 <= t < p1]
    outside = [d for t, d in samples if t < p0 or t >= p1]
    return {
        "prune_100k_step_latency_ratio": round(_median_ms(during) / _median_ms(outside), 3),
        "prune_100k_step_ms_during": round(_median_ms(during), 3),
        **_spread("prune_100k_step_ms_during", during),
        "prune_100k_step_ms_without": round(_median_ms(outside), 3),
        **_spread("prune_100k_step_ms_without", outside),
        "prune_100k_runs": n,
        "prune_100k_seconds": round(p1 - p0, 2),
    }


MEASURES: tuple[Callable[[str], Awaitable[dict[str, Any]]], ...] = (
    measure_step_cost,
    measure_resume,
    measure_claims,
    measure_worker,
    measure_prune,
)


async def _fresh(url: str) -> None:
    from tidebase_agents import Tidebase

    await ensure_database(url, fresh=True)
    tide = Tidebase(url)
    await tide.migrate()
    await tide.close()


async def measure_all(base_url: str | None = None) -> dict[str, Any]:
    """Every key above, each measure on a freshly migrated database."""
    base = base_url or pg_url()
    url = with_database(base, database_name(base) + "_scale")
    out: dict[str, Any] = {}
    for measure in MEASURES:
        await _fresh(url)
        t0 = time.perf_counter()
        try:
            out.update(await measure(url))
        except Exception as exc:  # one failing measure must not lose the others' keys
            out[f"{measure.__name__}_error"] = f"{type(exc).__name__}: {exc}"
        out[f"{measure.__name__}_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"scale: {measure.__name__} {out[f'{measure.__name__}_wall_s']}s", file=sys.stderr)
    return out


def run(base_url: str | None = None) -> dict[str, Any]:
    """:func:`measure_all` on a fresh event loop (the hook ``bench.run`` calls)."""
    return asyncio.run(measure_all(base_url))


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
