"""The research pipeline of the cookbook: a researcher agent that calls a side-effecting durable tool
(``create_ticket``), then a writer agent. Built fresh per process (or per test) by :func:`build`,
so every build has its own scripted models whose ``.calls`` count this process's model calls.

Crash points (``crash=``): ``after_researcher`` (the first ``Runner.run`` returned),
``in_tool`` (inside the tool body right after the external write), ``before_agent_done`` (the
tool returned and was checkpointed; the researcher's next model call dies).

Tool variants (``tool=``): ``key_read`` (body reads ``idempotency_key()``), ``key_fn`` (the
decorator is given an ``idempotency_key=`` function), ``unkeyed`` (side effects, no key).
"""

from __future__ import annotations

import types
from typing import Any

from agentkit_common import (
    ExternalApi,
    crash,
    message,
    policy_model,
    tool_calls,
    tool_outputs,
    until_unlocked,
    user_text,
)
from agents import Agent, Runner, function_tool

from tidebase_agents import TidebaseError, checkpointed_pipeline, durable_tool, idempotency_key

PIPELINE = "agentkit-research"


def ticket_key(title: str) -> str:
    return f"ticket:{title}"


def build(
    url: str,
    directory: str,
    *,
    tool: str = "key_read",
    crash_at: str | None = None,
    lease_seconds: float | None = 1,
) -> types.SimpleNamespace:
    api = ExternalApi(directory)
    seen_keys: list[str | None] = []

    def maybe_crash(point: str) -> None:
        if crash_at == point:
            crash()

    if tool == "key_read":

        @function_tool
        @durable_tool(side_effects=["ticketing-api"])
        async def create_ticket(title: str) -> str:
            """Open a ticket in the ticketing system.

            Args:
                title: Title of the ticket.
            """
            key = idempotency_key()
            seen_keys.append(key)
            ticket = api.create(title, key)
            maybe_crash("in_tool")
            return ticket

    elif tool == "key_fn":

        @function_tool
        @durable_tool(side_effects=["ticketing-api"], idempotency_key=ticket_key)
        async def create_ticket(title: str) -> str:
            """Open a ticket in the ticketing system.

            Args:
                title: Title of the ticket.
            """
            key = ticket_key(title)
            seen_keys.append(key)
            ticket = api.create(title, key)
            maybe_crash("in_tool")
            return ticket

    elif tool == "unkeyed":

        @function_tool
        @durable_tool(side_effects=["ticketing-api"])
        async def create_ticket(title: str) -> str:
            """Open a ticket in the ticketing system.

            Args:
                title: Title of the ticket.
            """
            seen_keys.append(None)
            ticket = api.create(title, None)
            maybe_crash("in_tool")
            return ticket

    else:
        raise ValueError(tool)

    def research(call: Any) -> Any:
        topic = user_text(call).removeprefix("Research: ")
        done = tool_outputs(call)
        if not done:
            return tool_calls(("create_ticket", {"title": f"about {topic}"}))
        maybe_crash("before_agent_done")
        return message(f"findings on {topic} (ticket {done[0]})", inp=20, out=8)

    researcher_model = policy_model(research)
    writer_model = policy_model(lambda call: message("POST: " + user_text(call), inp=30, out=9))
    researcher = Agent(
        name="researcher",
        instructions="Research the topic; open a ticket for follow-up.",
        model=researcher_model,
        tools=[create_ticket],
    )
    writer = Agent(name="writer", instructions="Write a short post.", model=writer_model)

    options: dict[str, Any] = {"database_url": url}
    if lease_seconds is not None:
        options["lease_seconds"] = lease_seconds

    @checkpointed_pipeline(PIPELINE, **options)
    async def pipeline(topic: str) -> str:
        findings = await Runner.run(researcher, f"Research: {topic}")
        maybe_crash("after_researcher")
        draft = await Runner.run(writer, f"Write a post from:\n{findings.final_output}")
        return str(draft.final_output)

    return types.SimpleNamespace(
        api=api,
        seen_keys=seen_keys,
        researcher=researcher,
        writer=writer,
        researcher_model=researcher_model,
        writer_model=writer_model,
        create_ticket=create_ticket,
        pipeline=pipeline,
    )


async def child(
    url: str,
    directory: str,
    run_id: str,
    topic: str = "durable agents",
    tool: str = "key_read",
    crash_at: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or ``.resume``) the research pipeline in this process and report what it did."""
    kit = build(url, directory, tool=tool, crash_at=crash_at)
    outcome, output = "ok", None
    try:
        if resume:
            output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
        else:
            output = await until_unlocked(lambda: kit.pipeline(topic, run_id=run_id))
    except TidebaseError as exc:
        outcome = type(exc).__name__
    finally:
        await kit.pipeline.tide.close()
    return {
        "outcome": outcome,
        "output": output,
        "researcher_calls": len(kit.researcher_model.calls),
        "writer_calls": len(kit.writer_model.calls),
        "seen_keys": kit.seen_keys,
    }
