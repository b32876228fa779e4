"""The embedded database's write path: its durability setting, and a checkpoint write that
meets another connection holding SQLite's write lock (it waits off the event loop, then lands)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tidebase_agents import ConfigurationError, Tidebase


async def _synchronous(tide: Tidebase) -> int:
    async with tide.store.engine.connect() as conn:
        return int((await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one())


async def _two_steps(run: Any, inp: int) -> int:
    a = await run.step("a", lambda: inp + 1)
    return int(await run.step("b", lambda: a * 2))


async def test_sqlite_commits_at_normal_unless_configured_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    normal, full = Tidebase(url), Tidebase(url, sqlite_synchronous="full")
    assert await normal.run("p", _two_steps, run_id="n", input=1) == 4
    assert await full.run("p", _two_steps, run_id="f", input=2) == 6
    assert (await _synchronous(normal), await _synchronous(full)) == (1, 2)  # NORMAL, FULL
    assert [s.status for s in await full.steps("f")] == ["completed", "completed"]
    monkeypatch.setenv("TIDEBASE_SQLITE_SYNCHRONOUS", "FULL")
    assert await _synchronous(Tidebase(url)) == 2
    assert await _synchronous(Tidebase(url, sqlite_synchronous="NORMAL")) == 1  # argument wins
    monkeypatch.setenv("TIDEBASE_SQLITE_SYNCHRONOUS", "sometimes")
    with pytest.raises(ConfigurationError, match="sqlite_synchronous must be one of NORMAL, FULL"):
        Tidebase(url)
    await normal.close()
    await full.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_checkpoint_write_waits_for_another_writers_lock_without_blocking_the_loop(
    tmp_path: Path, synchronous: str
) -> None:
    path = tmp_path / "locked.db"
    tide = Tidebase(f"sqlite:///{path}", sqlite_synchronous=synchronous)
    assert await tide.run("p", _two_steps, run_id="warm", input=0) == 2  # migrated, connected

    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait()
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    await asyncio.to_thread(locked.wait)
    run = asyncio.ensure_future(tide.run("p", _two_steps, run_id="blocked", input=5))
    # The loop keeps running while the run's first write waits (a write blocking the loop would
    # wait out the busy timeout here and fail the run).
    await asyncio.sleep(0.2)
    assert not run.done()
    release.set()
    assert await run == 12
    holder.join()
    assert [s.status for s in await tide.steps("blocked")] == ["completed", "completed"]
    await tide.close()
