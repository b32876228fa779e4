"""Concurrent ``Runner.run`` fan-outs of one agent over different inputs (``asyncio.gather`` or
``asyncio.as_completed``), each call preceded by an awaited random-length sleep.

Phase ``crash``: calls start in index order; odd items answer at once, even items hang inside
the model call, and the process dies (``os._exit``) as soon as three calls have returned.
Phase ``resume`` / ``clean``: calls start in *reverse* index order (plus random jitter), so every
call starts in another position than on the crashed attempt.
"""

from __future__ import annotations

import asyncio
import random
import types
from pathlib import Path
from typing import Any

from agentkit_common import crash, log_line, message, policy_model, user_text
from agents import Agent, Runner

from tidebase_agents import checkpointed_pipeline

N = 6
FINISH_BEFORE_CRASH = 3


def expected(n: int = N) -> list[str]:
    return [f"answer {i}: ITEM {i}" for i in range(n)]


def build(url: str, directory: str, *, mode: str, phase: str) -> types.SimpleNamespace:
    started: list[int] = []
    finished: list[int] = []

    async def respond(call: Any) -> Any:
        text = user_text(call)
        i = int(text.split()[-1])
        if phase == "crash" and i % 2 == 0:
            await asyncio.sleep(3600)  # still in flight when the process dies
        return message(f"answer {i}: {text.upper()}")

    model = policy_model(respond)
    worker = Agent(name="worker", instructions="Answer the item.", model=model)

    async def one(i: int, n: int) -> tuple[int, str]:
        position = i if phase == "crash" else n - 1 - i
        await asyncio.sleep(0.03 * position + random.random() * 0.01)
        started.append(i)
        result = await Runner.run(worker, f"item {i}")
        finished.append(i)
        if phase == "crash":
            log_line(Path(directory, "finished.log"), str(i))
            if len(finished) == FINISH_BEFORE_CRASH:
                log_line(Path(directory, "started.log"), " ".join(map(str, started)))
                crash()
        return i, str(result.final_output)

    @checkpointed_pipeline(f"agentkit-fanout-{mode}", database_url=url, lease_seconds=1)
    async def fanout(n: int) -> list[str]:
        if mode == "gather":
            pairs = await asyncio.gather(*(one(i, n) for i in range(n)))
            return [out for _, out in pairs]
        results: dict[int, str] = {}
        for next_done in asyncio.as_completed([one(i, n) for i in range(n)]):
            i, out = await next_done
            results[i] = out
        return [results[i] for i in range(n)]

    return types.SimpleNamespace(
        pipeline=fanout, model=model, worker=worker, started=started, finished=finished
    )


async def child(url: str, directory: str, run_id: str, mode: str) -> dict[str, Any]:
    kit = build(url, directory, mode=mode, phase="crash")
    try:
        return {"output": await kit.pipeline(N, run_id=run_id)}
    finally:
        await kit.pipeline.tide.close()
