"""Streamed runs and session-backed runs inside pipelines, for in-process and child-process tests.

Both use an agent that first calls a durable ``lookup`` tool and then answers. Streaming
``crash_at="after_stream"``: the stream was consumed to the end; the process dies right after.
Sessions ``crash_on=WORD``: while defining WORD, after the tool output was added to the session,
the second model call dies.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from agentkit_common import (
    Interrupted,
    async_url,
    crash,
    log_line,
    message,
    policy_model,
    tool_calls,
    tool_outputs,
    until_unlocked,
    user_text,
)
from agents import Agent, Runner, SQLiteSession, function_tool
from agents.extensions.memory import SQLAlchemySession

from tidebase_agents import checkpointed_pipeline, durable_tool


def describe(event: Any) -> list[str] | None:
    """A stream event in comparable form; None for raw model deltas."""
    if event.type == "raw_response_event":
        return None
    if event.type == "agent_updated_stream_event":
        return [event.type, event.new_agent.name]
    return [event.type, event.name, type(event.item).__name__]


def build_agent(crash_on: str | None = None) -> types.SimpleNamespace:
    lookups: list[str] = []

    @function_tool
    @durable_tool
    async def lookup(term: str) -> str:
        lookups.append(term)
        return f"{term} means lasting"

    def respond(call: Any) -> Any:
        outputs = tool_outputs(call)
        term = user_text(call).split()[-1]
        if not outputs:
            return tool_calls(("lookup", {"term": term}))
        if term == crash_on:
            crash()
        return message(f"answer: {outputs[-1]}", inp=25, out=6)

    model = policy_model(respond)
    agent = Agent(name="explainer", instructions="Explain.", model=model, tools=[lookup])
    return types.SimpleNamespace(agent=agent, model=model, lookups=lookups)


# -- streaming ------------------------------------------------------------------------------------


def build_streaming(
    url: str, directory: str, crash_at: str | None = None, interrupt_once: bool = False
) -> types.SimpleNamespace:
    """``interrupt_once``: the first attempt fails (``Interrupted``) after the stream ended."""
    kit = build_agent()
    kit.results = []
    kit.events = []

    @checkpointed_pipeline("agentkit-stream", database_url=url, lease_seconds=1)
    async def pipeline(word: str) -> str:
        streamed = Runner.run_streamed(kit.agent, f"define {word}")
        events = []
        async for event in streamed.stream_events():
            events.append(event)
        kit.results.append(streamed)
        kit.events.append(events)
        if crash_at == "after_stream":
            semantic = [d for d in map(describe, events) if d is not None]
            log_line(Path(directory, "events.log"), json.dumps(semantic))
            log_line(Path(directory, "output.log"), json.dumps(streamed.final_output))
            crash()
        if interrupt_once and len(kit.results) == 1:
            raise Interrupted
        return str(streamed.final_output)

    kit.pipeline = pipeline
    return kit


async def stream_child(url: str, directory: str, run_id: str) -> dict[str, Any]:
    kit = build_streaming(url, directory, crash_at="after_stream")
    try:
        return {"output": await kit.pipeline("durable", run_id=run_id)}
    finally:
        await kit.pipeline.tide.close()


# -- sessions -------------------------------------------------------------------------------------


def open_session(kind: str, session_id: str, url: str, directory: str) -> Any:
    if kind == "sqlalchemy":
        return SQLAlchemySession.from_url(session_id, url=async_url(url), create_tables=True)
    return SQLiteSession(session_id, str(Path(directory, "sessions.sqlite")))


async def close_session(session: Any) -> None:
    if isinstance(session, SQLAlchemySession):
        await session.engine.dispose()
    else:
        session.close()


def build_session_pipeline(
    url: str,
    directory: str,
    kind: str,
    crash_on: str | None = None,
    interrupt_once: bool = False,
) -> types.SimpleNamespace:
    """``interrupt_once``: the first attempt fails (``Interrupted``) after all its runs."""
    kit = build_agent(crash_on)
    attempts: list[int] = []
    kit.results = []

    @checkpointed_pipeline("agentkit-session", database_url=url, lease_seconds=1)
    async def pipeline(session_id: str, words: list[str]) -> list[str]:
        session = open_session(kind, session_id, url, directory)
        try:
            outputs = []
            for word in words:  # a conversation: later turns see the history
                result = await Runner.run(kit.agent, f"define {word}", session=session)
                kit.results.append(result)
                outputs.append(str(result.final_output))
            attempts.append(1)
            if interrupt_once and len(attempts) == 1:
                raise Interrupted
            return outputs
        finally:
            await close_session(session)

    kit.pipeline = pipeline
    return kit


async def session_items(kind: str, session_id: str, url: str, directory: str) -> list[Any]:
    session = open_session(kind, session_id, url, directory)
    try:
        return list(await session.get_items())
    finally:
        await close_session(session)


async def session_child(
    url: str, directory: str, run_id: str, kind: str, session_id: str, words: list[str]
) -> dict[str, Any]:
    kit = build_session_pipeline(url, directory, kind, crash_on=words[-1])
    try:
        return {
            "output": await until_unlocked(lambda: kit.pipeline(session_id, words, run_id=run_id))
        }
    finally:
        await kit.pipeline.tide.close()
