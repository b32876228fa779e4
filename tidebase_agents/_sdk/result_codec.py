"""The ``RunResult`` checkpoint codec: pure JSON in, a faithful live ``RunResult`` out (R1).

The layout is the SDK's own ``RunState`` JSON with the user context blanked, the public input,
and the final output encoded against the last agent's output type. Restoring binds it to the
live agent graph, so ``last_agent`` and every item's ``agent`` are the caller's own objects.
Most of what a result carries beyond its public fields lives in private ``RunState`` and
``RunResult`` attributes, read and set here (each such line is marked).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Mapping
from typing import Any, cast

import agents
import pydantic_core
from agents import Agent, RunContextWrapper, RunResult, RunResultStreaming
from agents.agent_output import AgentOutputSchema, AgentOutputSchemaBase
from agents.run_internal.run_steps import NextStepInterruption  # SDK private
from agents.run_state import RunState
from pydantic import TypeAdapter, ValidationError

from .._errors import CheckpointSerializationError
from .fingerprint import run_input_json
from .state import blanked_state_json, checkpoint_state
from .usage import merge_usage_into

CODEC_VERSION = 1
"""Version of the checkpoint layout written by :func:`encode_result`."""


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
    kind = encoded.get("kind")
    try:
        if kind == "none":
            return None
        if kind in ("text", "json"):
            return encoded["value"]
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
    except Exception as exc:  # a missing key, or a custom schema's own failure
        raise CheckpointSerializationError(
            f"recorded final output of agent {agent.name!r} is malformed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    raise CheckpointSerializationError(
        f"recorded final output ({kind!r}) does not fit agent {agent.name!r}, whose "
        f"output_type is now {agent.output_type!r}"
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
            "state": _compact_state(blanked_state_json(checkpoint_state(result))),
            "final_output": _encode_final_output(agent, result.final_output),
            "replay_from_model_input_items": bool(
                result._replay_from_model_input_items
            ),  # SDK private
        }
        json.dumps(payload, allow_nan=False)  # fail here, naming the agent, not in the database
    except CheckpointSerializationError:
        raise
    except Exception as exc:
        raise CheckpointSerializationError(
            f"result of agent {agent.name!r} cannot be stored as JSON: {exc}"
        ) from exc
    return payload


#: Stands for ``generated_items`` when they equal ``session_items`` (a tool loop, say): the
#: SDK keeps two copies of each item, and a long run's checkpoint was a third duplicates.
_SAME_AS_SESSION = {"$same_as": "session_items"}


def _compact_state(state_json: dict[str, Any]) -> dict[str, Any]:
    # A sandbox section only matters to resume a run inside its sandbox, which a replayed
    # result never does; reading one back makes the SDK import its sandbox extensions.
    state_json.pop("sandbox", None)
    if state_json.get("generated_items") == state_json.get("session_items"):
        state_json["generated_items"] = dict(_SAME_AS_SESSION)
    return state_json


def _expanded_state(state_json: dict[str, Any]) -> dict[str, Any]:
    if state_json.get("generated_items") == _SAME_AS_SESSION:
        return {**state_json, "generated_items": copy.deepcopy(state_json.get("session_items"))}
    return state_json


#: The top-level keys ``RunState.to_json`` writes (schema 1.21), ``sandbox`` left out.
_STATE_KEYS = frozenset(
    {
        "$schemaVersion",
        "auto_previous_response_id",
        "context",
        "conversation_id",
        "current_agent",
        "current_response_generated_item_ownership",
        "current_step",
        "current_turn",
        "current_turn_persisted_item_count",
        "generated_items",
        "generated_prompt_cache_key",
        "generated_session_item_indexes",
        "input_guardrail_results",
        "last_model_response",
        "last_processed_response",
        "max_turns",
        "model_responses",
        "nested_history_owned_session_item_refs",
        "no_active_agent_run",
        "original_input",
        "output_guardrail_results",
        "pending_input",
        "pending_session_write",
        "previous_response_id",
        "reasoning_item_id_policy",
        "session_items",
        "terminal_unrecoverable",
        "tool_input_guardrail_results",
        "tool_output_guardrail_results",
        "tool_use_tracker",
        "trace",
    }
)
_PAYLOAD_KEYS = frozenset(
    {"codec", "sdk", "input", "state", "final_output", "replay_from_model_input_items"}
)
#: Optional keys beside them (see ``replay``): absent from checkpoints written before them.
EXTRA_PAYLOAD_KEYS = frozenset({"context", "guardrails"})


def _shape_error(what: str) -> CheckpointSerializationError:
    return CheckpointSerializationError(f"agent checkpoint is malformed: {what}")


def _check_payload(payload: Any) -> dict[str, Any]:
    """Refuse what :func:`encode_result` never writes, before the SDK sees any of it."""
    if not isinstance(payload, dict):
        raise _shape_error(f"expected an object, found {type(payload).__name__}")
    if payload.get("codec") != CODEC_VERSION:
        raise CheckpointSerializationError(
            f"checkpoint codec {payload.get('codec')!r} is not supported (expected {CODEC_VERSION})"
        )
    keys = set(payload)
    if not _PAYLOAD_KEYS <= keys <= _PAYLOAD_KEYS | EXTRA_PAYLOAD_KEYS:
        odd = (keys ^ _PAYLOAD_KEYS) - EXTRA_PAYLOAD_KEYS
        raise _shape_error(f"keys {sorted(odd)} differ from a checkpoint's")
    state = payload["state"]
    if not isinstance(state, dict):
        raise _shape_error("its state is not an object")
    unknown = set(state) - _STATE_KEYS
    if unknown:
        raise _shape_error(f"its state has unexpected keys {sorted(unknown)}")
    if not isinstance(payload["final_output"], dict):
        raise _shape_error("its final output is not an object")
    return payload


async def restore_state(
    payload: Mapping[str, Any], starting_agent: Agent[Any], context: Any
) -> tuple[RunState[Any], RunContextWrapper[Any]]:
    """The recorded RunState bound to the live agent graph, and the result's context wrapper."""
    checked = _check_payload(payload)
    state_json = _expanded_state(checked["state"])
    live_value = context.context if isinstance(context, RunContextWrapper) else context
    try:
        state = await RunState.from_json(
            starting_agent,
            dict(state_json),  # from_json rewrites top-level keys (sandbox sanitizing)
            # from_json only accepts a plain RunContextWrapper, hence the wrap.
            context_override=RunContextWrapper(context=live_value),
        )
    except asyncio.CancelledError:
        raise  # the SDK's redacted cancellation is also an Exception: let it be a cancellation
    except Exception as exc:
        raise CheckpointSerializationError(
            f"checkpoint cannot be restored against the agent graph of {starting_agent.name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    for key, restored_items in (
        ("generated_items", state._generated_items),  # SDK private
        ("session_items", state._session_items),  # SDK private
    ):
        recorded = state_json.get(key)
        if isinstance(recorded, list) and len(recorded) != len(restored_items):
            # The SDK drops items of an unknown type or naming an agent it cannot find.
            raise CheckpointSerializationError(
                f"checkpoint of {starting_agent.name!r}: {len(restored_items)} of "
                f"{len(recorded)} {key} could be restored (an unknown item type, or an agent "
                f"missing from the live graph)"
            )
    restored = cast(RunContextWrapper[Any], state._context)  # SDK private; from_json always sets it
    if not isinstance(context, RunContextWrapper):
        return state, restored
    # The caller passed a wrapper (a ToolContext in agent-as-tool runs). The recorded usage is
    # this run's own usage (see sdk_run's isolate), so replay what the run did: add it to the
    # caller's wrapper, and give the result a copy of the caller's wrapper carrying that usage.
    wrapper = copy.copy(context)
    wrapper.usage = restored.usage
    restored._share_tool_state_with(wrapper)  # SDK private
    merge_usage_into(context, restored.usage)
    return state, wrapper


def _interruptions(state: RunState[Any]) -> list[Any]:
    step = state._current_step  # SDK private
    return list(step.interruptions) if isinstance(step, NextStepInterruption) else []


def apply_state(
    target: RunResult | RunResultStreaming,
    state: RunState[Any],
    payload: Mapping[str, Any],
    wrapper: RunContextWrapper[Any],
) -> Agent[Any]:
    """Set what both result types share, as the SDK sets it; returns the (live) last agent.

    Besides the public fields this covers what ``to_input_list()`` and ``to_state()`` read, so a
    replayed result can be continued or resumed exactly like the original.
    """
    last_agent = cast(Agent[Any], state._current_agent)  # SDK private
    # SDK private: the fields below are RunState internals, set as the SDK sets them.
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
    ``sdk_run(..., isolate=True)`` so that the recorded usage is the run's own.
    """
    state, wrapper = await restore_state(payload, starting_agent, context)
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
        _last_agent=cast(Agent[Any], state._current_agent),  # SDK private
    )
    apply_state(result, state, payload, wrapper)
    result._current_turn = state._current_turn  # SDK private
    return result
