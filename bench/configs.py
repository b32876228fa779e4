"""One benchmark configuration per process: ``python -m bench.configs NAME PARAMS_JSON``.

The orchestrator (``bench/run.py``) starts a fresh interpreter for every configuration and
repeat. Each configuration prints its figures as one ``@@BENCH {json}`` line on stdout; a failure
prints ``{"error": ...}`` the same way and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from bench import ours, workload
from bench.common import asyncpg_dsn, emit, payload_1kb, quartiles, timed_loop

Params = dict[str, Any]
Config = Callable[[Params], Coroutine[Any, Any, dict[str, Any]]]
Pipeline = Callable[[str, str], Awaitable[str]]


# --------------------------------------------------------------------------- helpers


def sqlite_path(params: Params, name: str) -> Path:
    return Path(params["work_dir"]) / name


def ours_sqlite_url(params: Params) -> str:
    return f"sqlite+aiosqlite:///{sqlite_path(params, 'ours.sqlite')}"


def ours_url(params: Params, db: str) -> str:
    return str(params["pg_url"]) if db == "pg" else ours_sqlite_url(params)


async def run_checked(pipeline: Pipeline) -> None:
    out = await pipeline(workload.TOPIC, workload.new_uid())
    if out != workload.DRAFT:
        raise AssertionError(f"pipeline returned {out!r}, expected {workload.DRAFT!r}")


async def side_by_side(pipelines: dict[str, Pipeline], params: Params) -> dict[str, Any]:
    """Wall and CPU time of one pipeline of each of ``pipelines``, measured side by side in one
    process: rounds of ``batch`` pipelines of each in turn (the order alternating per round), after
    a warm-up, until ``n_pipelines`` of each have run or ``budget_s`` has passed (at least 3
    rounds). Figures per label: ``{label}_us`` and ``{label}_cpu_us`` (means over rounds), and
    ``{label}_us_p25`` / ``_p75`` (over rounds)."""
    batch, n = int(params["batch"]), int(params["n_pipelines"])
    labels = list(pipelines)
    for label in labels:
        for _ in range(params["warmup"]):
            await run_checked(pipelines[label])
    walls: dict[str, list[float]] = {label: [] for label in labels}
    cpus: dict[str, list[float]] = {label: [] for label in labels}
    start = time.perf_counter()
    rounds = 0
    while rounds * batch < n:
        for label in labels if rounds % 2 == 0 else labels[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(batch):
                await run_checked(pipelines[label])
            walls[label].append((time.perf_counter() - wall) / batch * 1e6)
            cpus[label].append((time.process_time() - cpu) / batch * 1e6)
        rounds += 1
        if rounds >= 3 and time.perf_counter() - start > params["budget_s"]:
            break
    figures: dict[str, Any] = {"n": rounds * batch}
    for label in labels:
        for suffix, values in (("us", walls[label]), ("cpu_us", cpus[label])):
            figures[f"{label}_{suffix}"] = statistics.fmean(values)
            figures[f"{label}_{suffix}_p25"], figures[f"{label}_{suffix}_p75"] = quartiles(values)
    return figures


async def with_bare(pipeline: Pipeline, params: Params) -> dict[str, Any]:
    """``pipeline`` side by side with the bare one: its time, and what it adds per pipeline
    (``overhead_us``, ``cpu_overhead_us``; p25/p75 over rounds of the per-round difference)."""
    figures = await side_by_side({"bare": workload.bare_pipeline(), "ours": pipeline}, params)
    out: dict[str, Any] = {"n": figures["n"]}
    for suffix in ("us", "cpu_us"):
        out[f"per_pipeline_{suffix}"] = figures[f"ours_{suffix}"]
        out[f"bare_per_pipeline_{suffix}"] = figures[f"bare_{suffix}"]
        out[f"overhead_{suffix}"] = figures[f"ours_{suffix}"] - figures[f"bare_{suffix}"]
        out[f"per_pipeline_{suffix}_p25"] = figures[f"ours_{suffix}_p25"]
        out[f"per_pipeline_{suffix}_p75"] = figures[f"ours_{suffix}_p75"]
    return out


async def throughput(pipeline: Pipeline, params: Params) -> dict[str, Any]:
    """Pipelines per second with C pipelines in flight at once (C in ``conc_levels``).

    C asyncio workers each run pipelines back to back until ``conc_total`` pipelines have started
    or ``budget_s`` has passed; one untimed round of C pipelines warms up each level.
    """
    figures: dict[str, Any] = {}
    total = int(params["conc_total"])
    progress = {"started": 0, "completed": 0}

    async def worker(deadline: float) -> None:
        while progress["started"] < total and time.perf_counter() < deadline:
            progress["started"] += 1
            await run_checked(pipeline)
            progress["completed"] += 1

    for level in params["conc_levels"]:
        await asyncio.gather(*(run_checked(pipeline) for _ in range(level)))
        progress.update(started=0, completed=0)
        cpu = time.process_time()
        start = time.perf_counter()
        deadline = start + params["conc_budget_s"]
        await asyncio.gather(*(worker(deadline) for _ in range(level)))
        elapsed = time.perf_counter() - start
        completed = progress["completed"]
        figures[f"pps_{level}"] = completed / elapsed
        figures[f"cpu_per_pipeline_us_{level}"] = (time.process_time() - cpu) / completed * 1e6
        figures[f"n_{level}"] = completed
    return figures


class StatementCounter:
    """Counts the statements the library sends (its own round-trip counter, which covers the
    single-statement writes that bypass SQLAlchemy's engine), and the commits and a sample of the
    statements that go through its SQLAlchemy engine."""

    def __init__(self, tide: Any, *, keep: int = 40) -> None:
        from sqlalchemy import event

        self._store = ours.library_store(tide)
        self._base = self._store.statements
        self.commits = 0
        self.sample: list[str] = []
        self._keep = keep
        sync_engine = self._store.engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", self._on_statement)
        event.listen(sync_engine, "commit", self._on_commit)

    @property
    def statements(self) -> int:
        return int(self._store.statements - self._base)

    def reset(self) -> None:
        self._base = self._store.statements
        self.commits = 0
        self.sample = []

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if len(self.sample) < self._keep:
            self.sample.append(" ".join(statement.split())[:160])

    def _on_commit(self, conn: Any) -> None:
        self.commits += 1


# --------------------------------------------------------------------------- pipelines


async def bare(params: Params) -> dict[str, Any]:
    figures = await side_by_side({"bare": workload.bare_pipeline()}, params)
    return {
        "n": figures["n"],
        "per_pipeline_us": figures["bare_us"],
        "per_pipeline_cpu_us": figures["bare_cpu_us"],
    }


async def ours_pg(params: Params) -> dict[str, Any]:
    return await with_bare(ours.make_pipeline(ours_url(params, "pg")), params)


async def ours_sqlite(params: Params) -> dict[str, Any]:
    return await with_bare(ours.make_pipeline(ours_url(params, "sqlite")), params)


async def _dbos(params: Params, system_database_url: str, measure: Config) -> dict[str, Any]:
    from bench import dbos_pipeline

    dbos_pipeline.launch(system_database_url)
    try:
        return await measure(params)
    finally:
        dbos_pipeline.shutdown()


def _dbos_sqlite_url(params: Params) -> str:
    return f"sqlite:///{sqlite_path(params, 'dbos.sqlite')}"


async def dbos_pg(params: Params) -> dict[str, Any]:
    from bench import dbos_pipeline

    measure = partial(with_bare, dbos_pipeline.research)
    return await _dbos(params, params["dbos_pg_url"], measure)


async def dbos_sqlite(params: Params) -> dict[str, Any]:
    from bench import dbos_pipeline

    measure = partial(with_bare, dbos_pipeline.research)
    return await _dbos(params, _dbos_sqlite_url(params), measure)


# --------------------------------------------------------------------------- floors


async def floor_pg(params: Params) -> dict[str, Any]:
    """One ~1 KB JSONB INSERT committed on its own (autocommit), and ``SELECT 1``, via asyncpg."""
    import asyncpg

    body = json.dumps(payload_1kb(0))
    conn = await asyncpg.connect(asyncpg_dsn(params["pg_url"]))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, body jsonb NOT NULL)"
        )

        async def insert() -> None:
            await conn.execute("INSERT INTO bench_floor (body) VALUES ($1::jsonb)", body)

        async def select1() -> None:
            await conn.fetchval("SELECT 1")

        n, warmup, budget = params["n_floor"], params["warmup"], params["budget_s"]
        ins = await timed_loop(insert, n=n, warmup=warmup, budget_s=budget)
        sel = await timed_loop(select1, n=n, warmup=warmup, budget_s=budget)
        return {
            "insert_commit_us": ins.mean_us,
            "select1_us": sel.mean_us,
            "n": ins.n,
            "payload_bytes": len(body),
        }
    finally:
        await conn.close()


async def floor_sqlite(params: Params) -> dict[str, Any]:
    """One ~1 KB INSERT + COMMIT via aiosqlite in WAL mode, at the default ``synchronous``
    (FULL) and at ``synchronous=NORMAL``."""
    import aiosqlite

    body = json.dumps(payload_1kb(0))
    figures: dict[str, Any] = {"payload_bytes": len(body)}
    async with aiosqlite.connect(sqlite_path(params, "floor.sqlite")) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"
        )
        await db.commit()

        async def insert() -> None:
            await db.execute("INSERT INTO bench_floor (body) VALUES (?)", (body,))
            await db.commit()

        for label, pragma in (("insert_commit_us", "FULL"), ("insert_commit_normal_us", "NORMAL")):
            await db.execute(f"PRAGMA synchronous={pragma}")
            timing = await timed_loop(
                insert, n=params["n_floor"], warmup=params["warmup"], budget_s=params["budget_s"]
            )
            figures[label] = timing.mean_us
            figures["n"] = timing.n
    # The same through the stdlib driver on the calling thread (no aiosqlite thread hop): the
    # library's own write path.
    direct = sqlite3.connect(sqlite_path(params, "floor.sqlite"), isolation_level=None)
    try:
        direct.execute("PRAGMA synchronous=NORMAL")

        async def insert_direct() -> None:
            direct.execute("BEGIN IMMEDIATE")
            direct.execute("INSERT INTO bench_floor (body) VALUES (?)", (body,))
            direct.execute("COMMIT")

        timing = await timed_loop(
            insert_direct, n=params["n_floor"], warmup=params["warmup"], budget_s=params["budget_s"]
        )
        figures["insert_commit_direct_normal_us"] = timing.mean_us
    finally:
        direct.close()
    return figures


# --------------------------------------------------------------------------- explicit steps


async def sqlite_synchronous(async_engine: Any) -> int:
    """``PRAGMA synchronous`` on the library's SQLite connections (1 NORMAL, 2 FULL)."""
    async with async_engine.connect() as conn:
        result = await conn.exec_driver_sql("PRAGMA synchronous")
        return int(result.scalar_one())


async def _steps(params: Params, db: str) -> dict[str, Any]:
    """Per-step cost of ``run.step``: (run with N steps - run with 0 steps) / N, trivial steps
    (no side effects, ~1 KB outputs) and the same steps with ``side_effects`` declared."""
    tide = ours.make_tidebase(ours_url(params, db))
    n_steps = params["steps"]

    async def body(run: Any, inp: dict[str, Any]) -> int:
        options: dict[str, Any] = {}
        if inp["side_effects"]:
            options["side_effects"] = list(ours.SIDE_EFFECTS)
        for i in range(inp["steps"]):
            await run.step(f"step-{i}", partial(payload_1kb, i), input={"i": i}, **options)
        return int(inp["steps"])

    kinds = {"empty": (0, False), "trivial": (n_steps, False), "side_effect": (n_steps, True)}
    totals = dict.fromkeys(kinds, 0.0)
    cpu_totals = dict.fromkeys(kinds, 0.0)
    try:
        for rnd in range(params["step_runs"] + 1):  # round 0 is the warm-up
            for kind, (steps, side_effects) in kinds.items():
                inp = {"steps": steps, "side_effects": side_effects}
                run_id = f"bench-steps-{kind}-{uuid.uuid4().hex}"
                cpu = time.process_time()
                start = time.perf_counter()
                result = await tide.run("bench-steps", body, run_id=run_id, input=inp)
                elapsed = time.perf_counter() - start
                if result != steps:
                    raise AssertionError(f"run returned {result!r}, expected {steps}")
                if rnd:
                    totals[kind] += elapsed
                    cpu_totals[kind] += time.process_time() - cpu
        sync_mode = await sqlite_synchronous(ours.library_engine(tide)) if db == "sqlite" else None
    finally:
        await ours.close_tidebase(tide)
    runs = params["step_runs"]
    mean_run_us = {kind: total / runs * 1e6 for kind, total in totals.items()}
    cpu_run_us = {kind: total / runs * 1e6 for kind, total in cpu_totals.items()}
    return {
        "trivial_step_cpu_us": (cpu_run_us["trivial"] - cpu_run_us["empty"]) / n_steps,
        "side_effect_step_cpu_us": (cpu_run_us["side_effect"] - cpu_run_us["empty"]) / n_steps,
        "empty_run_us": mean_run_us["empty"],
        "trivial_step_us": (mean_run_us["trivial"] - mean_run_us["empty"]) / n_steps,
        "side_effect_step_us": (mean_run_us["side_effect"] - mean_run_us["empty"]) / n_steps,
        "steps_per_run": n_steps,
        "runs": runs,
        **({"sqlite_synchronous": sync_mode} if sync_mode is not None else {}),
    }


async def steps_pg(params: Params) -> dict[str, Any]:
    return await _steps(params, "pg")


async def steps_sqlite(params: Params) -> dict[str, Any]:
    return await _steps(params, "sqlite")


# --------------------------------------------------------------------------- resume

RESUME_PIPELINE = "bench-resume"


class ResumeBody:
    """``fn(run, input)`` for the resume benchmark: ``input["steps"]`` completed ~1 KB steps, then
    one new step. With ``hold`` set, it stops after the completed steps and waits forever,
    keeping its lease, until the process dies."""

    def __init__(self, *, hold: asyncio.Event | None = None) -> None:
        self.hold = hold
        self.replayed_fn_calls = 0
        self.first_new_step: tuple[float, int, int] | None = None
        self.counter: StatementCounter | None = None

    def _completed_step(self, i: int) -> dict[str, Any]:
        self.replayed_fn_calls += 1
        return payload_1kb(i)

    def _new_step(self) -> str:
        counter = self.counter
        statements, commits = (counter.statements, counter.commits) if counter else (0, 0)
        self.first_new_step = (time.perf_counter(), statements, commits)
        return "new"

    async def __call__(self, run: Any, inp: dict[str, Any]) -> str:
        for i in range(inp["steps"]):
            await run.step(f"step-{i}", partial(self._completed_step, i), input={"i": i})
        if self.hold is not None:
            self.hold.set()
            await asyncio.Event().wait()
        return str(await run.step("new-step", self._new_step))


async def _resume_prepare(params: Params, db: str) -> dict[str, Any]:
    """Record a run of ``resume_steps`` completed steps, then die holding its lease (``os._exit``:
    no lease release, no cleanup)."""
    tide = ours.make_tidebase(ours_url(params, db), lease_seconds=params["lease_seconds"])
    inp = {"steps": params["resume_steps"]}
    start = time.perf_counter()
    hold = asyncio.Event()
    body = ResumeBody(hold=hold)
    task = asyncio.create_task(tide.run(RESUME_PIPELINE, body, run_id=params["run_id"], input=inp))
    waiter = asyncio.create_task(hold.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():  # the run ended instead of holding: surface its error
        waiter.cancel()
        task.result()
        raise AssertionError("the resume run completed during preparation")
    emit({"prepare_s": time.perf_counter() - start, "died_at": time.time()})
    os._exit(0)


async def _noop(run: Any, inp: Any) -> None:
    return None


async def _resume(params: Params, db: str) -> dict[str, Any]:
    """Re-invoke the dead run once its lease has expired, from a fresh process whose library is
    warm (an empty run first connects the pool and checks the schema: reported as
    ``first_use_*``). Time and statements from ``tide.run(...)`` until the first new step's
    function runs, and until the run returns."""
    delay = params["not_before"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    tide = ours.make_tidebase(ours_url(params, db), lease_seconds=params["lease_seconds"])
    counter = StatementCounter(tide)
    run_locked = ours.run_locked_error()
    inp = {"steps": params["resume_steps"]}
    try:
        start = time.perf_counter()
        first_id = f"bench-first-use-{uuid.uuid4().hex}"
        await tide.run("bench-first-use", _noop, run_id=first_id, input={})
        first_use = {"ms": (time.perf_counter() - start) * 1e3, "statements": counter.statements}
        lock_retries = 0
        while True:
            body = ResumeBody()
            body.counter = counter
            counter.reset()
            start = time.perf_counter()
            try:
                result = await tide.run(RESUME_PIPELINE, body, run_id=params["run_id"], input=inp)
                break
            except run_locked:
                lock_retries += 1
                if lock_retries > 3:
                    raise
                await asyncio.sleep(params["lease_seconds"])
        end = time.perf_counter()
    finally:
        await ours.close_tidebase(tide)
    if result != "new" or body.first_new_step is None:
        raise AssertionError(f"resumed run returned {result!r} without its new step")
    first_at, first_statements, first_commits = body.first_new_step
    return {
        "ms_to_first_new_step": (first_at - start) * 1e3,
        "statements_to_first_new_step": first_statements,
        "commits_to_first_new_step": first_commits,
        "ms_to_complete": (end - start) * 1e3,
        "statements_to_complete": counter.statements,
        "commits_to_complete": counter.commits,
        "replayed_fn_calls": body.replayed_fn_calls,
        "lock_retries": lock_retries,
        "first_use_ms": first_use["ms"],
        "first_use_statements": first_use["statements"],
        "statement_sample": counter.sample,
    }


async def resume_prepare_pg(params: Params) -> dict[str, Any]:
    return await _resume_prepare(params, "pg")


async def resume_prepare_sqlite(params: Params) -> dict[str, Any]:
    return await _resume_prepare(params, "sqlite")


async def resume_pg(params: Params) -> dict[str, Any]:
    return await _resume(params, "pg")


async def resume_sqlite(params: Params) -> dict[str, Any]:
    return await _resume(params, "sqlite")


# --------------------------------------------------------------------------- concurrency


async def conc_bare(params: Params) -> dict[str, Any]:
    return await throughput(workload.bare_pipeline(), params)


async def conc_ours_pg(params: Params) -> dict[str, Any]:
    pipeline = ours.make_pipeline(ours_url(params, "pg"))
    figures = await throughput(pipeline, params)
    return {**figures, **ours.group_commits(pipeline)}


async def conc_ours_sqlite(params: Params) -> dict[str, Any]:
    return await throughput(ours.make_pipeline(ours_url(params, "sqlite")), params)


async def conc_dbos_pg(params: Params) -> dict[str, Any]:
    from bench import dbos_pipeline

    measure = partial(throughput, dbos_pipeline.research)
    return await _dbos(params, params["dbos_pg_url"], measure)


# --------------------------------------------------------------------------- recovery


async def recovery_pg(params: Params) -> dict[str, Any]:
    """Kill of a worker holding a run, until another worker resumes it (``bench.recovery``)."""
    from bench import recovery

    return await recovery.measure_ours({**params, "tag": uuid.uuid4().hex[:8]})


async def recovery_dbos_pg(params: Params) -> dict[str, Any]:
    """DBOS: launch of a new process until it recovers the killed one's workflow."""
    from bench import recovery

    return await recovery.measure_dbos({**params, "tag": uuid.uuid4().hex[:8]})


# --------------------------------------------------------------------------- setup


async def migrate(params: Params) -> dict[str, Any]:
    """Migrate ``params["database_url"]`` through the library's API (the CLI's fallback)."""
    await ours.migrate_api(params["database_url"])
    return {"migrated": True}


CONFIGS: dict[str, Config] = {
    "migrate": migrate,
    "bare": bare,
    "ours_pg": ours_pg,
    "ours_sqlite": ours_sqlite,
    "dbos_pg": dbos_pg,
    "dbos_sqlite": dbos_sqlite,
    "floor_pg": floor_pg,
    "floor_sqlite": floor_sqlite,
    "steps_pg": steps_pg,
    "steps_sqlite": steps_sqlite,
    "resume_prepare_pg": resume_prepare_pg,
    "resume_prepare_sqlite": resume_prepare_sqlite,
    "resume_pg": resume_pg,
    "resume_sqlite": resume_sqlite,
    "conc_bare": conc_bare,
    "conc_ours_pg": conc_ours_pg,
    "conc_ours_sqlite": conc_ours_sqlite,
    "conc_dbos_pg": conc_dbos_pg,
    "recovery_pg": recovery_pg,
    "recovery_dbos_pg": recovery_dbos_pg,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in CONFIGS:
        sys.stderr.write(f"usage: python -m bench.configs {{{','.join(CONFIGS)}}} PARAMS_JSON\n")
        return 2
    name, params = argv[0], json.loads(argv[1])
    try:
        figures = asyncio.run(CONFIGS[name](params))
    except BaseException as exc:  # report every failure, including SystemExit from libraries
        emit({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
