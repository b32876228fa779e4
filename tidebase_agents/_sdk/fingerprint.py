"""Fingerprints: the parts of an agent call that determine its answer (contract I2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pydantic_core
from agents import Agent
from agents.agent_output import AgentOutputSchema, AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.model_settings import ModelSettings
from agents.models.default_models import get_default_model
from agents.models.interface import Model
from agents.run_state import RunState
from agents.tool import FunctionTool
from pydantic import TypeAdapter

from .._errors import CheckpointSerializationError
from .._hashing import sha256_hex
from .state import blanked_state_json


def _input_item_json(item: Any) -> Any:
    # The SDK turns pydantic output items into input items with exclude_unset; do the same so a
    # pydantic item and the dict the SDK would make of it hash alike.
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json", exclude_unset=True)
    return pydantic_core.to_jsonable_python(item)


def _qualified_name(obj: Any) -> str:
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def model_name(model: str | Model | None) -> str:
    """The model an agent (or a RunConfig) names: the string, a Model's ``.model``, or the
    Model's class; an unset model is the SDK's default model."""
    if isinstance(model, str):
        return model
    if model is None:
        # What the SDK resolves an unset model to (unless a RunConfig overrides it).
        return get_default_model()
    name = getattr(model, "model", None)
    return name if isinstance(name, str) else _qualified_name(type(model))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# What ModelSettings.to_json_dict() dumps through, built once: the SDK builds a new adapter on
# every call, which was most of the cost of fingerprinting an agent or a model turn.
_SETTINGS: TypeAdapter[ModelSettings] = TypeAdapter(ModelSettings)


def settings_json(settings: ModelSettings, what: str = "model_settings") -> dict[str, Any]:
    """Model settings as hashable JSON: no None fields, no SDK-generated prompt_cache_key."""
    try:
        data = _drop_none(_SETTINGS.dump_python(settings, mode="json"))
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise CheckpointSerializationError(f"{what} cannot be made JSON: {exc}") from exc
    extra = data.get("extra_args")
    if isinstance(extra, dict):
        # The SDK injects a random per-run prompt_cache_key; it must not change the hash.
        extra.pop("prompt_cache_key", None)
        if not extra:
            del data["extra_args"]
    return cast(dict[str, Any], data)


def _output_schema_json(output_type: Any) -> dict[str, Any] | None:
    if output_type is None or output_type is str:
        return None
    schema = (
        output_type
        if isinstance(output_type, AgentOutputSchemaBase)
        else AgentOutputSchema(output_type)
    )
    return None if schema.is_plain_text() else schema.json_schema()


def _tool_use_behavior_json(behavior: Any) -> Any:
    if isinstance(behavior, str):
        return behavior
    if isinstance(behavior, Mapping):  # StopAtTools
        return {"stop_at_tool_names": sorted(behavior.get("stop_at_tool_names", []))}
    return f"callable:{_qualified_name(behavior)}"


def agent_fingerprint(agent: Agent[Any]) -> dict[str, Any]:
    """The JSON-able parts of ``agent`` that determine its answer (contract I2).

    Each top-level key is a *part*, so a mismatch can name what changed. Optional
    parts (``tool_use_behavior``, guardrails) appear only when they differ from the SDK default,
    so that adding parts in a later release leaves existing agents' hashes unchanged. MCP servers
    count by name only: their tools are known only from an async ``list_tools`` call to a
    connected server (a replay must not need one), and a list that a server, its filters or a
    cache may answer differently between attempts would turn finished checkpoints stale.
    """
    tools: list[dict[str, Any]] = []
    for tool in agent.tools:
        if isinstance(tool, FunctionTool):
            tools.append({"name": tool.name, "params": tool.params_json_schema})
        else:
            tools.append({"name": getattr(tool, "name", None), "type": type(tool).__name__})
    tools.sort(key=lambda t: (str(t["name"]), t.get("type", "")))
    instructions = agent.instructions
    fingerprint: dict[str, Any] = {
        "name": agent.name,
        "instructions": (
            f"callable:{_qualified_name(instructions)}" if callable(instructions) else instructions
        ),
        "model": model_name(agent.model),
        "model_settings": settings_json(
            agent.model_settings, what=f"model_settings of agent {agent.name!r}"
        ),
        "tools": tools,
        "handoffs": sorted(
            h.agent_name if isinstance(h, Handoff) else h.name for h in agent.handoffs
        ),
        "output_type": _output_schema_json(agent.output_type),
    }
    if agent.tool_use_behavior != "run_llm_again":
        fingerprint["tool_use_behavior"] = _tool_use_behavior_json(agent.tool_use_behavior)
    if agent.input_guardrails:
        fingerprint["input_guardrails"] = [g.get_name() for g in agent.input_guardrails]
    if agent.output_guardrails:
        fingerprint["output_guardrails"] = [g.get_name() for g in agent.output_guardrails]
    if agent.mcp_servers:
        fingerprint["mcp_servers"] = sorted(server.name for server in agent.mcp_servers)
    return fingerprint


def run_input_json(input: str | list[Any] | RunState[Any]) -> Any:
    """The run input as JSON: text as-is, input items as dicts, a RunState as its hash."""
    if isinstance(input, str):
        return input
    try:
        if isinstance(input, RunState):
            return {"$run_state": sha256_hex(blanked_state_json(input))}
        return [_input_item_json(item) for item in input]
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise CheckpointSerializationError(f"run input cannot be made JSON: {exc}") from exc


def run_options_parts(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Run options that change the answer: a run-wide model or settings override, and the
    server-side conversation the run continues."""
    parts: dict[str, Any] = {}
    config = kwargs.get("run_config")
    if config is not None and getattr(config, "model", None) is not None:
        parts["run_config.model"] = model_name(config.model)
    if config is not None and getattr(config, "model_settings", None) is not None:
        parts["run_config.model_settings"] = settings_json(config.model_settings)
    for option in ("previous_response_id", "conversation_id"):
        if kwargs.get(option):
            parts[option] = kwargs[option]
    return parts
