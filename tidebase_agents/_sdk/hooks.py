"""Lifecycle hooks of replayed agent runs.

A replayed ``Runner.run`` does no model or tool call, so the SDK fires none of the run's
hooks. The library fires the agent-level ones from the checkpoint instead, in the order and
with the arguments of the original run, on the ``RunHooks`` passed to the call and each agent's
``AgentHooks``:

- ``on_agent_start`` / ``on_start`` for the agent the run started with (for a run resumed from
  a ``RunState``, the state's current agent, as the SDK does);
- ``on_handoff`` for each handoff the run made, then ``on_agent_start`` / ``on_start`` of the
  agent it handed off to;
- ``on_agent_end`` / ``on_end`` with the final output (not for a run that stopped on
  interruptions, as in the SDK).

Model and tool hooks (``on_llm_start`` / ``on_llm_end``, ``on_tool_start`` / ``on_tool_end``)
are not fired: no model or tool is called. The usage the original run spent is on the hook
context's ``usage``. While these hooks run, :func:`is_replaying` returns True.
"""

from __future__ import annotations

import contextvars
from typing import Any

from agents import Agent, ItemHelpers, RunHooks, RunResult, RunResultStreaming
from agents.items import HandoffOutputItem
from agents.lifecycle import RunHooksBase
from agents.run_context import AgentHookContext, RunContextWrapper
from agents.run_state import RunState

_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tidebase_replaying_hooks", default=False
)


def is_replaying() -> bool:
    """True inside lifecycle hooks the library fires for an agent run replayed from its
    checkpoint, False in hooks the SDK fires for a run that executes."""
    return _replaying.get()


def _hook_context(wrapper: RunContextWrapper[Any], turn_input: list[Any]) -> AgentHookContext[Any]:
    return AgentHookContext(context=wrapper.context, usage=wrapper.usage, turn_input=turn_input)


async def _start(hooks: RunHooks[Any], agent: Agent[Any], context: AgentHookContext[Any]) -> None:
    await hooks.on_agent_start(context, agent)
    if agent.hooks is not None:
        await agent.hooks.on_start(context, agent)


async def fire_replayed_hooks(
    result: RunResult | RunResultStreaming, starting_agent: Agent[Any], run_input: Any, hooks: Any
) -> None:
    """Fire the agent-level hooks of ``result``, a run replayed from its checkpoint."""
    run_hooks: RunHooks[Any] = hooks if isinstance(hooks, RunHooksBase) else RunHooks()
    wrapper = result.context_wrapper
    items = list(result.new_items)
    if isinstance(run_input, RunState):
        first: Agent[Any] = run_input._current_agent or starting_agent  # SDK private
        # Items the state already held were made (and hooked) before it was saved.
        items = items[len(run_input._session_items) :]  # SDK private
        turn_input: list[Any] = []
    else:
        first = starting_agent
        turn_input = ItemHelpers.input_to_new_input_list(result.input)
    token = _replaying.set(True)
    try:
        await _start(run_hooks, first, _hook_context(wrapper, turn_input))
        for item in items:
            if not isinstance(item, HandoffOutputItem):
                continue
            source, target = item.source_agent, item.target_agent
            await run_hooks.on_handoff(context=wrapper, from_agent=source, to_agent=target)
            if source.hooks is not None:
                await source.hooks.on_handoff(wrapper, agent=target, source=source)
            await _start(run_hooks, target, _hook_context(wrapper, turn_input))
        if not result.interruptions:
            end = _hook_context(wrapper, turn_input)
            last = result.last_agent
            await run_hooks.on_agent_end(end, last, result.final_output)
            if last.hooks is not None:
                await last.hooks.on_end(end, last, result.final_output)
    finally:
        _replaying.reset(token)
