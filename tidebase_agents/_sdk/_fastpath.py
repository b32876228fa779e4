"""A faster ``RunState.to_json`` for agent graphs whose names are unique.

``RunState.to_json`` (run for every agent checkpoint) ranks the agents of the graph by a
signature of their whole configuration, to tell apart agents that share a name. When every
name is unique that ranking cannot change anything, yet it is most of the cost of the call.
:func:`install` makes the SDK use functions that return what the SDK's return for such graphs
and defer to them otherwise.
"""

from __future__ import annotations

from typing import Any

from agents import Agent
from agents import _run_state_agent_identity as _agent_identity  # SDK private
from agents import run_state as _run_state_module

_sdk_identity_map = _agent_identity._build_agent_identity_map  # SDK private
_sdk_ambiguous_ids = _agent_identity._get_ambiguous_agent_ids  # SDK private


def _agents_by_unique_name(initial_agent: Agent[Any]) -> dict[str, Agent[Any]] | None:
    agents_by_name: dict[str, Agent[Any]] = {}
    for agent in _agent_identity._iter_agent_graph(initial_agent):  # SDK private
        if agent.name in agents_by_name:
            return None
        agents_by_name[agent.name] = agent
    return agents_by_name


def _identity_map(initial_agent: Agent[Any]) -> dict[str, Agent[Any]]:
    unique = _agents_by_unique_name(initial_agent)
    return _sdk_identity_map(initial_agent) if unique is None else unique


def _ambiguous_ids(initial_agent: Agent[Any]) -> set[int]:
    if _agents_by_unique_name(initial_agent) is None:
        return _sdk_ambiguous_ids(initial_agent)
    return set()


def install() -> None:
    """Route the SDK's agent-identity functions through the fast path (idempotent)."""
    for module in (_agent_identity, _run_state_module):
        module._build_agent_identity_map = _identity_map  # type: ignore[attr-defined]  # SDK private
        module._get_ambiguous_agent_ids = _ambiguous_ids  # type: ignore[attr-defined]  # SDK private
