"""What an agent checkpoint holds beside the ``RunResult`` codec's payload, and what a replay
does with it: the run context (R16), typed guardrail results, and the lifecycle hooks.

An agent step's payload (``result_codec.encode_result``) gains two optional keys, written
only when they have something to say, so checkpoints written before them replay unchanged:

- ``context``: the run context as the step ended (see :mod:`.context`);
- ``guardrails``: typed guardrail outputs (see :mod:`.guardrails`).

A deterministic failure's record (``errors.encode_agent_error``) gains the same two keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

from agents import Agent, RunResult, RunResultStreaming

from .._engine import StepSpec
from .context import restore, snapshot
from .guardrails import encode_guardrails, encode_tripwire, restore_guardrails, restore_tripwire
from .hooks import fire_replayed_hooks


def _add_extras(target: dict[str, Any], context: Any, guardrails: Any) -> dict[str, Any]:
    recorded = snapshot(context)
    if recorded is not None:
        target["context"] = recorded
    if guardrails is not None:
        target["guardrails"] = guardrails
    return target


def replay_finisher(
    agent: Agent[Any], run_input: Any, kwargs: Mapping[str, Any], context: Any
) -> Callable[[RunResult | RunResultStreaming, Mapping[str, Any]], Awaitable[None]]:
    """What completes a replayed result once the codec rebuilt it: the context brought to its
    recorded state in place, guardrail outputs typed again, the lifecycle hooks fired."""

    async def finish(result: RunResult | RunResultStreaming, payload: Mapping[str, Any]) -> None:
        restore(context, payload.get("context"))
        restore_guardrails(result, payload.get("guardrails"), agent, kwargs.get("run_config"))
        await fire_replayed_hooks(result, agent, run_input, kwargs.get("hooks"))

    return finish


def with_replay_extras(
    spec: StepSpec, agent: Agent[Any], run_input: Any, kwargs: Mapping[str, Any], context: Any
) -> StepSpec:
    """``spec`` (an agent step) whose checkpoints also hold the run context and typed
    guardrail outputs, and whose replays restore them and fire the lifecycle hooks."""
    encode, decode = spec.encode, spec.decode
    encode_error, raise_error = spec.encode_error, spec.raise_error
    finish = replay_finisher(agent, run_input, kwargs, context)
    run_config = kwargs.get("run_config")

    def encode_step(result: Any) -> Any:
        return _add_extras(dict(encode(result)), context, encode_guardrails(result))

    async def decode_step(payload: Any) -> Any:
        result = await decode(payload)
        await finish(result, payload)
        return result

    def encode_failure(exc: BaseException) -> dict[str, Any] | None:
        assert encode_error is not None
        record = encode_error(exc)
        if record is None:
            return None
        return _add_extras(dict(record), context, encode_tripwire(exc))

    def raise_failure(record: dict[str, Any]) -> NoReturn:
        assert raise_error is not None
        restore(context, record.get("context"))
        try:
            raise_error(record)
        except Exception as exc:
            restore_tripwire(exc, record.get("guardrails"), agent, run_config)
            raise

    return dataclasses.replace(
        spec,
        encode=encode_step,
        decode=decode_step,
        encode_error=encode_failure if encode_error is not None else None,
        raise_error=raise_failure if raise_error is not None else None,
    )
