"""Database faults mid-run, on a private PostgreSQL cluster (``support/pgcluster.py``).

Each trial starts the ``orders`` pipeline (``support/fault_kit.py``) in a fresh process with a
1 s lease, pauses it at a gate (inside a keyed tool body before or after its external charge, in
a model call, before a checkpoint write, ...), and injects one fault there or a moment after the
gate opens: a server restart, a SIGKILL of the postmaster followed by a start (crash recovery),
a freeze (SIGSTOP of every server process) longer than the lease then a thaw, a freeze held
until the executor gives up, ``pg_terminate_backend`` of the run's connections, or "disk full"
(SQLSTATE 53100) on the next step writes.

Per trial: the faulted process ends with the library's own error (``DatabaseUnavailable``,
``LeaseLost``, ...) or completes the run, never with a raw driver error, never a hang; a
failure of the library's machinery inside a durable tool never reaches the model (R15); after
the fault, resuming in fresh processes completes with the fault-free output, each keyed charge
happened once under one key, and the other run invariants hold (``fault_trials.check_run``).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from fault_report import REPORT, Checks
from fault_trials import (
    Attempt,
    Observed,
    check_attempt,
    check_logs,
    check_run,
    complete_run,
    finish,
    observe,
    open_gate,
    run_attempt,
    seed_of,
    spawn_attempt,
    trial_indices,
    wait_gate,
)
from pgcluster import PgCluster
from zygote import Zygote

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

KINDS = (
    "restart",
    "kill9_start",
    "freeze_thaw",
    "freeze_hold",
    "terminate_backends",
    "disk_full",
)
GATES = (
    "tool:charge:after",
    "tool:charge:before",
    "tool:reserve:after",
    "tool:notify:before",
    "model:clerk",
    "step:ship:after",
    "store:write_step:before",
    "pipeline:planned",
)
LEASE = 1.0
#: How long an executor facing a frozen server may take to give up: generous, so that this is
#: a bound on "it returns at all", not a timing assertion.
HOLD_TIMEOUT = 45.0
ATTEMPT_TIMEOUT = 90.0

_reference: list[Observed] = []


async def reference(zygote: Zygote, url: str, tmp_path: Path) -> Observed:
    """A fault-free run on the private cluster (once per session)."""
    if not _reference:
        workdir = tmp_path / "reference"
        workdir.mkdir()
        result = await run_attempt(zygote, url, workdir, "reference", "reference")
        assert result.outcome == "ok", result.describe()
        _reference.append(await observe(url, "reference", workdir))
    return _reference[0]


def restore(cluster: PgCluster, database: str) -> None:
    cluster.thaw()
    if not cluster.running:
        cluster.start()
    cluster.disk_ok(database)


async def faulted_attempt(
    zygote: Zygote,
    cluster: PgCluster,
    database: str,
    url: str,
    workdir: Path,
    run_id: str,
    *,
    kind: str,
    gate: str,
    paused: bool,
    rng: random.Random,
) -> tuple[Attempt, str]:
    """Run an attempt that meets fault ``kind`` at ``gate``; returns how it ended and what was
    done. ``paused``: the fault is injected while the child waits at the gate (else a moment
    after the gate opened)."""
    child = spawn_attempt(zygote, url, workdir, run_id, "faulted", gate=gate, lease_seconds=LEASE)
    if not await wait_gate(child, workdir):
        return await finish(child, "faulted", ATTEMPT_TIMEOUT), "the gate was never reached"
    if not paused:
        open_gate(workdir)
        await asyncio.sleep(rng.uniform(0, 0.3))
    done = f"{kind} at {gate} ({'paused' if paused else 'running'})"
    timeout = ATTEMPT_TIMEOUT
    if kind == "restart":
        cluster.restart()
    elif kind == "kill9_start":
        cluster.kill9()
        cluster.start()
    elif kind == "terminate_backends":
        done += f", {cluster.terminate_backends(database)} backends"
    elif kind == "disk_full":
        writes = rng.choice([1, 2, -1])
        cluster.disk_full(database, writes)
        done += f", {writes if writes > 0 else 'all'} step writes fail"
    else:
        cluster.freeze()
    open_gate(workdir)
    if kind == "freeze_thaw":
        frozen = rng.uniform(1.5, 3.0) * LEASE
        await asyncio.sleep(frozen)
        cluster.thaw()
        done += f" for {frozen:.1f} s"
    elif kind == "freeze_hold":
        timeout = HOLD_TIMEOUT
    result = await finish(child, "faulted", timeout)
    restore(cluster, database)
    return result, done


@pytest.mark.parametrize("trial", trial_indices("TIDEBASE_FAULT_DB_TRIALS", len(KINDS)))
async def test_database_fault_mid_run(
    trial: int,
    cluster_db: tuple[PgCluster, str, str],
    zygote: Zygote,
    tmp_path: Path,
) -> None:
    cluster, database, url = cluster_db
    seed = seed_of(trial)
    rng = random.Random(seed)
    kind = KINDS[trial % len(KINDS)] if trial < len(KINDS) else rng.choice(KINDS)
    gate, paused = rng.choice(GATES), rng.random() < 0.6
    where = f"database {kind} seed {seed}"
    print(f"{where}: replay with TIDEBASE_FAULT_SEED={seed} pytest {__file__} -k fault_mid_run")
    ref = await reference(zygote, url, tmp_path)
    workdir = tmp_path / "trial"
    workdir.mkdir()
    run_id = f"db-{seed}"
    checks = Checks("database", where)
    result, done = await faulted_attempt(
        zygote,
        cluster,
        database,
        url,
        workdir,
        run_id,
        kind=kind,
        gate=gate,
        paused=paused,
        rng=rng,
    )
    print(f"{where}: {done} -> {result.outcome}")
    REPORT.database_faults[kind] += 1
    if kind == "freeze_hold":
        checks.check(result.status is not None, "no_give_up_when_frozen", result.describe())
    check_attempt(checks, result)
    # Whatever the faulted process did, the run must finish once the database is back.
    attempts = await complete_run(zygote, url, workdir, run_id, checks, prefix="resume")
    print(f"{where}: resumed: {[a.outcome for a in attempts]}")
    if attempts[-1].outcome == "ok":
        check_run(checks, ref, await observe(url, run_id, workdir))
    check_logs(checks, workdir)
    checks.done()


async def test_frozen_server_executor_gives_up_with_database_unavailable(
    cluster_db: tuple[PgCluster, str, str], zygote: Zygote, tmp_path: Path
) -> None:
    """A 1 s lease and a server that stops answering while a keyed tool has charged: the
    executor gives up with ``DatabaseUnavailable`` (it returns at all: the bound is a generous
    process timeout, not a measured duration); after a thaw the run resumes and completes with
    the charge made once, under one key."""
    cluster, database, url = cluster_db
    ref = await reference(zygote, url, tmp_path)
    workdir = tmp_path / "trial"
    workdir.mkdir()
    checks = Checks("database", "frozen server, keyed tool")
    result, done = await faulted_attempt(
        zygote,
        cluster,
        database,
        url,
        workdir,
        "frozen",
        kind="freeze_hold",
        gate="tool:charge:after",
        paused=True,
        rng=random.Random(0),
    )
    REPORT.database_faults["freeze_hold"] += 1
    checks.check(result.status is not None, "no_give_up_when_frozen", result.describe())
    checks.check(
        result.outcome == "DatabaseUnavailable",
        "frozen_server_not_database_unavailable",
        f"{done}: {result.describe()}",
    )
    attempts = await complete_run(zygote, url, workdir, "frozen", checks, prefix="resume")
    if attempts[-1].outcome == "ok":
        check_run(checks, ref, await observe(url, "frozen", workdir))
    check_logs(checks, workdir)
    checks.done()
