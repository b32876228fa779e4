"""The explicit step API: the seed document's example with only its import line changed.

    python cookbook/explicit_steps.py

``tide.run`` starts or resumes a run; ``run.step`` checkpoints each unit of work. The first
process dies after the "research" step; the second replays it and runs "draft".
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _offline import ModelCall, last_user_text, model, reply
from agents import Agent, Runner

from tidebase_agents import AsyncTidebase

tide = AsyncTidebase()

researcher = Agent(
    name="researcher",
    instructions="Research the topic and return key findings.",
    model=model(lambda call: reply("Findings: " + last_user_text(call))),
)


def _draft(call: ModelCall) -> object:
    print("  (the writer's model is called)")
    return reply("Post: " + last_user_text(call).split("\n", 1)[-1])


writer = Agent(
    name="writer",
    instructions="Turn findings into a short publishable post.",
    model=model(_draft),
)


async def pipeline(run, input):
    findings = await run.step(
        "research",
        lambda: Runner.run(researcher, f"Research: {input['topic']}"),
        input={"topic": input["topic"]},
    )
    if os.environ.get("CRASH_AFTER_RESEARCH"):
        print("  research is checkpointed; the process dies now", flush=True)
        os._exit(1)

    draft = await run.step(
        "draft",
        lambda: Runner.run(writer, f"Write a post from:\n{findings.final_output}"),
        input={"findings": findings.final_output},
    )

    await run.state_set({"phase": "done"})
    return draft.final_output


async def attempt(run_id: str) -> None:
    result = await tide.run(
        "research-pipeline", pipeline, run_id=run_id, input={"topic": "durable agents"}
    )
    print(f"  {result}")


def main() -> None:
    if len(sys.argv) > 1:
        asyncio.run(attempt(sys.argv[1]))
        return
    run_id = f"explicit-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__, run_id]
    subprocess.run(me, env={**os.environ, "CRASH_AFTER_RESEARCH": "1"}, check=False)
    subprocess.run(me, check=True)


if __name__ == "__main__":
    main()
