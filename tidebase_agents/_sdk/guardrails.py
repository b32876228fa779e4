"""Guardrail results that replay with the types the guardrails returned.

The SDK's ``RunState`` JSON keeps a guardrail's ``output_info`` and an output guardrail's
``agent_output`` as bare JSON, so a result rebuilt from it holds dicts. An agent checkpoint
therefore keeps, beside the state, a typed copy of each (JSON dumped by pydantic), and a replay
puts the types back:

- ``agent_output`` by the live agent's ``output_type``;
- ``output_info`` only as a class this process allows: one registered with
  :func:`tidebase_agents.register_types`, or named by the annotations of the live guardrail
  function. The checkpoint names the class, but naming it never makes it constructible (R14);
  anything else stays the JSON the SDK restores.

Replayed results also point at the live guardrail objects again (matched by name), not at the
SDK's stand-ins. Tripwires recorded as a step's outcome get the same treatment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agents import Agent
from agents.exceptions import (
    InputGuardrailTripwireTriggered,
    OutputGuardrailTripwireTriggered,
    ToolInputGuardrailTripwireTriggered,
    ToolOutputGuardrailTripwireTriggered,
)
from agents.guardrail import OutputGuardrailResult
from agents.result import RunResultBase
from agents.tool import FunctionTool
from pydantic import BaseModel, TypeAdapter

from .._codec import class_ref, register_annotations, registered_type
from .result_codec import _output_adapter

_KINDS = (
    ("input", "input_guardrail_results"),
    ("output", "output_guardrail_results"),
    ("tool_input", "tool_input_guardrail_results"),
    ("tool_output", "tool_output_guardrail_results"),
)


def _name(guardrail: Any) -> str | None:
    getter = getattr(guardrail, "get_name", None)
    name = getter() if callable(getter) else getattr(guardrail, "name", None)
    return name if isinstance(name, str) else None


def _typed_info(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, (BaseModel, enum.Enum)) and not (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        return None  # plain JSON (the SDK keeps it) or a type nothing could rebuild
    try:
        dumped = TypeAdapter(type(value)).dump_python(value, mode="json", warnings=False)
    except Exception:  # a field pydantic cannot dump: keep what the SDK stores
        return None
    return {"type": class_ref(type(value)), "value": dumped}


def _typed_output(agent: Any, value: Any) -> Any:
    adapter = _output_adapter(agent) if isinstance(agent, Agent) else None
    if adapter is None:
        return None
    try:
        return {"value": adapter.dump_python(value, mode="json", warnings=False)}
    except Exception:  # not of the output type (a tool_use_behavior's answer): leave it
        return None


def _entry(guardrail: Any, output: Any, agent: Any = None, agent_output: Any = None) -> Any:
    entry: dict[str, Any] = {"name": _name(guardrail)}
    info = _typed_info(output.output_info)
    if info is not None:
        entry["output_info"] = info
    if agent is not None:
        typed = _typed_output(agent, agent_output)
        if typed is not None:
            entry["agent_output"] = typed
    return entry


def encode_guardrails(result: RunResultBase) -> dict[str, Any] | None:
    """The typed side of a result's guardrail results, or None when there is nothing to add."""
    section: dict[str, Any] = {}
    for key, attr in _KINDS:
        entries = [
            _entry(
                r.guardrail,
                r.output,
                *((r.agent, r.agent_output) if isinstance(r, OutputGuardrailResult) else ()),
            )
            for r in getattr(result, attr)
        ]
        if any(len(e) > 1 for e in entries):
            section[key] = entries
    return section or None


def _live_guardrails(agents: Iterable[Any], run_config: Any) -> dict[tuple[str, str], Any]:
    """Guardrails of the live agents (and the run config) by (kind, name)."""
    found: dict[tuple[str, str], Any] = {}

    def add(kind: str, guardrails: Sequence[Any] | None) -> None:
        for guardrail in guardrails or ():
            name = _name(guardrail)
            if name is not None:
                found.setdefault((kind, name), guardrail)

    add("input", getattr(run_config, "input_guardrails", None))
    add("output", getattr(run_config, "output_guardrails", None))
    for agent in agents:
        if not isinstance(agent, Agent):
            continue
        add("input", agent.input_guardrails)
        add("output", agent.output_guardrails)
        for tool in agent.tools:
            if isinstance(tool, FunctionTool):
                add("tool_input", tool.tool_input_guardrails)
                add("tool_output", tool.tool_output_guardrails)
    return found


def _info(recorded: Any, guardrail: Any, fallback: Any) -> Any:
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("type"), str):
        return fallback
    if guardrail is not None:
        function = getattr(guardrail, "guardrail_function", None)
        if callable(function):
            register_annotations(function)
    cls = registered_type(recorded["type"])
    if cls is None:
        return fallback
    try:
        return TypeAdapter(cls).validate_python(recorded.get("value"))
    except Exception:  # the class changed since: the SDK's JSON is all there is
        return fallback


def _retype(
    kind: str,
    result: Any,
    entry: Any,
    live: Mapping[tuple[str, str], Any],
    output: Any,
) -> None:
    if not isinstance(entry, Mapping):
        return
    name = entry.get("name")
    guardrail = live.get((kind, name)) if isinstance(name, str) else None
    if guardrail is not None and hasattr(result, "guardrail"):
        result.guardrail = guardrail
    output.output_info = _info(entry.get("output_info"), guardrail, output.output_info)
    typed = entry.get("agent_output")
    agent = getattr(result, "agent", None)
    adapter = _output_adapter(agent) if isinstance(agent, Agent) else None
    if isinstance(typed, Mapping) and adapter is not None:
        with contextlib.suppress(Exception):  # the output type changed: keep the SDK's JSON
            result.agent_output = adapter.validate_python(typed.get("value"))


def restore_guardrails(
    result: RunResultBase, recorded: Any, starting_agent: Agent[Any], run_config: Any
) -> None:
    """Put the recorded types back on a replayed result's guardrail results, in place."""
    agents = [starting_agent, result.last_agent, *(item.agent for item in result.new_items)]
    live = _live_guardrails(agents, run_config)
    for key, attr in _KINDS:
        results = getattr(result, attr)
        entries = recorded.get(key) if isinstance(recorded, Mapping) else None
        if not isinstance(entries, list) or len(entries) != len(results):
            entries = [{"name": _name(r.guardrail)} for r in results]  # relink only
        for r, entry in zip(results, entries, strict=True):
            _retype(key, r, entry, live, r.output)


def _tripwire(exc: BaseException) -> tuple[str, Any, Any] | None:
    """(kind, the result-like object, its guardrail output) of a guardrail tripwire."""
    if isinstance(exc, InputGuardrailTripwireTriggered):
        return "input", exc.guardrail_result, exc.guardrail_result.output
    if isinstance(exc, OutputGuardrailTripwireTriggered):
        return "output", exc.guardrail_result, exc.guardrail_result.output
    if isinstance(exc, ToolInputGuardrailTripwireTriggered):
        return "tool_input", exc, exc.output
    if isinstance(exc, ToolOutputGuardrailTripwireTriggered):
        return "tool_output", exc, exc.output
    return None


def encode_tripwire(exc: BaseException) -> dict[str, Any] | None:
    """The typed side of a tripwire error's guardrail result, or None."""
    found = _tripwire(exc)
    if found is None:
        return None
    _, holder, output = found
    if isinstance(holder, OutputGuardrailResult):
        entry = _entry(holder.guardrail, output, holder.agent, holder.agent_output)
    else:
        entry = _entry(holder.guardrail, output)
    return entry if len(entry) > 1 else None


def restore_tripwire(
    exc: BaseException, recorded: Any, starting_agent: Agent[Any], run_config: Any
) -> None:
    """Put the recorded types back on a replayed tripwire error, in place."""
    found = _tripwire(exc)
    if found is None:
        return
    kind, holder, output = found
    live = _live_guardrails([starting_agent, getattr(holder, "agent", None)], run_config)
    entry = recorded if isinstance(recorded, Mapping) else {"name": _name(holder.guardrail)}
    _retype(kind, holder, entry, live, output)
