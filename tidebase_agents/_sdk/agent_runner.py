"""The runner hook: every ``Runner.run`` / ``run_sync`` / ``run_streamed`` goes through an
``AgentRunner`` subclass installed as the SDK's default runner (an experimental SDK API)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol, cast

from agents import Agent, RunResult, RunResultStreaming
from agents.run import AgentRunner, RunOptions, get_default_agent_runner, set_default_agent_runner
from agents.tool_context import ToolContext
from typing_extensions import Unpack

from .usage import isolate_usage


class RunInterceptor(Protocol):
    """Decides what each ``Runner.run`` / ``run_sync`` / ``run_streamed`` call does."""

    async def run(
        self,
        runner: AgentRunner,
        starting_agent: Agent[Any],
        input: Any,
        kwargs: dict[str, Any],
    ) -> RunResult: ...

    def run_streamed(
        self,
        runner: AgentRunner,
        starting_agent: Agent[Any],
        input: Any,
        kwargs: dict[str, Any],
    ) -> RunResultStreaming: ...


class _TidebaseRunner(AgentRunner):
    """Routes runs to the interceptor. ``run_sync`` is inherited: it calls ``self.run``."""

    def __init__(self, interceptor: RunInterceptor, delegate: AgentRunner | None) -> None:
        self.interceptor = interceptor
        # A custom default runner the user installed before us; None means the SDK's own.
        self.delegate = delegate

    async def run(
        self, starting_agent: Agent[Any], input: Any, **kwargs: Unpack[RunOptions[Any]]
    ) -> RunResult:
        return await self.interceptor.run(self, starting_agent, input, dict(kwargs))

    def run_streamed(
        self, starting_agent: Agent[Any], input: Any, **kwargs: Unpack[RunOptions[Any]]
    ) -> RunResultStreaming:
        return self.interceptor.run_streamed(self, starting_agent, input, dict(kwargs))


def install_runner(interceptor: RunInterceptor) -> None:
    """Route every ``Runner`` call through ``interceptor``. Idempotent; the last interceptor wins.

    A custom default runner that is already installed becomes the delegate that
    :func:`sdk_run` / :func:`sdk_run_streamed` call, so outside a pipeline behaviour stays
    exactly what it was. (Its own ``run_sync`` override, if any, is bypassed: ``run_sync`` goes
    through ``run``.)
    """
    current = get_default_agent_runner()
    if isinstance(current, _TidebaseRunner):
        current.interceptor = interceptor
        return
    delegate = None if type(current) is AgentRunner else current
    set_default_agent_runner(_TidebaseRunner(interceptor, delegate))


def _delegate_of(runner: AgentRunner) -> AgentRunner | None:
    return runner.delegate if isinstance(runner, _TidebaseRunner) else None


async def sdk_run(
    runner: AgentRunner,
    starting_agent: Agent[Any],
    input: Any,
    kwargs: Mapping[str, Any],
    *,
    isolate: bool = False,
) -> RunResult:
    """Run the agent the way the SDK (or the delegate runner) would have.

    With ``isolate`` and a ``RunContextWrapper`` context (a ``ToolContext`` in nested
    agent-as-tool runs), the run gets a copy of the wrapper with a fresh ``Usage``, which is added
    to the caller's wrapper when the run ends (also on failure). The result's (and a failure's
    ``run_data``) ``context_wrapper.usage`` is then exactly this run's usage, nested runs
    included, which is what :func:`encode_result` records and :func:`decode_result` adds back.
    Totals on the caller's wrapper equal an unintercepted run's. Use it inside pipelines;
    parallel sub-runs sharing one parent Usage is why a before/after delta would not do.
    """
    call_kwargs, settle = isolate_usage(kwargs, isolate)
    delegate = _delegate_of(runner)
    try:
        if delegate is not None:
            return await delegate.run(starting_agent, input, **call_kwargs)
        return await AgentRunner.run(runner, starting_agent, input, **call_kwargs)
    finally:
        if settle is not None:
            settle()


def sdk_run_streamed(
    runner: AgentRunner,
    starting_agent: Agent[Any],
    input: Any,
    kwargs: Mapping[str, Any],
    *,
    isolate: bool = False,
) -> RunResultStreaming:
    """Start a streamed run the way the SDK would; ``isolate`` as in :func:`sdk_run`
    (the caller's wrapper receives the usage when the stream's run task ends)."""
    call_kwargs, settle = isolate_usage(kwargs, isolate)
    delegate = _delegate_of(runner)
    if delegate is not None:
        streamed = delegate.run_streamed(starting_agent, input, **call_kwargs)
    else:
        streamed = AgentRunner.run_streamed(runner, starting_agent, input, **call_kwargs)
    if settle is not None:
        # The SDK always sets run_loop_task before returning; usage is final once it is done.
        cast(asyncio.Task[Any], streamed.run_loop_task).add_done_callback(lambda _t: settle())
    return streamed


def tool_call_scope(context: Any) -> tuple[str, str] | None:
    """``(tool_name, tool_arguments)`` when ``context`` is a ToolContext (a nested agent-as-tool
    run), else None. Arguments are the model's JSON string, not call ids (I3)."""
    if isinstance(context, ToolContext):
        return context.tool_name, context.tool_arguments
    return None
