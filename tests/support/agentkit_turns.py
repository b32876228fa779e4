"""Long agent runs for the model-turn journal (T1): a tool loop, a handoff chain and an agent
used as a tool, each crashed (``os._exit``) inside its k-th tool and resumed in a fresh process.

Every model call appends a line to ``calls.log``, so a test counts calls across processes.
Tools are plain function tools (not durable): a resume runs them again, as the SDK would; what
must not happen again is a model call that already answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentkit_common import (
    crash,
    log_line,
    message,
    policy_model,
    read_lines,
    tool_calls,
    tool_outputs,
)
from agents import Agent, Runner, function_tool
from agents.usage import serialize_usage

from tidebase_agents import Tidebase, checkpointed_pipeline

LOOP = 10  # tool turns before the answer
SCENARIOS = {"loop": 1 + LOOP, "handoff": 2 + LOOP, "as_tool": 3 + LOOP}


def _looping(log: Path, answer: str) -> Any:
    def respond(call: Any) -> Any:
        log_line(log, "call")
        outputs = [o for o in tool_outputs(call) if o.startswith("w")]  # not a handoff's
        if len(outputs) < LOOP:
            return tool_calls(("work", {"i": len(outputs) + 1}))
        return message(f"{answer}: {', '.join(outputs)}")

    return policy_model(respond)


def build(url: str, directory: str, scenario: str, crash_at: int | None) -> Any:
    """The scenario's pipeline; ``crash_at`` kills the process inside that tool call."""
    log = Path(directory, "calls.log")
    marker = Path(directory, "crashed")

    @function_tool
    def work(i: int) -> str:
        """Do step i."""
        if crash_at == i and not marker.exists():
            marker.touch()
            crash()
        return f"w{i}"

    worker = Agent(name="worker", model=_looping(log, "done"), tools=[work])
    if scenario == "loop":
        entry = worker
    elif scenario == "handoff":

        def triage_respond(call: Any) -> Any:
            log_line(log, "call")
            return tool_calls(("transfer_to_worker", {}))

        entry = Agent(name="triage", model=policy_model(triage_respond), handoffs=[worker])
    else:
        research = worker.as_tool(
            tool_name="research", tool_description="Research it.", max_turns=30
        )

        def outer_respond(call: Any) -> Any:
            log_line(log, "call")
            outputs = tool_outputs(call)
            if not outputs:
                return tool_calls(("research", {"input": "the topic"}))
            return message(f"report: {outputs[0]}")

        entry = Agent(name="outer", model=policy_model(outer_respond), tools=[research])

    @checkpointed_pipeline(f"turns-{scenario}", tide=Tidebase(url, lease_seconds=1))
    async def pipeline(topic: str) -> dict[str, Any]:
        result = await Runner.run(entry, topic, max_turns=30)
        return {
            "output": str(result.final_output),
            "input_list": result.to_input_list(),
            "usage": serialize_usage(result.context_wrapper.usage),
        }

    return pipeline


async def run_once(
    url: str, directory: str, run_id: str, scenario: str, crash_at: int | None
) -> dict[str, Any]:
    """A child's whole job: invoke the run (waiting out a dead holder's lease) and report."""
    from agentkit_common import until_unlocked

    pipeline = build(url, directory, scenario, crash_at)
    before = len(read_lines(Path(directory, "calls.log")))
    try:
        summary = await until_unlocked(lambda: pipeline("durable agents", run_id=run_id))
    finally:
        await pipeline.tide.close()
    calls = len(read_lines(Path(directory, "calls.log"))) - before
    return {"summary": json.loads(json.dumps(summary, default=str)), "calls": calls}
