"""Deterministic agent failures: recorded as a step's outcome and replayed as the same error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn, cast

import pydantic_core
from agents import Agent, RunContextWrapper
from agents._run_state_agent_identity import _build_agent_map  # SDK private
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
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    ToolInputGuardrail,
    ToolOutputGuardrail,
)
from agents.usage import deserialize_usage, serialize_usage

from .._errors import CheckpointSerializationError
from .usage import merge_usage_into

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
    if not isinstance(record, Mapping):
        raise CheckpointSerializationError("recorded agent error is not an object")
    cls = _ERRORS_BY_NAME.get(str(record.get("type")))
    if cls is None:
        raise CheckpointSerializationError(f"unknown recorded agent error {record.get('type')!r}")
    try:
        error = _rebuild(cls, record, context, starting_agent)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointSerializationError(
            f"recorded agent error is malformed: {type(exc).__name__}: {exc}"
        ) from None
    # The SDK's messages name the guardrail's class; keep the recorded text even though the
    # stand-in guardrail's class may differ from a user subclass.
    error.args = (str(record.get("message", "")),)
    raise error


def _rebuild(
    cls: type[Exception],
    record: Mapping[str, Any],
    context: Any,
    starting_agent: Agent[Any] | None,
) -> Exception:
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
            agents_by_name = _build_agent_map(starting_agent)  # SDK private
            agent = agents_by_name.get(record["agent"], starting_agent)
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
    return error
