"""Agents SDK integration: every ``Runner.run`` / ``run_sync`` / ``run_streamed`` inside a
pipeline is a checkpointed agent step (I1, I2, R1); outside one the SDK runs untouched.

SDK internals are reached only through :mod:`._sdk`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from . import _sdk
from ._context import Scope, StopRun, _tool_call, active_run, current_scope
from ._hashing import parts_hash, sha256_hex
from ._runtime import Execution, Run, StepSpec
from ._session import DurableSession
from ._store import Usage, utcnow


def _agent_scope(run: Run, context: Any) -> Scope:
    """The scope an agent call's step name is allocated in.

    An agent used as a tool (``agent.as_tool``) runs with the tool call's ``ToolContext``; its
    steps nest under ``tool:<name>:<args hash>#<n>`` of the calling agent step (I3), never
    under the model's call id, which changes when the calling agent is re-executed.
    """
    scope = current_scope() or run.root_scope
    nested = _sdk.tool_call_scope(context)
    if nested is None or _tool_call.get() is not None:
        return scope
    tool_name, arguments = nested
    key = f"tool:{tool_name}:{sha256_hex(arguments)[:12]}"
    return Scope(prefix=f"{scope.prefix}{key}#{scope.next_ordinal(key)}/")


def _claim(run: Run, scope: Scope, agent_name: str, input_hash: str) -> str:
    """Allocate the step name of one agent call (I1).

    The n-th call of an agent in a scope is ``agent:<name>#<n>``, counted in call-start order.
    Concurrent calls may start in another order on a later attempt, so a call whose input
    matches a recorded, unclaimed checkpoint of the same agent takes that one. Otherwise the
    call keeps its own slot, where a different recorded input raises ``StepInputMismatch`` —
    unless the call runs in a task of its own (``gather``, ``create_task``): then the slot may
    belong to a sibling that has not started yet, and the call takes a fresh slot.
    """
    base = f"{scope.prefix}agent:{agent_name}#"
    own = f"{base}{scope.next_ordinal('agent:' + agent_name)}"
    candidates = [
        own,
        *sorted(
            (
                name
                for name in run.recorded_names(base)
                if name != own and _is_ordinal(name, base) and name not in scope.claimed
            ),
            key=lambda name: int(name[len(base) :]),
        ),
    ]
    for name in candidates:
        rec = run.recorded(name)
        if name not in scope.claimed and rec is not None and rec.input_hash == input_hash:
            scope.claimed.add(name)
            return name
    taken = own in scope.claimed or (run.recorded(own) is not None and scope.in_concurrent_task())
    if not taken:
        scope.claimed.add(own)
        return own
    n = 1
    while f"{base}{n}" in scope.claimed or run.recorded(f"{base}{n}") is not None:
        n += 1
    name = f"{base}{n}"
    scope.claimed.add(name)
    return name


def _is_ordinal(name: str, base: str) -> bool:
    return re.fullmatch(r"\d+", name[len(base) :]) is not None


def _usage_rows(step: str, result: Any, agent: Any, skip: int) -> Sequence[Usage]:
    return [
        Usage(
            dedupe_key=f"{step}|{entry.model}",
            step=step,
            model=entry.model,
            requests=entry.requests,
            input_tokens=entry.input_tokens,
            output_tokens=entry.output_tokens,
            cached_tokens=entry.cached_tokens,
            reasoning_tokens=entry.reasoning_tokens,
            total_tokens=entry.total_tokens,
        )
        for entry in _sdk.result_usage(result, agent, skip_responses=skip)
    ]


def _run_options_parts(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run options that change the answer: a run-wide model or settings override."""
    parts: dict[str, Any] = {}
    config = kwargs.get("run_config")
    if config is not None and getattr(config, "model", None) is not None:
        parts["run_config.model"] = _sdk.model_name(config.model)
    if config is not None and getattr(config, "model_settings", None) is not None:
        parts["run_config.model_settings"] = _sdk.settings_json(config.model_settings)
    for option in ("previous_response_id", "conversation_id"):
        if kwargs.get(option):
            parts[option] = kwargs[option]
    return parts


def _agent_spec(run: Run, runner: Any, agent: Any, input: Any, kwargs: dict[str, Any]) -> StepSpec:
    context = kwargs.get("context")
    if kwargs.get("session") is not None and not isinstance(kwargs["session"], DurableSession):
        kwargs = {**kwargs, "session": DurableSession(kwargs["session"], run)}
    parts = {**_sdk.agent_fingerprint(agent), **_run_options_parts(kwargs)}
    parts["input"] = _sdk.run_input_json(input)
    input_hash, per_part = parts_hash(parts, what=f"input of agent {agent.name!r}")
    scope = _agent_scope(run, context)
    name = _claim(run, scope, agent.name, input_hash)
    skip = _sdk.state_response_count(input)

    async def decode(payload: Any) -> Any:
        return await _sdk.decode_result(payload, agent, context)

    return StepSpec(
        name=name,
        fn=lambda: _sdk.sdk_run(runner, agent, input, kwargs, isolate_usage=True),
        input_hash=input_hash,
        input_parts=per_part,
        encode=_sdk.encode_result,
        decode=decode,
        encode_error=_sdk.encode_agent_error,
        raise_error=lambda record: _sdk.raise_recorded_error(
            record, context=context, starting_agent=agent
        ),
        usage=lambda result: _usage_rows(name, result, agent, skip),
    )


class _Interceptor:
    """Turns agent runs inside a pipeline into steps of the executing run."""

    async def run(
        self, runner: Any, starting_agent: Any, input: Any, kwargs: dict[str, Any]
    ) -> Any:
        run = active_run()
        if run is None:
            return await _sdk.sdk_run(runner, starting_agent, input, kwargs)
        try:
            return await run.execute(_agent_spec(run, runner, starting_agent, input, kwargs))
        except StopRun as stop:
            if _sdk.tool_call_scope(kwargs.get("context")) is not None:
                raise  # an agent used as a tool: stop the calling agent run too
            raise stop.error from None

    def run_streamed(
        self, runner: Any, starting_agent: Any, input: Any, kwargs: dict[str, Any]
    ) -> Any:
        run = active_run()
        if run is None:
            return _sdk.sdk_run_streamed(runner, starting_agent, input, kwargs)
        spec = _agent_spec(run, runner, starting_agent, input, kwargs)
        decision = run.lookup(spec)
        if decision.kind == "replay":
            assert decision.record is not None
            return _sdk.replay_streamed(
                decision.record.output, starting_agent, kwargs.get("context")
            )
        # Agent steps declare no side effects, so starting one writes nothing: the stream can
        # start right away and its checkpoint is written when its run task ends.
        execution = Execution(decision.attempts, utcnow(), time.perf_counter())
        with run.step_scope(spec.name):
            streamed = _sdk.sdk_run_streamed(
                runner, starting_agent, input, kwargs, isolate_usage=True
            )

        async def record(result: Any, error: BaseException | None) -> None:
            if isinstance(error, StopRun):
                return  # a tool stopped the run: the agent step did not finish
            try:
                await run.conclude(spec, execution, result if error is None else None, error)
            except BaseException:  # the consumer of the stream sees the error itself
                return

        recorded = run.track(_sdk.on_stream_complete(streamed, record))
        events = streamed.stream_events

        async def stream_events() -> AsyncIterator[Any]:
            # The stream ends only once its checkpoint is written, so a crash right after
            # consuming it cannot lose the run.
            try:
                async for event in events():
                    yield event
            except StopRun as stop:
                await asyncio.shield(recorded)
                raise stop.error from None
            await asyncio.shield(recorded)

        streamed.stream_events = stream_events  # type: ignore[method-assign]
        return streamed


_INTERCEPTOR = _Interceptor()


def ensure_installed() -> None:
    """Route the SDK's default runner through the checkpointing interceptor (idempotent)."""
    _sdk.install_runner(_INTERCEPTOR)
