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
import dataclasses
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


@dataclasses.dataclass
class Setup:
    """What a database-fault trial works with: a fresh database on the private cluster, the
    fault-free run to compare with, a directory for the trial's files."""

    zygote: Zygote
    cluster: PgCluster
    database: str
    url: str
    workdir: Path
    ref: Observed


@pytest.fixture
async def setup(cluster_db: tuple[PgCluster, str, str], zygote: Zygote, tmp_path: Path) -> Setup:
    cluster, database, url = cluster_db
    if not _reference:  # a fault-free run on the private cluster, once per session
        workdir = tmp_path / "reference"
        workdir.mkdir()
        result = await run_attempt(zygote, url, workdir, "reference", "reference")
        assert result.outcome == "ok", result.describe()
        _reference.append(await observe(url, "reference", workdir))
    workdir = tmp_path / "trial"
    workdir.mkdir()
    return Setup(zygote, cluster, database, url, workdir, _reference[0])


def restore(cluster: PgCluster, database: str) -> None:
    cluster.thaw()
    if not cluster.running:
        cluster.start()
    cluster.disk_ok(database)


async def faulted_attempt(
    s: Setup, run_id: str, *, kind: str, gate: str, paused: bool, rng: random.Random
) -> tuple[Attempt, str]:
    """Run an attempt that meets fault ``kind`` at ``gate``; returns how it ended and what was
    done. ``paused``: the fault is injected while the child waits at the gate (else a moment
    after the gate opened)."""
    cluster, workdir = s.cluster, s.workdir
    child = spawn_attempt(
        s.zygote, s.url, workdir, run_id, "faulted", gate=gate, lease_seconds=LEASE
    )
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
        done += f", {cluster.terminate_backends(s.database)} backends"
    elif kind == "disk_full":
        writes = rng.choice([1, 2, -1])
        cluster.disk_full(s.database, writes)
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
    restore(cluster, s.database)
    return result, done


async def recovers(s: Setup, run_id: str, checks: Checks) -> None:
    """Whatever the faulted process did, the run finishes once the database is back, as the
    fault-free run did."""
    attempts = await complete_run(s.zygote, s.url, s.workdir, run_id, checks, prefix="resume")
    print(f"{checks.where}: resumed: {[a.outcome for a in attempts]}")
    if attempts[-1].outcome == "ok":
        check_run(checks, s.ref, await observe(s.url, run_id, s.workdir))
    check_logs(checks, s.workdir)
    checks.done()


@pytest.mark.parametrize("trial", trial_indices("TIDEBASE_FAULT_DB_TRIALS", len(KINDS)))
async def test_database_fault_mid_run(trial: int, setup: Setup) -> None:
    seed = seed_of(trial)
    rng = random.Random(seed)
    if trial < len(KINDS):
        # The first round (the short run) puts each kind where it tells most: a keyed tool
        # has made its external charge and is about to checkpoint it.
        kind, paused = KINDS[trial], True
        gate = "store:write_step:before" if kind == "freeze_hold" else "tool:charge:after"
    else:
        kind, gate, paused = rng.choice(KINDS), rng.choice(GATES), rng.random() < 0.6
    where = f"database {kind} seed {seed}"
    print(f"{where}: replay with TIDEBASE_FAULT_SEED={seed} pytest {__file__} -k fault_mid_run")
    checks = Checks("database", where)
    run_id = f"db-{seed}"
    result, done = await faulted_attempt(
        setup, run_id, kind=kind, gate=gate, paused=paused, rng=rng
    )
    print(f"{where}: {done} -> {result.outcome}")
    REPORT.database_faults[kind] += 1
    if kind == "freeze_hold":
        checks.check(result.status is not None, "no_give_up_when_frozen", result.describe())
    check_attempt(checks, result)
    await recovers(setup, run_id, checks)


async def test_frozen_server_executor_gives_up_with_database_unavailable(setup: Setup) -> None:
    """A 1 s lease and a server that stops answering while a keyed tool has charged: the
    executor gives up with ``DatabaseUnavailable`` (it returns at all: the bound is a generous
    process timeout, not a measured duration); after a thaw the run resumes and completes with
    the charge made once, under one key."""
    checks = Checks("database", "frozen server, keyed tool")
    result, done = await faulted_attempt(
        setup,
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
    await recovers(setup, "frozen", checks)
