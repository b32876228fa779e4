"""Group commit on PostgreSQL: step writes of concurrent runs share round trips, and each write
still answers to its own lease (R6, R12) with its side effect fired at most once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from wk_support import assert_gap_free

from tidebase_agents import Run, RunCancelled, StepStatus, Tidebase
from tidebase_agents._store import sql

pytestmark = pytest.mark.postgres

RUNS = 36
CANCELLED = 4  # their intents queue behind the others' and go out in batches


async def test_batched_intents_land_each_run_once_and_a_cancelled_run_fires_nothing(
    pg_url: str,
) -> None:
    tide = Tidebase(pg_url)
    gate = asyncio.Event()
    waiting = 0
    charged: Counter[str] = Counter()

    async def body(run: Run, late: bool) -> list[int]:
        nonlocal waiting
        waiting += 1
        await gate.wait()
        for _ in range(3 if late else 0):
            await asyncio.sleep(0)  # behind the writes of the runs released with it

        def charge() -> str:
            charged[run.run_id] += 1
            return f"charged {run.run_id}"

        await run.step("charge", charge, side_effects=["billing"], idempotency_key=run.run_id)
        return [await run.step(f"s{i}", lambda i=i: i * i) for i in range(4)]

    ids = [f"gc-{n}" for n in range(RUNS)]
    cancelled = set(ids[-CANCELLED:])
    tasks = {
        run_id: asyncio.create_task(
            tide.run("group", body, run_id=run_id, input=run_id in cancelled)
        )
        for run_id in ids
    }
    while waiting < RUNS:
        await asyncio.sleep(0.01)
    for run_id in cancelled:
        assert await tide.cancel(run_id) == "cancelled"
    gate.set()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    outcomes = dict(zip(ids, results, strict=True))

    store = tide.store
    group = store._grouped[sql.WRITE_STEP]
    assert group.batches > 0 and group.batched_writes > group.batches  # batches were sent
    for run_id in ids:
        steps = {s.name: s for s in await tide.steps(run_id)}
        kinds = await assert_gap_free(store, run_id)
        if run_id in cancelled:
            assert isinstance(outcomes[run_id], RunCancelled), outcomes[run_id]
            assert charged[run_id] == 0  # its fence refused the intent: nothing fired
            assert "charge" not in steps and kinds[-1] == "run_cancelled"
        else:
            assert outcomes[run_id] == [0, 1, 4, 9]
            assert charged[run_id] == 1
            assert steps["charge"].status == StepStatus.COMPLETED
            assert steps["charge"].attempts == 1
            assert kinds.count("step_started") == 1
            assert (await tide.get_run(run_id)).status == "completed"
    await tide.close()
