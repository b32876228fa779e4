"""On SQLite a pipeline cancelled while its checkpoint write waits for the database lock, and
cancelled again, lets the process exit, and its run resumes later with nothing lost.

A database call cancelled midway makes SQLAlchemy tear the aiosqlite connection down in a
shielded task; cancelling that task too (a second cancellation, or ``asyncio.run`` ending) left
aiosqlite's close waiting forever on its already stopped thread, so the process never exited.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from harness import run_child

from tidebase_agents import Tidebase

CHILD = textwrap.dedent(
    """
    import asyncio, sqlite3, sys
    from tidebase_agents import Tidebase
    from tidebase_agents._sdk import install

    install()  # loaded up front, so the run reaches the database at once

    url, path = sys.argv[1], sys.argv[2]

    async def pipeline(run, _input):
        await run.step("first", lambda: 1)
        await run.step("second", lambda: 2, side_effects=["x"], idempotency_key="k")
        return "done"

    async def main():
        tide = Tidebase(url, lease_seconds=0.5)
        await tide.migrate()
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # every write of the run waits for this lock
        task = asyncio.create_task(tide.run("cancelled", pipeline, run_id="c1"))
        await asyncio.sleep(0.5)
        task.cancel()  # while the run's first write waits for the lock
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.sleep(0.5)
        asyncio.get_running_loop().call_later(1.0, holder.execute, "COMMIT")
        print("returning", flush=True)  # with the cancelled write still in flight

    asyncio.run(main())
    print("exited", flush=True)
    """
)


async def test_a_twice_cancelled_pipeline_lets_the_process_exit_and_its_run_resumes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cancel.db"
    url = f"sqlite:///{path}"
    child = run_child(CHILD, url, str(path), timeout=60)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["returning", "exited"]

    async def pipeline(run: object, _input: object) -> str:
        await run.step("first", lambda: 1)  # type: ignore[attr-defined]
        await run.step("second", lambda: 2, side_effects=["x"], idempotency_key="k")  # type: ignore[attr-defined]
        return "done"

    tide = Tidebase(url, lease_seconds=0.5)
    try:
        from agentkit_common import until_unlocked

        assert await until_unlocked(lambda: tide.run("cancelled", pipeline, run_id="c1")) == "done"
    finally:
        await tide.close()
