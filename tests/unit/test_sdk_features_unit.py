"""SDK features without a database: MCP server declarations and pass-through, in-memory session
detection, what the agent fingerprint says of MCP servers, guardrail types by registration only."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import message, policy_model
from agents import Agent, Runner, SQLiteSession, output_guardrail
from agents.extensions.memory import SQLAlchemySession
from agents.mcp import MCPServer, MCPServerStdio
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from tidebase_agents import (
    CheckpointSerializationError,
    ConfigurationError,
    DurableMCPServer,
    durable_mcp,
    is_replaying,
    register_types,
)
from tidebase_agents._sdk import fingerprint as sdk_fp
from tidebase_agents._sdk import guardrails as sdk_guardrails
from tidebase_agents._sdk import result_codec as sdk_codec
from tidebase_agents._sdk import session as sdk_session
from tidebase_agents._sdk.result_codec import EXTRA_PAYLOAD_KEYS


class EchoServer(MCPServer):
    """An in-process MCP server: answers every call with its arguments."""

    def __init__(self) -> None:
        super().__init__(require_approval="always")
        self.calls: list[tuple[str, Any, Any]] = []

    @property
    def name(self) -> str:
        return "echo"

    async def connect(self) -> None:
        return None

    async def cleanup(self) -> None:
        return None

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Any]:
        return []

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> CallToolResult:
        self.calls.append((tool_name, arguments, meta))
        return CallToolResult(content=[TextContent(type="text", text=f"{tool_name}:{arguments}")])

    async def list_prompts(self) -> Any:
        return None

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return None


async def test_durable_mcp_outside_a_pipeline_calls_the_server() -> None:
    inner = EchoServer()
    server = durable_mcp(inner, idempotency="meta")
    assert isinstance(server, DurableMCPServer) and isinstance(server, MCPServer)
    result = await server.call_tool("add", {"a": 1})
    assert result.content[0].text == "add:{'a': 1}"  # type: ignore[union-attr]
    assert inner.calls == [("add", {"a": 1}, None)]  # no key outside a pipeline
    # The SDK reads the wrapped server's settings through the wrapper.
    assert server.name == "echo" and server.wrapped is inner
    assert server._needs_approval_policy is inner._needs_approval_policy


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"idempotency": "sometimes"}, "idempotency must be"),
        ({"retries": -1}, "retries"),
        ({"read_only": True, "side_effects": ["x"]}, "read-only"),
        ({"replay": "later"}, "replay"),
    ],
)
def test_durable_mcp_rejects_bad_declarations(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        durable_mcp(EchoServer(), **options)


def test_durable_mcp_wraps_a_server_once() -> None:
    with pytest.raises(ConfigurationError, match="already durable"):
        durable_mcp(durable_mcp(EchoServer()))
    with pytest.raises(ConfigurationError, match="MCPServer"):
        durable_mcp(object())  # type: ignore[arg-type]


def test_fingerprint_names_mcp_servers_only_when_there_are_some() -> None:
    plain = Agent(name="a")
    assert "mcp_servers" not in sdk_fp.agent_fingerprint(plain)  # existing hashes unchanged
    stdio = MCPServerStdio(params={"command": "/nonexistent"}, name="files")
    with_servers = Agent(name="a", mcp_servers=[durable_mcp(EchoServer()), stdio])
    assert sdk_fp.agent_fingerprint(with_servers)["mcp_servers"] == ["echo", "files"]


def test_in_memory_sessions_are_detected(tmp_path: Path) -> None:
    memory = [
        SQLiteSession("s"),
        SQLiteSession("s", ""),
        SQLAlchemySession.from_url("s", url="sqlite+aiosqlite://"),
        SQLAlchemySession.from_url("s", url="sqlite+aiosqlite:///:memory:"),
    ]
    durable = [
        SQLiteSession("s", tmp_path / "s.db"),
        SQLAlchemySession.from_url("s", url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"),
        SQLAlchemySession.from_url("s", url="postgresql+asyncpg://u@h/db"),
    ]
    assert [sdk_session.kept_in_memory(s) for s in memory] == [True] * len(memory)
    assert [sdk_session.kept_in_memory(s) for s in durable] == [False] * len(durable)

    class Wrapper:  # encryption and compaction sessions wrap another one like this
        def __init__(self, inner: Any) -> None:
            self.underlying_session = inner

    assert sdk_session.kept_in_memory(Wrapper(SQLiteSession("s")))
    assert not sdk_session.kept_in_memory(object())  # unknown: counts as durable


class Probe(BaseModel):
    at: dt.datetime


class NeverRegistered(BaseModel):
    at: dt.datetime


def test_guardrail_output_info_types_come_back_only_when_registered() -> None:
    register_types(Probe)
    at = dt.datetime(2024, 1, 2, 3, 4, 5)
    known = sdk_guardrails._typed_info(Probe(at=at))
    unknown = sdk_guardrails._typed_info(NeverRegistered(at=at))
    assert known is not None and unknown is not None
    assert sdk_guardrails._info(known, None, "fallback") == Probe(at=at)
    assert sdk_guardrails._info(unknown, None, "fallback") == "fallback"  # R14
    tampered = {**known, "type": "os:system"}
    assert sdk_guardrails._info(tampered, None, "fallback") == "fallback"
    assert sdk_guardrails._typed_info({"plain": "json"}) is None  # the SDK keeps those


class Scored(BaseModel):
    score: int


def test_guardrail_output_info_types_named_by_the_guardrails_annotations_come_back() -> None:
    async def check(ctx: Any, agent: Any, output: Scored) -> Any: ...

    guardrail = output_guardrail(check)
    typed = sdk_guardrails._typed_info(Scored(score=3))
    assert sdk_guardrails._info(typed, None, "fallback") == "fallback"  # nothing names it yet
    assert sdk_guardrails._info(typed, guardrail, "fallback") == Scored(score=3)


async def test_agent_checkpoints_may_hold_the_extra_keys_and_nothing_else() -> None:
    agent = Agent(name="a", model=policy_model(lambda call: message("hi")))
    payload = sdk_codec.encode_result(await Runner.run(agent, "go"))
    assert sdk_codec._check_payload(payload) is payload  # as written before the extras
    extended = {**payload, **{key: {} for key in EXTRA_PAYLOAD_KEYS}}
    assert sdk_codec._check_payload(extended) is extended
    with pytest.raises(CheckpointSerializationError, match="bogus"):
        sdk_codec._check_payload({**extended, "bogus": 1})
    assert is_replaying() is False  # outside hooks fired for a replay
