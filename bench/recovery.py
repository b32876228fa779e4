"""Recovery after a kill: how long until another process runs a killed executor's run again.

``recovery_after_kill_ms`` (ours): two ``tidebase-agents`` workers with default options serve
one pipeline; the one that claimed an enqueued run is SIGKILLed inside its only step, and the
figure is the time from the kill until the other worker's execution of that step has started.
The lease is the default 30 s, so the figure shows how soon the death is proven, not the lease.

``dbos_launch_to_recovery_ms`` (DBOS, same machine and database server): a process that started
a workflow is SIGKILLed inside its step; a new process launches DBOS, which recovers the
workflows of the dead executor; the figure is the time from starting that process until the
recovered step runs again (interpreter start and imports included, as for a restarted service).

``python -m bench.recovery worker|dbos ROLE PARAMS_JSON`` is the child side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "bench-recovery"


def _marker(params: dict[str, Any], name: str, tag: str | None = None) -> Path:
    return Path(params["work_dir"]) / f"recovery-{tag or params['tag']}-{name}"


async def _hold_or_mark(params: dict[str, Any], tag: str) -> str:
    """The step of the run tagged ``tag``: the victim marks that it holds the run and hangs;
    anyone else marks the time it started the step again."""
    if os.environ.get("BENCH_ROLE") == "victim":
        _marker(params, "held", tag).write_text(str(os.getpid()))
        await asyncio.sleep(3600)
    _marker(params, "resumed", tag).write_text(repr(time.time()))
    return "resumed"


def _pipeline(params: dict[str, Any]) -> Any:
    from tidebase_agents import checkpointed_pipeline, current_run

    @checkpointed_pipeline(PIPELINE, database_url=params["pg_url"])
    async def recover_me(tag: str) -> str:
        return str(await current_run().step("hold", lambda: _hold_or_mark(params, tag)))

    return recover_me


def _child(kind: str, role: str, params: dict[str, Any]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "BENCH_ROLE": role,
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bench.recovery", kind, role, json.dumps(params)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(Path(params["work_dir"]) / f"recovery-{params['tag']}-{role}.log").open("ab"),
    )


async def _wait(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear in {timeout:.0f} s")
        await asyncio.sleep(0.005)


async def measure_ours(params: dict[str, Any]) -> dict[str, Any]:
    pipeline = _pipeline(params)
    victim = _child("worker", "victim", params)
    other: subprocess.Popen[bytes] | None = None
    run_id = None
    try:
        run_id = await pipeline.enqueue(params["tag"])
        await _wait(_marker(params, "held"))
        other = _child("worker", "rescuer", params)
        await _wait(_marker(params, "ready-rescuer"))
        await asyncio.sleep(1.0)  # let its first loops run, as in a worker that has been up
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        await _wait(_marker(params, "resumed"), timeout=60)
        resumed_at = float(_marker(params, "resumed").read_text())
        return {"recovery_after_kill_ms": (resumed_at - killed_at) * 1000}
    finally:
        for proc in (victim, other):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if run_id is not None:  # the next repeat's workers must not find it
            await pipeline.tide.cancel(run_id)
        await pipeline.tide.close()


async def measure_dbos(params: dict[str, Any]) -> dict[str, Any]:
    victim = _child("dbos", "victim", params)
    rescuer: subprocess.Popen[bytes] | None = None
    try:
        await _wait(_marker(params, "held"))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        launched_at = time.time()
        rescuer = _child("dbos", "rescuer", params)
        await _wait(_marker(params, "resumed"), timeout=60)
        resumed_at = float(_marker(params, "resumed").read_text())
        return {"dbos_launch_to_recovery_ms": (resumed_at - launched_at) * 1000}
    finally:
        for proc in (victim, rescuer):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


async def _worker(params: dict[str, Any]) -> None:
    from tidebase_agents._worker import Worker, WorkerOptions

    _pipeline(params)
    worker = Worker(params["pg_url"], WorkerOptions(pipelines=[PIPELINE]))  # default options
    task = asyncio.create_task(worker.run())
    while not worker.listening:  # up: it claimed once and listens for notifications
        await asyncio.sleep(0.01)
    _marker(params, f"ready-{os.environ['BENCH_ROLE']}").write_text(str(os.getpid()))
    await task


async def _dbos(params: dict[str, Any]) -> None:
    from dbos import DBOS, DBOSConfig

    @DBOS.step()
    async def hold(tag: str) -> str:
        return await _hold_or_mark(params, tag)

    @DBOS.workflow()
    async def hold_workflow(tag: str) -> str:
        return await hold(tag)

    config: DBOSConfig = {
        "name": "tidebase-bench-recovery",
        "system_database_url": params["dbos_pg_url"],
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()  # recovers the pending workflows of this executor (the dead victim's)
    if os.environ.get("BENCH_ROLE") == "victim":
        await hold_workflow(params["tag"])
    await asyncio.sleep(3600)


def main(argv: list[str]) -> None:
    kind, _role, params = argv[0], argv[1], json.loads(argv[2])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(_worker(params) if kind == "worker" else _dbos(params))


if __name__ == "__main__":
    main(sys.argv[1:])
