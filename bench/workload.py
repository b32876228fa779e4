"""The "research pipeline" workload, shared by every configuration so they run identical work.

Per pipeline: 3 model calls, 1 function-tool call, 2 ``Runner.run`` calls. The researcher's model
first emits one ``lookup(topic)`` call, then a final text; the writer's model answers at once.
Models are ``agents.testing.ScriptedModel`` (zero latency), built fresh for every pipeline with
unique call and item ids. Only *how* ``Runner.run`` is called and how ``lookup`` is wrapped differ
between configurations (plain SDK, tidebase-agents, DBOS).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from agents import Agent, RunResult, Tool, set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
set_tracing_disabled(True)

TOPIC = "durable agents"
LOOKUP_RESULT = "Durable execution records each step so a crashed run resumes where it stopped."
FINDINGS = "Findings: checkpoints make agent pipelines resumable without re-billing model calls."
DRAFT = "Draft: durable agents resume from their last checkpoint after a crash."

RunFn = Callable[..., Awaitable[RunResult]]


async def lookup_impl(topic: str) -> str:
    """The tool body: returns a constant instantly (no I/O)."""
    return LOOKUP_RESULT


def _usage(input_tokens: int, output_tokens: int) -> Usage:
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


def make_agents(lookup_tool: Tool, uid: str) -> tuple[Agent[Any], Agent[Any]]:
    """Fresh researcher and writer agents whose scripted models use ids unique to ``uid``."""
    researcher_model = ScriptedModel(
        [
            ModelStep(
                output=[function_call("lookup", {"topic": TOPIC}, call_id=f"call_{uid}_lookup")],
                usage=_usage(40, 12),
            ),
            ModelStep(
                output=[assistant_message(FINDINGS, item_id=f"msg_{uid}_findings")],
                usage=_usage(80, 20),
            ),
        ]
    )
    writer_model = ScriptedModel(
        [
            ModelStep(
                output=[assistant_message(DRAFT, item_id=f"msg_{uid}_draft")],
                usage=_usage(60, 25),
            )
        ]
    )
    researcher = Agent(
        name="researcher",
        instructions="Research the topic. Call lookup once, then summarise your findings.",
        model=researcher_model,
        tools=[lookup_tool],
    )
    writer = Agent(
        name="writer",
        instructions="Write a short post from the findings.",
        model=writer_model,
    )
    return researcher, writer


async def research(topic: str, uid: str, *, run: RunFn, lookup_tool: Tool) -> str:
    """The pipeline body: two ``Runner.run`` calls (``run`` is ``Runner.run`` or a drop-in)."""
    researcher, writer = make_agents(lookup_tool, uid)
    findings = await run(researcher, f"Research: {topic}")
    draft = await run(writer, f"Write a post from:\n{findings.final_output}")
    return str(draft.final_output)


def new_uid() -> str:
    return uuid.uuid4().hex


def bare_pipeline() -> Callable[[str, str], Awaitable[str]]:
    """The pipeline with the plain SDK: ``Runner.run`` and a plain ``@function_tool``."""
    from agents import Runner, function_tool

    @function_tool
    async def lookup(topic: str) -> str:
        return await lookup_impl(topic)

    async def research_bare(topic: str, uid: str) -> str:
        return await research(topic, uid, run=Runner.run, lookup_tool=lookup)

    return research_bare
