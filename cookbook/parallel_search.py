"""Agents as tools with parallel searches: a planner, searchers fanned out, a writer.

    python cookbook/parallel_search.py

The planner's searches run concurrently with ``asyncio.gather``; each search is a searcher
agent run that uses the ``search_web`` tool. The first process dies after the searches
finished; the second replays the planner and every search from their checkpoints, even though
the searches start in another order, and only the writer runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _offline import ModelCall, call_tool, last_user_text, model, reply, tool_outputs
from agents import Agent, Runner, function_tool
from pydantic import BaseModel

from tidebase_agents import checkpointed_pipeline, durable_tool

CALLS = {"planner": 0, "searcher": 0, "writer": 0}


class SearchPlan(BaseModel):
    queries: list[str]


@function_tool
@durable_tool
async def search_web(query: str) -> str:
    """Search the web."""
    return f"top result for {query!r}"


def _plan(call: ModelCall) -> object:
    CALLS["planner"] += 1
    topic = last_user_text(call)
    plan = SearchPlan(queries=[f"{topic} history", f"{topic} risks", f"{topic} tooling"])
    return reply(plan.model_dump_json())


def _search(call: ModelCall) -> object:
    CALLS["searcher"] += 1
    found = tool_outputs(call)
    if not found:
        return call_tool("search_web", query=last_user_text(call))
    return reply(f"summary: {found[0]}")


def _write(call: ModelCall) -> object:
    CALLS["writer"] += 1
    return reply("Report:\n" + last_user_text(call))


planner = Agent(
    name="planner",
    instructions="Plan three web searches for the topic.",
    output_type=SearchPlan,
    model=model(_plan),
)
searcher = Agent(
    name="searcher",
    instructions="Search the web for the query and summarize the result.",
    tools=[search_web],
    model=model(_search),
)
writer = Agent(
    name="writer", instructions="Write a report from the summaries.", model=model(_write)
)


async def search(query: str) -> str:
    await asyncio.sleep(random.random() / 20)  # searches start in a different order each time
    result = await Runner.run(searcher, query)
    return str(result.final_output)


@checkpointed_pipeline("parallel-search")
async def report(topic: str) -> str:
    plan = await Runner.run(planner, topic)
    summaries = await asyncio.gather(*(search(q) for q in plan.final_output.queries))
    if os.environ.get("CRASH_AFTER_SEARCH"):
        print(f"  model calls so far: {CALLS}; the process dies now", flush=True)
        os._exit(1)
    draft = await Runner.run(writer, "\n".join(summaries))
    return str(draft.final_output)


async def attempt(run_id: str) -> None:
    text = await report.with_run_id(run_id)("durable execution")
    print(f"  model calls in this process: {CALLS}")
    print("  " + text.replace("\n", "\n  "))


def main() -> None:
    if len(sys.argv) > 1:
        asyncio.run(attempt(sys.argv[1]))
        return
    run_id = f"search-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__, run_id]
    print("1) plan, fan out three searches, then die:")
    subprocess.run(me, env={**os.environ, "CRASH_AFTER_SEARCH": "1"}, check=False)
    print("2) resume: planner and searches replay, the writer runs:")
    subprocess.run(me, check=True)


if __name__ == "__main__":
    main()
