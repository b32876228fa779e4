"""MCP tool calls as checkpointed steps: :func:`durable_mcp`.

The SDK rebuilds an agent's MCP tools from ``server.list_tools()`` on every turn and calls
``server.call_tool(...)`` for each call, so the seam is the server itself: a
:class:`DurableMCPServer` wraps any ``agents.mcp.MCPServer`` and makes each ``call_tool``
inside a pipeline the step ``mcp:<server>:<tool>:<args hash>#<n>`` within its agent step (like
a durable tool, I3). A finished call replays its recorded ``CallToolResult`` without reaching
the server; a call left in doubt by a crash follows R5 by what the server was declared to be.
Everything else (listing tools, prompts, resources, approval policies, connecting) is the
wrapped server's own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

from agents.mcp import MCPServer
from mcp.types import CallToolResult

from .._engine import StepSpec, active_executor, current_scope
from .._errors import ConfigurationError
from .._hashing import sha256_hex
from .._ids import derive_idempotency_key
from .._vocab import ReplayPolicy, parse
from .tools import _stop_if_halting

#: The ``_meta`` entry an idempotency key is sent in.
META_KEY = "idempotency_key"

KeyFunction = Callable[[str, Mapping[str, Any]], str]
Idempotency = Literal["meta", "idempotent"] | KeyFunction | None
_DECLARED = ("meta", "idempotent")


class DurableMCPServer(MCPServer):
    """An MCP server whose tool calls inside a pipeline are checkpointed steps.

    Made by :func:`durable_mcp`; every attribute and method but ``call_tool`` is the wrapped
    server's (it is never initialized as a server of its own).
    """

    def __init__(
        self,
        server: MCPServer,
        *,
        side_effects: Sequence[str] | None,
        read_only: bool | Collection[str],
        idempotency: Idempotency,
        retries: int,
        replay: ReplayPolicy,
    ) -> None:
        # The SDK reads the server's settings (approval policy, structured content, guardrails,
        # filters) as attributes: __getattr__ hands out the wrapped server's.
        self.__dict__.update(
            _tb_server=server,
            _tb_side_effects=list(side_effects) if side_effects else [f"mcp:{server.name}"],
            _tb_read_only=read_only,
            _tb_idempotency=idempotency,
            _tb_retries=retries,
            _tb_replay=replay,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_tb_server"], name)

    @property
    def wrapped(self) -> MCPServer:
        """The server this one checkpoints the calls of."""
        server: MCPServer = self.__dict__["_tb_server"]
        return server

    @property
    def name(self) -> str:
        return self.wrapped.name

    @property
    def cached_tools(self) -> Any:
        return self.wrapped.cached_tools

    async def connect(self) -> None:
        await self.wrapped.connect()  # type: ignore[no-untyped-call]

    async def cleanup(self) -> None:
        await self.wrapped.cleanup()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> DurableMCPServer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cleanup()

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> Any:
        return await self.wrapped.list_tools(run_context, agent)

    async def list_prompts(self) -> Any:
        return await self.wrapped.list_prompts()

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.wrapped.get_prompt(name, arguments)

    async def list_resources(self, cursor: str | None = None) -> Any:
        return await self.wrapped.list_resources(cursor)

    async def list_resource_templates(self, cursor: str | None = None) -> Any:
        return await self.wrapped.list_resource_templates(cursor)

    async def read_resource(self, uri: str) -> Any:
        return await self.wrapped.read_resource(uri)

    def _reads_only(self, tool_name: str) -> bool:
        read_only = self.__dict__["_tb_read_only"]
        return read_only is True or (not isinstance(read_only, bool) and tool_name in read_only)

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> CallToolResult:
        ex = active_executor()
        if ex is None:
            return await self._forward(tool_name, arguments, meta)
        server = self.name
        args = dict(arguments or {})
        args_hash = sha256_hex(args, what=f"arguments of MCP tool {tool_name!r} of {server!r}")
        scope = current_scope() or ex.root
        key = f"mcp:{server}:{tool_name}:{args_hash[:12]}"
        name = f"{scope.prefix}{key}#{scope.next_ordinal(key)}"
        idempotency = self.__dict__["_tb_idempotency"]
        if callable(idempotency):
            idem = idempotency(tool_name, dict(args))
            if not isinstance(idem, str) or not idem:
                raise ConfigurationError(
                    f"the idempotency function of MCP server {server!r} must return a "
                    f"non-empty str for tool {tool_name!r}"
                )
        else:
            idem = derive_idempotency_key(ex.run_id, name)
        if idempotency == "meta" or callable(idempotency):
            meta = {**(meta or {}), META_KEY: idem}
        spec = StepSpec(
            name=name,
            fn=lambda: self._forward(tool_name, arguments, meta),
            input_hash=args_hash,
            side_effects=None if self._reads_only(tool_name) else self.__dict__["_tb_side_effects"],
            idempotency_key=idem,
            keyed=idempotency is not None,
            replay=self.__dict__["_tb_replay"],
            retries=self.__dict__["_tb_retries"],
            encode=_encode_result,
            decode=_decode_result,
        )
        try:
            result: CallToolResult = await ex.execute(spec)
        except Exception as exc:
            # Called by the SDK's tool runner (inside an agent step): a parked or failed call,
            # or a failure of the library's own, must stop the agent run, not reach the model.
            _stop_if_halting(ex, spec, scope if scope is not ex.root else None, exc)
            raise
        return result

    async def _forward(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None
    ) -> CallToolResult:
        if meta is None:
            return await self.wrapped.call_tool(tool_name, arguments)
        return await self.wrapped.call_tool(tool_name, arguments, meta=meta)


def _encode_result(result: CallToolResult) -> Any:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


async def _decode_result(data: Any) -> CallToolResult:
    return CallToolResult.model_validate(data)


def durable_mcp(
    server: MCPServer,
    *,
    side_effects: Sequence[str] | None = None,
    read_only: bool | Collection[str] = False,
    idempotency: Idempotency = None,
    retries: int = 0,
    replay: ReplayPolicy | str = ReplayPolicy.AUTO,
) -> DurableMCPServer:
    """Checkpoint the tool calls an agent makes through ``server`` inside a pipeline.

    Give the returned server to ``Agent(mcp_servers=[...])`` (and connect it, or the wrapped
    one, as usual). Each call is the step ``mcp:<server>:<tool>:<args hash>#<n>`` within its
    agent step: a finished call replays its recorded result without reaching the server.

    What a call left in doubt by a crash does (R3-R5) follows the declarations:

    - ``read_only=True`` (or a collection of tool names): those tools only read; a call in
      doubt runs again.
    - Otherwise the tools write to ``side_effects`` (default ``["mcp:<server name>"]``). With
      ``idempotency=None`` such a call is unkeyed: in doubt, or failed for good, it parks in
      ``manual_review``. ``"meta"`` sends the derived idempotency key (stable across attempts
      and processes, I4) in the request's ``_meta["idempotency_key"]`` for a server that
      deduplicates by it; a function ``(tool_name, arguments) -> str`` sends its own key
      there; ``"idempotent"`` declares that the tools may safely run twice with the same
      arguments. Keyed calls re-execute when in doubt.

    Outside a pipeline calls go straight to the server.
    """
    if isinstance(server, DurableMCPServer):
        raise ConfigurationError(f"MCP server {server.name!r} is already durable")
    if not isinstance(server, MCPServer):
        raise ConfigurationError(f"durable_mcp takes an agents.mcp.MCPServer, got {server!r}")
    if not (idempotency is None or callable(idempotency) or idempotency in _DECLARED):
        raise ConfigurationError(
            f"idempotency must be 'meta', 'idempotent', a function or None, got {idempotency!r}"
        )
    if retries < 0:
        raise ConfigurationError("retries must be >= 0")
    if read_only is True and side_effects:
        raise ConfigurationError("a read-only MCP server has no side_effects to declare")
    return DurableMCPServer(
        server,
        side_effects=side_effects,
        read_only=read_only if isinstance(read_only, bool) else frozenset(read_only),
        idempotency=idempotency,
        retries=retries,
        replay=parse(ReplayPolicy, replay, "replay"),
    )
