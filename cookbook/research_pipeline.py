"""The research pipeline, decorated: crash it halfway, run it again, watch it resume.

    python cookbook/research_pipeline.py            # the whole demo: crash, then resume
    python cookbook/research_pipeline.py --run-id r1 [--crash-after research]

The pipeline is plain Agents SDK code plus two decorators. Every ``Runner.run`` inside it is a
checkpoint in the database (embedded SQLite ./tidebase.db unless TIDEBASE_DATABASE_URL is
set). Run offline on a scripted model, or with OpenAI when OPENAI_API_KEY is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _offline import ModelCall, call_tool, last_user_text, model, reply, tool_outputs
from agents import Agent, Runner, function_tool

from tidebase_agents import checkpointed_pipeline, durable_tool

MODEL_CALLS = {"researcher": 0, "writer": 0}


def _research(call: ModelCall) -> object:
    MODEL_CALLS["researcher"] += 1
    found = tool_outputs(call)
    if not found:
        return call_tool("lookup", topic=last_user_text(call).removeprefix("Research: "))
    return reply(f"Key findings: {found[0]}")


def _write(call: ModelCall) -> object:
    MODEL_CALLS["writer"] += 1
    return reply("A short post. " + last_user_text(call).split("\n", 1)[-1])


@function_tool
@durable_tool
async def lookup(topic: str) -> str:
    """Look a topic up in the knowledge base."""
    return f"{topic} survive crashes when every agent run is a checkpoint."


researcher = Agent(
    name="researcher",
    instructions="Research the topic with the lookup tool and return key findings.",
    tools=[lookup],
    model=model(_research),
)
writer = Agent(
    name="writer",
    instructions="Turn findings into a short publishable post.",
    model=model(_write),
)


@checkpointed_pipeline("research-pipeline")
async def research(topic: str) -> str:
    findings = await Runner.run(researcher, f"Research: {topic}")
    if os.environ.get("CRASH_AFTER") == "research":
        print(f"  model calls so far: {MODEL_CALLS}; the process dies now (os._exit)", flush=True)
        os._exit(1)
    draft = await Runner.run(writer, f"Write a post from:\n{findings.final_output}")
    return str(draft.final_output)


async def attempt(run_id: str) -> None:
    # The crashed process is gone, so its lease is taken over at once (no waiting it out).
    post = await research.with_run_id(run_id)("durable agents")
    print(f"  model calls in this process: {MODEL_CALLS}")
    run = await research.tide.get_run(run_id)
    for step in await research.tide.steps(run_id):
        how = "executed" if step.lease_token == run.attempts else "replayed"
        print(f"  {how:8} {step.name}  ({step.status})")
    print(f"  result: {post}")


def demo() -> None:
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__, "--run-id", run_id]
    print(f"1) run {run_id}, crashing after the researcher:")
    subprocess.run([*me, "--crash-after", "research"], check=False)
    print("2) same run id in a fresh process: the researcher replays, the writer runs:")
    subprocess.run(me, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id")
    parser.add_argument("--crash-after", choices=["research"])
    args = parser.parse_args()
    if args.run_id is None:
        demo()
        return
    if args.crash_after:
        os.environ["CRASH_AFTER"] = args.crash_after
    asyncio.run(attempt(args.run_id))


if __name__ == "__main__":
    main()
