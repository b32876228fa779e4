"""Everything that touches OpenAI Agents SDK internals lives here, and only here.

The library pins ``openai-agents`` 0.24.x because this module relies on private ``RunState`` /
``RunResult`` fields, on ``agents.run.set_default_agent_runner`` and on subclassing the
experimental ``AgentRunner``. The rest of the package talks to the SDK through this module's
functions, so an SDK upgrade is a change to one file plus its tests.

Parts:

* version guard (import fails clearly on another SDK series);
* agent fingerprints and run-input JSON, the raw material of step input hashes (I2);
* the ``RunResult`` checkpoint codec: pure JSON in, a faithful live ``RunResult`` out (R1);
* deterministic agent failures that replay as the same exception;
* token usage per model, and usage isolation for runs given a ``RunContextWrapper``;
* the runner hook that routes every ``Runner.run`` / ``run_sync`` / ``run_streamed``;
* streamed runs: completion callbacks and replay as a completed stream;
* plumbing for ``@durable_tool`` (context parameter detection and injection).
"""

# ruff: noqa: E402
# (the SDK version is checked before importing private SDK modules, so that a wrong version fails
# with our message instead of an obscure ImportError from a moved private name)

from __future__ import annotations

import agents
from agents.run_state import CURRENT_SCHEMA_VERSION

SDK_SERIES = "0.24"
_RUN_STATE_SCHEMA = "1.21"


def _check_sdk_version() -> None:
    version = str(agents.__version__)
    if version.split(".")[:2] != SDK_SERIES.split("."):
        raise ImportError(
            f"tidebase-agents needs openai-agents {SDK_SERIES}.x, found {version}; "
            f"install 'openai-agents>={SDK_SERIES},<0.25'"
        )
    if CURRENT_SCHEMA_VERSION != _RUN_STATE_SCHEMA:
        raise ImportError(
            f"tidebase-agents needs the Agents SDK RunState schema {_RUN_STATE_SCHEMA}, "
            f"found {CURRENT_SCHEMA_VERSION} (openai-agents {version})"
        )


_check_sdk_version()

import asyncio
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, Protocol, cast, get_origin

import pydantic_core
from agents import Agent, RunContextWrapper, RunResult, RunResultStreaming
from agents import _run_state_agent_identity as _agent_identity
from agents import run_state as _run_state_module
from agents._run_state_agent_identity import _build_agent_map
from agents.agent_output import AgentOutputSchema, AgentOutputSchemaBase
from agents.exceptions import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    OutputGuardrailTripwireTriggered,
    RunErrorDetails,
    ToolInputGuardrailTripwireTriggered,
    ToolOutputGuardrailTripwireTriggered,
)
from agents.guardrail import (
    GuardrailFunctionOutput,
    InputGuardrail,
    InputGuardrailResult,
    OutputGuardrail,
    OutputGuardrailResult,
)
from agents.handoffs import Handoff
from agents.items import HandoffOutputItem, RunItem
from agents.model_settings import ModelSettings
from agents.models.default_models import get_default_model
from agents.models.interface import Model
from agents.result import RunResultBase
from agents.run import AgentRunner, RunOptions, get_default_agent_runner, set_default_agent_runner
from agents.run_internal.run_steps import NextStepInterruption, QueueCompleteSentinel
from agents.run_internal.streaming import stream_step_items_to_queue
from agents.run_state import RunState
from agents.stream_events import AgentUpdatedStreamEvent
from agents.tool import FunctionTool
from agents.tool_context import ToolContext
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    ToolInputGuardrail,
    ToolOutputGuardrail,
)
from agents.usage import Usage, deserialize_usage, serialize_usage
from pydantic import TypeAdapter, ValidationError
from typing_extensions import Unpack

from ._errors import CheckpointSerializationError

CODEC_VERSION = 1
"""Version of the checkpoint layout written by :func:`encode_result`."""

_MISSING = object()


# --------------------------------------------------------------------------------------------
# RunState serialization fast path
# --------------------------------------------------------------------------------------------
# ``RunState.to_json`` (run for every agent checkpoint) ranks the agents of the graph by a
# signature of their whole configuration, to tell apart agents that share a name. When every
# name is unique that ranking cannot change anything, yet it is most of the cost of the call.
# The fast path returns what the SDK's functions return for such graphs and defers to them
# otherwise.

_sdk_identity_map = _agent_identity._build_agent_identity_map
_sdk_ambiguous_ids = _agent_identity._get_ambiguous_agent_ids


def _agents_by_unique_name(initial_agent: Agent[Any]) -> dict[str, Agent[Any]] | None:
    agents_by_name: dict[str, Agent[Any]] = {}
    for agent in _agent_identity._iter_agent_graph(initial_agent):
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


for _module in (_agent_identity, _run_state_module):
    _module._build_agent_identity_map = _identity_map  # type: ignore[attr-defined]
    _module._get_ambiguous_agent_ids = _ambiguous_ids  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def _canonical_sha256(value: Any) -> str:
    # I5: sorted keys, compact separators, UTF-8.
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_plain_json(value: Any) -> bool:
    """True for values that survive ``json.dumps``/``json.loads`` unchanged, type included.

    Exact types: an IntEnum or a str subclass would come back as a plain int or str.
    """
    kind = type(value)
    if value is None or kind in (str, bool, int):
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_is_plain_json(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    return False


def _input_item_json(item: Any) -> Any:
    # The SDK turns pydantic output items into input items with exclude_unset; do the same so a
    # pydantic item and the dict the SDK would make of it hash alike.
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json", exclude_unset=True)
    return pydantic_core.to_jsonable_python(item)


def _blanked_state_json(state: RunState[Any]) -> dict[str, Any]:
    """``state.to_json()`` without the user's context value (never persisted or hashed)."""
    shallow = copy.copy(state)
    if state._context is not None:
        # The SDK copies mapping contexts verbatim (secrets included): blank a copy of the
        # wrapper instead, which also leaves the caller's state untouched.
        shallow._context = copy.copy(state._context)
        shallow._context.context = None
    return shallow.to_json(context_serializer=lambda _ctx: {})


def _checkpoint_state(result: RunResult | RunResultStreaming) -> RunState[Any]:
    """``result.to_state()`` for a checkpoint: the user's context left out, and without the
    deep copies of usage, approvals and tool invocations the SDK makes so that a state can be
    resumed on its own. A checkpoint state is serialized at once and never resumed, so sharing
    them is safe; those copies were a quarter of the CPU of every agent checkpoint.

    A run stopped on interruptions (approvals, nested agent-tool states) takes the SDK's own
    path, which rebinds nested states to the copy's scope.
    """
    if result.interruptions:
        return result.to_state()
    wrapper = result.context_wrapper

    def shallow_copy() -> RunContextWrapper[Any]:
        copied = copy.copy(wrapper)
        copied.context = None
        return copied

    # An instance attribute shadows the method for this one synchronous call.
    wrapper._copy_for_run_state = shallow_copy  # type: ignore[method-assign]
    try:
        return result.to_state()
    finally:
        del wrapper._copy_for_run_state


# --------------------------------------------------------------------------------------------
# Fingerprints (I2)
# --------------------------------------------------------------------------------------------


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


def settings_json(settings: ModelSettings, what: str = "model_settings") -> dict[str, Any]:
    """Model settings as hashable JSON: no None fields, no SDK-generated prompt_cache_key."""
    try:
        data = _drop_none(settings.to_json_dict())
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

    Each top-level key is a *part*, so :func:`diff_fingerprint` can name what changed. Optional
    parts (``tool_use_behavior``, guardrails) appear only when they differ from the SDK default,
    so that adding parts in a later release leaves existing agents' hashes unchanged. MCP server
    tools are not covered: they are only known after an async ``list_tools`` call.
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
    return fingerprint


def diff_fingerprint(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the fingerprint parts that differ (a part present on one side only counts)."""
    return sorted(
        k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING)
    )


def run_input_json(input: str | list[Any] | RunState[Any]) -> Any:
    """The run input as JSON: text as-is, input items as dicts, a RunState as its hash."""
    if isinstance(input, str):
        return input
    try:
        if isinstance(input, RunState):
            return {"$run_state": _canonical_sha256(_blanked_state_json(input))}
        return [_input_item_json(item) for item in input]
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise CheckpointSerializationError(f"run input cannot be made JSON: {exc}") from exc


# --------------------------------------------------------------------------------------------
# RunResult codec (R1)
# --------------------------------------------------------------------------------------------


def _output_adapter(agent: Agent[Any]) -> TypeAdapter[Any] | None:
    output_type = agent.output_type
    if isinstance(output_type, AgentOutputSchema):
        output_type = output_type.output_type
    if output_type is None or output_type is str or isinstance(output_type, AgentOutputSchemaBase):
        return None
    return TypeAdapter(output_type)


def _encode_final_output(agent: Agent[Any], value: Any) -> dict[str, Any]:
    if value is None:
        return {"kind": "none"}
    output_type = agent.output_type
    if isinstance(output_type, AgentOutputSchemaBase) and not isinstance(
        output_type, AgentOutputSchema
    ):
        # A custom schema's validate_json is the only way back; accept it only if it round-trips.
        try:
            text = pydantic_core.to_json(value).decode()
            if output_type.validate_json(text) == value:
                return {"kind": "custom_schema", "json": text}
        except Exception:  # validate_json is user code: any failure means "does not round-trip"
            pass
    else:
        adapter = _output_adapter(agent)
        if adapter is not None:
            # The final output need not have the output type (a tool_use_behavior can end the
            # run with a tool's result), so only accept a dump that validates back to the value.
            try:
                dumped = adapter.dump_python(value, mode="json", warnings=False)
                if adapter.validate_python(dumped) == value:
                    return {"kind": "typed", "value": dumped}
            except (pydantic_core.PydanticSerializationError, ValidationError, ValueError):
                pass
        elif type(value) is str:
            return {"kind": "text", "value": value}
    if _is_plain_json(value):
        return {"kind": "json", "value": value}
    raise CheckpointSerializationError(
        f"final output of agent {agent.name!r} ({type(value).__qualname__}) cannot be stored as "
        f"JSON: it does not match the agent's output_type; give the agent an output_type that "
        f"describes it"
    )


def _decode_final_output(agent: Agent[Any], encoded: Mapping[str, Any]) -> Any:
    kind = encoded["kind"]
    if kind == "none":
        return None
    if kind in ("text", "json"):
        return encoded["value"]
    try:
        if kind == "typed":
            adapter = _output_adapter(agent)
            if adapter is not None:
                return adapter.validate_python(encoded["value"])
        elif kind == "custom_schema" and isinstance(agent.output_type, AgentOutputSchemaBase):
            return agent.output_type.validate_json(encoded["json"])
    except ValidationError as exc:
        raise CheckpointSerializationError(
            f"recorded final output no longer validates against the output_type of agent "
            f"{agent.name!r}: {exc}"
        ) from exc
    raise CheckpointSerializationError(
        f"recorded final output ({kind}) does not fit agent {agent.name!r}, whose output_type "
        f"is now {agent.output_type!r}"
    )


def encode_result(result: RunResult | RunResultStreaming) -> dict[str, Any]:
    """A pure-JSON checkpoint of a finished run (``RunResult`` or completed ``RunResultStreaming``).

    Layout: the SDK's own ``RunState`` JSON with the user context blanked, the public input, and
    the final output encoded against the last agent's output type. Never pickled; reading it back
    never imports or executes code. Raises :class:`CheckpointSerializationError` naming the agent
    when something cannot be JSON.
    """
    agent = result.last_agent
    try:
        payload = {
            "codec": CODEC_VERSION,
            "sdk": str(agents.__version__),
            "input": result.input
            if isinstance(result.input, str)
            else run_input_json(result.input),
            "state": _blanked_state_json(_checkpoint_state(result)),
            "final_output": _encode_final_output(agent, result.final_output),
            "replay_from_model_input_items": bool(result._replay_from_model_input_items),
        }
        json.dumps(payload, allow_nan=False)  # fail here, naming the agent, not in the database
    except CheckpointSerializationError:
        raise
    except Exception as exc:
        raise CheckpointSerializationError(
            f"result of agent {agent.name!r} cannot be stored as JSON: {exc}"
        ) from exc
    return payload


async def _restore_state(
    payload: Mapping[str, Any], starting_agent: Agent[Any], context: Any
) -> tuple[RunState[Any], RunContextWrapper[Any]]:
    """The recorded RunState bound to the live agent graph, and the result's context wrapper."""
    if payload.get("codec") != CODEC_VERSION:
        raise CheckpointSerializationError(
            f"checkpoint codec {payload.get('codec')!r} is not supported (expected {CODEC_VERSION})"
        )
    live_value = context.context if isinstance(context, RunContextWrapper) else context
    try:
        state = await RunState.from_json(
            starting_agent,
            dict(payload["state"]),  # from_json rewrites top-level keys (sandbox sanitizing)
            # from_json only accepts a plain RunContextWrapper, hence the wrap.
            context_override=RunContextWrapper(context=live_value),
        )
    except Exception as exc:
        raise CheckpointSerializationError(
            f"checkpoint cannot be restored against the agent graph of {starting_agent.name!r}: "
            f"{exc}"
        ) from exc
    restored = cast(RunContextWrapper[Any], state._context)  # from_json always sets it
    if not isinstance(context, RunContextWrapper):
        return state, restored
    # The caller passed a wrapper (a ToolContext in agent-as-tool runs). The recorded usage is
    # this run's own usage (see sdk_run's isolate_usage), so replay what the run did: add it to the
    # caller's wrapper, and give the result a copy of the caller's wrapper carrying that usage.
    wrapper = copy.copy(context)
    wrapper.usage = restored.usage
    restored._share_tool_state_with(wrapper)
    merge_usage_into(context, restored.usage)
    return state, wrapper


def _interruptions(state: RunState[Any]) -> list[Any]:
    step = state._current_step
    return list(step.interruptions) if isinstance(step, NextStepInterruption) else []


def _apply_state(
    target: RunResult | RunResultStreaming,
    state: RunState[Any],
    payload: Mapping[str, Any],
    wrapper: RunContextWrapper[Any],
) -> Agent[Any]:
    """Set what both result types share, as the SDK sets it; returns the (live) last agent.

    Besides the public fields this covers what ``to_input_list()`` and ``to_state()`` read, so a
    replayed result can be continued or resumed exactly like the original.
    """
    last_agent = cast(Agent[Any], state._current_agent)
    fields: dict[str, Any] = {
        "new_items": list(state._session_items),
        "raw_responses": list(state._model_responses),
        "final_output": _decode_final_output(last_agent, payload["final_output"]),
        "input_guardrail_results": list(state._input_guardrail_results),
        "output_guardrail_results": list(state._output_guardrail_results),
        "tool_input_guardrail_results": list(state._tool_input_guardrail_results),
        "tool_output_guardrail_results": list(state._tool_output_guardrail_results),
        "context_wrapper": wrapper,
        "max_turns": state._max_turns,
        "interruptions": _interruptions(state),
        "_last_processed_response": state._last_processed_response,
        "_tool_use_tracker_snapshot": state.get_tool_use_tracker_snapshot(),
        "_current_turn_persisted_item_count": state._current_turn_persisted_item_count,
        "_model_input_items": list(state._generated_items),
        "_replay_from_model_input_items": bool(payload["replay_from_model_input_items"]),
        "_original_input": state._original_input,
        "_nested_history_owned_session_item_refs": list(
            state._nested_history_owned_session_item_refs
        ),
        "_starting_agent_for_state": state._starting_agent,
        "_conversation_id": state._conversation_id,
        "_previous_response_id": state._previous_response_id,
        "_auto_previous_response_id": state._auto_previous_response_id,
        "_generated_prompt_cache_key": state._generated_prompt_cache_key,
        "_pending_input_for_state": copy.deepcopy(state._pending_input),
        "_pending_session_write": copy.deepcopy(state._pending_session_write),
        "_current_step_for_state": state._current_step,
        "_trace_state": state._trace_state,
        "_sandbox_resume_state": copy.deepcopy(state._sandbox),
        "_reasoning_item_id_policy": state._reasoning_item_id_policy,
    }
    for name, value in fields.items():
        setattr(target, name, value)
    return last_agent


async def decode_result(
    payload: Mapping[str, Any], starting_agent: Agent[Any], context: Any
) -> RunResult:
    """Rebuild a real ``RunResult`` from :func:`encode_result` output, bound to the live graph.

    ``last_agent`` and every item's ``agent`` are the live agents (resolved by name from
    ``starting_agent``); ``final_output`` is re-validated against the live last agent's output
    type; ``context_wrapper.context`` is the caller's live context. If ``context`` is a
    ``RunContextWrapper`` (a ``ToolContext`` in agent-as-tool runs) the recorded usage is added to
    it, as the original run did: call this once per replay, and record such runs with
    ``sdk_run(..., isolate_usage=True)`` so that the recorded usage is the run's own.
    """
    state, wrapper = await _restore_state(payload, starting_agent, context)
    result = RunResult(
        input=copy.deepcopy(payload["input"]),
        new_items=[],
        raw_responses=[],
        final_output=None,
        input_guardrail_results=[],
        output_guardrail_results=[],
        tool_input_guardrail_results=[],
        tool_output_guardrail_results=[],
        context_wrapper=wrapper,
        _last_agent=cast(Agent[Any], state._current_agent),
    )
    _apply_state(result, state, payload, wrapper)
    result._current_turn = state._current_turn
    return result


# --------------------------------------------------------------------------------------------
# Deterministic agent failures
# --------------------------------------------------------------------------------------------

_DETERMINISTIC_ERRORS: tuple[type[Exception], ...] = (
    MaxTurnsExceeded,
    InputGuardrailTripwireTriggered,
    OutputGuardrailTripwireTriggered,
    ToolInputGuardrailTripwireTriggered,
    ToolOutputGuardrailTripwireTriggered,
)
_ERRORS_BY_NAME = {cls.__name__: cls for cls in _DETERMINISTIC_ERRORS}


def _loose_json(value: Any) -> Any:
    # Guardrail infos are informational: keep what JSON can hold, repr() the rest.
    return pydantic_core.to_jsonable_python(value, fallback=repr)


def encode_agent_error(exc: BaseException) -> dict[str, Any] | None:
    """A JSON record for failures that replay as the same exception, else None (transient).

    Deterministic: ``MaxTurnsExceeded`` and the input/output/tool guardrail tripwires (given the
    same recorded model answers they recur). Everything else is transient, including
    ``ModelBehaviorError`` and ``ModelRefusalError``, which depend on what the model sent this
    time, API errors and timeouts. The record carries the run's usage, so a replayed nested run
    adds the tokens the original spent (see :func:`raise_recorded_error`).
    """
    kind = next((cls for cls in _DETERMINISTIC_ERRORS if isinstance(exc, cls)), None)
    if kind is None:
        return None
    record: dict[str, Any] = {"type": kind.__name__, "message": str(exc)}
    if isinstance(exc, (InputGuardrailTripwireTriggered, OutputGuardrailTripwireTriggered)):
        result = exc.guardrail_result
        record["guardrail"] = result.guardrail.get_name()
        record["output_info"] = _loose_json(result.output.output_info)
        if isinstance(result, OutputGuardrailResult):
            record["agent"] = result.agent.name
            record["agent_output"] = _loose_json(result.agent_output)
    elif isinstance(
        exc, (ToolInputGuardrailTripwireTriggered, ToolOutputGuardrailTripwireTriggered)
    ):
        record["guardrail"] = exc.guardrail.get_name()
        record["output_info"] = _loose_json(exc.output.output_info)
        record["behavior"] = dict(exc.output.behavior)
    run_data = getattr(exc, "run_data", None)
    if isinstance(run_data, RunErrorDetails):
        record["usage"] = serialize_usage(run_data.context_wrapper.usage)
    return record


def _returning(value: Any) -> Callable[..., Any]:
    """A stand-in guardrail function that answers what the original guardrail answered."""

    def recorded(*_args: Any, **_kwargs: Any) -> Any:
        return value

    return recorded


def _tool_guardrail_output(record: Mapping[str, Any]) -> ToolGuardrailFunctionOutput:
    return ToolGuardrailFunctionOutput(
        output_info=record["output_info"], behavior=cast(Any, record["behavior"])
    )


def raise_recorded_error(
    record: Mapping[str, Any],
    *,
    context: Any = None,
    starting_agent: Agent[Any] | None = None,
) -> NoReturn:
    """Raise the exception recorded by :func:`encode_agent_error`: same class, same message.

    Guardrail exceptions get a stub guardrail with the recorded name and ``output_info``; an
    output guardrail's ``agent`` is resolved by name from ``starting_agent``. ``run_data`` is
    None. If ``context`` is a ``RunContextWrapper`` the recorded usage is added to it, as the
    original run did (a failed nested run still spent its parent's tokens).
    """
    cls = _ERRORS_BY_NAME.get(str(record.get("type")))
    if cls is None:
        raise CheckpointSerializationError(f"unknown recorded agent error {record.get('type')!r}")
    if isinstance(context, RunContextWrapper) and record.get("usage"):
        merge_usage_into(context, deserialize_usage(record["usage"]))
    message = str(record["message"])
    name = record.get("guardrail")
    error: Exception
    if cls is InputGuardrailTripwireTriggered:
        output = GuardrailFunctionOutput(output_info=record["output_info"], tripwire_triggered=True)
        error = InputGuardrailTripwireTriggered(
            InputGuardrailResult(
                guardrail=InputGuardrail(guardrail_function=_returning(output), name=name),
                output=output,
            )
        )
    elif cls is OutputGuardrailTripwireTriggered:
        output = GuardrailFunctionOutput(output_info=record["output_info"], tripwire_triggered=True)
        agent = starting_agent
        if starting_agent is not None:
            agent = _build_agent_map(starting_agent).get(record["agent"], starting_agent)
        error = OutputGuardrailTripwireTriggered(
            OutputGuardrailResult(
                guardrail=OutputGuardrail(guardrail_function=_returning(output), name=name),
                agent_output=record["agent_output"],
                agent=cast(Agent[Any], agent),
                output=output,
            )
        )
    elif cls is ToolInputGuardrailTripwireTriggered:
        tool_output = _tool_guardrail_output(record)
        error = ToolInputGuardrailTripwireTriggered(
            ToolInputGuardrail(guardrail_function=_returning(tool_output), name=name), tool_output
        )
    elif cls is ToolOutputGuardrailTripwireTriggered:
        tool_output = _tool_guardrail_output(record)
        error = ToolOutputGuardrailTripwireTriggered(
            ToolOutputGuardrail(guardrail_function=_returning(tool_output), name=name), tool_output
        )
    else:
        error = MaxTurnsExceeded(message)
    # The SDK's messages name the guardrail's class; keep the recorded text even though the
    # stand-in guardrail's class may differ from a user subclass.
    error.args = (message,)
    raise error


# --------------------------------------------------------------------------------------------
# Usage (R9)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UsageEntry:
    """Tokens one run spent on one model."""

    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int


def _producing_items(responses: list[Any], items: list[RunItem]) -> list[int | None]:
    """Per response, the index of the first new item made from its output (None if none).

    Matching is by equality (identity on live results, equal fields after a JSON round trip)
    and moves forward only, so identical items in different turns pair up in order.
    """
    found: list[int | None] = []
    cursor = 0
    for response in responses:
        index = next(
            (
                i
                for output in response.output
                for i in range(cursor, len(items))
                if items[i].raw_item is output or items[i].raw_item == output
            ),
            None,
        )
        found.append(index)
        if index is not None:
            cursor = index + 1
    return found


def result_usage(
    result: RunResultBase | RunErrorDetails,
    agent: Agent[Any],
    *,
    skip_responses: int = 0,
) -> list[UsageEntry]:
    """Tokens of the run's own model responses, grouped by model, in first-use order.

    Each raw response is attributed to the agent whose items it produced, so handoffs between
    agents on different models split correctly; a response that produced no item (an empty
    answer) goes to the agent in charge after the handoffs before it; ``agent`` is the starting
    agent. Only the run's own ``raw_responses`` count: nested agent-as-tool runs are steps of
    their own and record their own usage, so nothing is counted twice. For a run resumed from a
    ``RunState`` pass ``skip_responses=state_response_count(input)`` taken before the run: those
    responses were counted by the run that produced the state. Also accepts a failed run's
    ``run_data`` (which lacks responses still in flight, e.g. one a parallel input guardrail
    cut short; their tokens are only in ``run_data.context_wrapper.usage``).
    """
    items = list(result.new_items)
    responses = list(result.raw_responses)
    produced = _producing_items(responses, items)
    current, seen = agent, 0
    totals: dict[str, list[int]] = {}
    for number, (response, index) in enumerate(zip(responses, produced, strict=True)):
        end = index
        if end is None:  # up to the next response's first item
            end = next((i for i in produced[number + 1 :] if i is not None), len(items))
        for item in items[seen:end]:
            if isinstance(item, HandoffOutputItem):
                current = item.target_agent
        if index is not None:
            current = getattr(items[index], "agent", None) or current
            end = index + 1
        seen = end
        if number < skip_responses:
            continue
        usage = response.usage
        sums = totals.setdefault(model_name(current.model), [0] * 6)
        for i, value in enumerate(
            (
                usage.requests,
                usage.input_tokens,
                usage.output_tokens,
                usage.input_tokens_details.cached_tokens,
                usage.output_tokens_details.reasoning_tokens,
                usage.total_tokens,
            )
        ):
            sums[i] += value or 0
    return [UsageEntry(model, *values) for model, values in totals.items()]


def state_response_count(input: Any) -> int:
    """How many model responses a ``RunState`` run input already holds (0 for other inputs).

    A run resumed from that state returns them again at the start of its ``raw_responses``.
    """
    return len(input._model_responses) if isinstance(input, RunState) else 0


def usage_of(result: RunResultBase) -> dict[str, Any]:
    """The result's ``context_wrapper.usage`` in the SDK's JSON form."""
    return serialize_usage(result.context_wrapper.usage)


def merge_usage_into(context_wrapper: RunContextWrapper[Any], usage: Usage) -> None:
    """Add ``usage`` (requests, tokens, details, per-request entries) to a live wrapper."""
    context_wrapper.usage.add(usage)


def _isolate_usage(
    kwargs: Mapping[str, Any], isolate: bool
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """Run kwargs whose wrapper context has its own Usage, and how to settle it afterwards."""
    call_kwargs = dict(kwargs)
    caller = call_kwargs.get("context")
    if not (isolate and isinstance(caller, RunContextWrapper)):
        return call_kwargs, None
    # A shallow copy keeps the live context value, the ToolContext identity fields and the SDK's
    # agent-tool scope attribute; only the Usage is the run's own.
    own = copy.copy(caller)
    own.usage = Usage()
    call_kwargs["context"] = own
    return call_kwargs, lambda: merge_usage_into(caller, own.usage)


# --------------------------------------------------------------------------------------------
# Runner interception
# --------------------------------------------------------------------------------------------


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
    isolate_usage: bool = False,
) -> RunResult:
    """Run the agent the way the SDK (or the delegate runner) would have.

    With ``isolate_usage`` and a ``RunContextWrapper`` context (a ``ToolContext`` in nested
    agent-as-tool runs), the run gets a copy of the wrapper with a fresh ``Usage``, which is added
    to the caller's wrapper when the run ends (also on failure). The result's (and a failure's
    ``run_data``) ``context_wrapper.usage`` is then exactly this run's usage, nested runs
    included, which is what :func:`encode_result` records and :func:`decode_result` adds back.
    Totals on the caller's wrapper equal an unintercepted run's. Use it inside pipelines;
    parallel sub-runs sharing one parent Usage is why a before/after delta would not do.
    """
    call_kwargs, settle = _isolate_usage(kwargs, isolate_usage)
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
    isolate_usage: bool = False,
) -> RunResultStreaming:
    """Start a streamed run the way the SDK would; ``isolate_usage`` as in :func:`sdk_run`
    (the caller's wrapper receives the usage when the stream's run task ends)."""
    call_kwargs, settle = _isolate_usage(kwargs, isolate_usage)
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


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def _stream_outcome(streamed: RunResultStreaming) -> BaseException | None:
    """The exception a consumer of ``stream_events()`` would get, or None."""
    task = streamed.run_loop_task
    if task is not None and task.done():
        if task.cancelled():
            return asyncio.CancelledError()
        error = task.exception()
        if error is not None:
            return error
    if streamed._stored_exception is not None:
        return streamed._stored_exception
    # The run task can end normally although stream_events() will raise: a parallel input
    # guardrail that trips after the answer, or the turn limit. Build those errors as it does.
    late_error: InputGuardrailTripwireTriggered | MaxTurnsExceeded | None = None
    for guardrail_result in streamed.input_guardrail_results:
        if guardrail_result.output.tripwire_triggered:
            late_error = InputGuardrailTripwireTriggered(guardrail_result)
            break
    else:
        if (
            streamed.max_turns is not None
            and streamed.current_turn > streamed.max_turns
            and not streamed._max_turns_handled
        ):
            late_error = MaxTurnsExceeded(f"Max turns ({streamed.max_turns}) exceeded")
    if late_error is not None:
        late_error.run_data = streamed._create_error_details()
    return late_error


def on_stream_complete(
    streamed: RunResultStreaming,
    callback: Callable[[RunResultStreaming, BaseException | None], Awaitable[None]],
) -> asyncio.Task[None]:
    """Run ``callback(streamed, error)`` once the stream's run has finished, consumed or not.

    The SDK's run task does not wait for a consumer (events queue up unbounded), so the callback
    fires even if nobody iterates ``stream_events()``. ``error`` is what ``stream_events()``
    raises (including ``MaxTurnsExceeded``, which the SDK only raises there) or None.
    """
    tasks = [t for t in (streamed.run_loop_task, streamed._input_guardrails_task) if t is not None]

    async def watch() -> None:
        if tasks:
            await asyncio.wait(tasks)
        await callback(streamed, _stream_outcome(streamed))

    return asyncio.create_task(watch())


def replay_streamed(
    payload: Mapping[str, Any], starting_agent: Agent[Any], context: Any
) -> RunResultStreaming:
    """A ``RunResultStreaming`` replayed from :func:`encode_result` output. Needs a running loop.

    ``stream_events()`` yields the recorded semantic events: an ``AgentUpdatedStreamEvent`` for
    the starting agent, a ``RunItemStreamEvent`` per item with the SDK's names, another agent
    update after each handoff, then stops. Raw token deltas (``raw_response_event``) are not
    replayed. Restoring is async (the SDK's ``RunState.from_json``), so like a live stream the
    result completes in its ``run_loop_task``; after the events (or awaiting that task) it has
    ``final_output``, ``new_items``, ``last_agent`` and usage as :func:`decode_result` gives.
    """
    placeholder = context if isinstance(context, RunContextWrapper) else RunContextWrapper(context)
    streamed = RunResultStreaming(
        input=copy.deepcopy(payload["input"]),
        new_items=[],
        raw_responses=[],
        final_output=None,
        input_guardrail_results=[],
        output_guardrail_results=[],
        tool_input_guardrail_results=[],
        tool_output_guardrail_results=[],
        context_wrapper=placeholder,
        current_agent=starting_agent,
        current_turn=0,
        max_turns=None,
        _current_agent_output_schema=None,
        trace=None,
    )
    streamed.run_loop_task = asyncio.create_task(
        _fill_replayed_stream(streamed, payload, starting_agent, context)
    )
    return streamed


async def _fill_replayed_stream(
    streamed: RunResultStreaming,
    payload: Mapping[str, Any],
    starting_agent: Agent[Any],
    context: Any,
) -> None:
    try:
        state, wrapper = await _restore_state(payload, starting_agent, context)
        streamed.current_agent = _apply_state(streamed, state, payload, wrapper)
        streamed.current_turn = state._current_turn

        queue = streamed._event_queue
        queue.put_nowait(AgentUpdatedStreamEvent(new_agent=starting_agent))
        for item in streamed.new_items:
            stream_step_items_to_queue([item], queue)  # the SDK's item -> event-name mapping
            if isinstance(item, HandoffOutputItem):
                queue.put_nowait(AgentUpdatedStreamEvent(new_agent=item.target_agent))
        streamed.is_complete = True
    finally:
        # Unblock consumers even if restoring failed; stream_events() then raises the error.
        streamed._event_queue.put_nowait(QueueCompleteSentinel())


# --------------------------------------------------------------------------------------------
# @durable_tool plumbing
# --------------------------------------------------------------------------------------------

_CONTEXT_CLASSES = (RunContextWrapper, ToolContext)
_CONTEXT_CLASS_NAMES = frozenset(cls.__name__ for cls in _CONTEXT_CLASSES)
_INJECTED_CONTEXT = "_tidebase_tool_context"


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``function_tool`` would pass ``fn`` a context as its first argument.

    Mirrors the SDK's rule: the first parameter's resolved annotation, or its generic origin, is
    exactly ``RunContextWrapper`` or ``ToolContext``. String annotations (``from __future__ import
    annotations``) are resolved in ``fn``'s module; one that cannot be resolved yet is matched by
    its class name.
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    first = params[0]
    try:
        annotation = typing.get_type_hints(fn, include_extras=True).get(
            first.name, first.annotation
        )
    except (NameError, TypeError):
        annotation = first.annotation
    if isinstance(annotation, str):
        return annotation.split("[", 1)[0].rsplit(".", 1)[-1].strip() in _CONTEXT_CLASS_NAMES
    origin = get_origin(annotation) or annotation
    return any(origin is cls for cls in _CONTEXT_CLASSES)


def inject_context_parameter(wrapper: Callable[..., Any], fn: Callable[..., Any]) -> None:
    """Make ``wrapper`` (a ``functools.wraps(fn)`` wrapper) advertise a leading ``ToolContext``.

    ``function_tool`` then passes the ToolContext as the first positional argument and leaves it
    out of the JSON schema, so ``fn`` keeps its exact schema, name and description while the
    wrapper learns the tool call. The wrapper must drop that argument before calling ``fn``.
    """
    signature = inspect.signature(fn)
    context_param = inspect.Parameter(
        _INJECTED_CONTEXT, inspect.Parameter.POSITIONAL_ONLY, annotation=ToolContext
    )
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[context_param, *signature.parameters.values()]
    )
    # A fresh dict (functools.wraps shares fn's), holding the class itself rather than a string:
    # string annotations are resolved in fn's module, which need not import ToolContext.
    wrapper.__annotations__ = {_INJECTED_CONTEXT: ToolContext, **fn.__annotations__}
