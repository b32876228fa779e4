"""Pipelines for worker subprocesses (``tidebase-agents worker --app wk_app:tide``).

Configured by environment variables so one module serves every worker test:

- ``TIDEBASE_DATABASE_URL``: the database (the worker sets it from ``--database-url``).
- ``WK_LEASE``: lease seconds of the shared :class:`Tidebase` (default 2).
- ``WK_THINK``: seconds the ``think`` step of ``wk-order`` takes (default 0.2).
- ``WK_HANG_AFTER``: after this many ``think`` steps, every further one writes a marker file
  ``hang-<pid>-<run id>`` into ``WK_MARKERS`` and hangs, so a test can SIGKILL the worker while
  known steps run.
- ``WK_HANG_STEP``: comma list of ``step:n`` (``charge:1001,notify:1002``): that side-effecting
  step of ``wk-order(n)`` hangs after its external call was made (marker
  ``hang-<step>-<run id>``), so a SIGKILL leaves it in doubt.

External calls are rows in the table ``wk_calls`` of the same PostgreSQL database (the test
creates it), so a test can count how often each one really happened.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg

from tidebase_agents import Tidebase, checkpointed_pipeline, current_run

tide = Tidebase(lease_seconds=float(os.environ.get("WK_LEASE", "2")))
_thinks = 0


def _dsn() -> str:
    url = os.environ["TIDEBASE_DATABASE_URL"]
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def external_call(kind: str, run_id: str, key: str | None) -> None:
    """The side effect: one row in ``wk_calls`` per call that really happened."""
    conn = await asyncpg.connect(_dsn())
    try:
        await conn.execute(
            "INSERT INTO wk_calls (kind, run_id, key, pid) VALUES ($1, $2, $3, $4)",
            kind,
            run_id,
            key,
            os.getpid(),
        )
    finally:
        await conn.close()


async def _hang(marker: str) -> None:
    Path(os.environ["WK_MARKERS"], marker).write_text(str(os.getpid()))
    await asyncio.sleep(3600)


async def _think(n: int, run_id: str) -> int:
    global _thinks
    _thinks += 1
    hang_after = os.environ.get("WK_HANG_AFTER")
    if hang_after is not None and _thinks > int(hang_after):
        await _hang(f"hang-{os.getpid()}-{run_id}")
    await asyncio.sleep(float(os.environ.get("WK_THINK", "0.2")))
    return n * 2


async def _effect(kind: str, n: int, run_id: str, key: str | None) -> str:
    await external_call(kind, run_id, key)
    if f"{kind}:{n}" in os.environ.get("WK_HANG_STEP", "").split(","):
        await _hang(f"hang-{kind}-{run_id}")
    return f"{kind}-ok"


@checkpointed_pipeline("wk-order", tide=tide)
async def order(n: int) -> str:
    """think (pure), charge (external write with an idempotency key), notify (unkeyed write)."""
    run = current_run()
    doubled = await run.step("think", lambda: _think(n, run.run_id), input=n)
    key = f"charge-{run.run_id}"
    await run.step(
        "charge",
        lambda: _effect("charge", n, run.run_id, key),
        side_effects=["payments"],
        idempotency_key=key,
    )
    await run.step("notify", lambda: _effect("notify", n, run.run_id, None), side_effects=["mail"])
    return f"order {n}: {doubled}"
