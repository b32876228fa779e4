"""Agent runs inside a pipeline are steps: every ``Runner.run`` / ``run_sync`` / ``run_streamed``
is the checkpointed step ``agent:<name>#<n>`` (I1, I2, R1); outside a pipeline the SDK runs
untouched."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from agents import Agent, RunResult, RunResultStreaming
from agents.exceptions import ModelBehaviorError
from agents.run import AgentRunner

from .._codec import bounded_json
from .._engine import (
    Execution,
    Executor,
    Scope,
    StepSpec,
    StopRun,
    active_executor,
    await_approvals,
    current_pipeline_options,
    current_scope,
    current_tool_call,
)
from .._hashing import canonical_json, parts_hash, sha256_hex, sha256_text
from .._store import utcnow
from .._vocab import ApprovalMode, DecisionKind
from .agent_runner import sdk_run, sdk_run_streamed, tool_call_scope
from .approvals import apply_decisions, decisions_json, pending_approvals
from .context import effective_context
from .errors import encode_agent_error, raise_recorded_error
from .fingerprint import agent_fingerprint, run_input_json, run_options_parts
from .model import TURN, drop_last_turn, turns_of
from .replay import replay_finisher, with_replay_extras
from .result_codec import decode_result, encode_result
from .session import DurableSession
from .streaming import checkpointed_stream, on_stream_complete, replay_streamed


def _agent_scope(ex: Executor, context: Any) -> Scope:
    """The scope an agent call's step name is allocated in.

    An agent used as a tool (``agent.as_tool``) runs with the tool call's ``ToolContext``; its
    steps nest under ``tool:<name>:<args hash>#<n>`` of the calling agent step (I3), never
    under the model's call id, which changes when the calling agent is re-executed.
    """
    scope = current_scope() or ex.root
    nested = tool_call_scope(context)
    if nested is None or current_tool_call() is not None:
        return scope
    tool_name, arguments = nested
    key = f"tool:{tool_name}:{sha256_hex(arguments)[:12]}"
    return Scope(prefix=f"{scope.prefix}{key}#{scope.next_ordinal(key)}/")


def _claim(ex: Executor, scope: Scope, agent_name: str, input_hash: str) -> str:
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
                for name in ex.recorded_names(base)
                if name != own and _is_ordinal(name, base) and name not in scope.claimed
            ),
            key=lambda name: int(name[len(base) :]),
        ),
    ]
    for name in candidates:
        rec = ex.recorded(name)
        if name not in scope.claimed and rec is not None and rec.input_hash == input_hash:
            scope.claimed.add(name)
            return name
    taken = own in scope.claimed or (ex.recorded(own) is not None and scope.in_concurrent_task())
    if not taken:
        scope.claimed.add(own)
        return own
    n = 1
    while f"{base}{n}" in scope.claimed or ex.recorded(f"{base}{n}") is not None:
        n += 1
    name = f"{base}{n}"
    scope.claimed.add(name)
    return name


def _is_ordinal(name: str, base: str) -> bool:
    return re.fullmatch(r"\d+", name[len(base) :]) is not None


def _agent_spec(
    ex: Executor,
    runner: AgentRunner,
    agent: Agent[Any],
    input: Any,
    kwargs: dict[str, Any],
    *,
    continues: tuple[str, Any] | None = None,
) -> StepSpec:
    """The step of one agent call; ``continues`` = (name, what the call continues with) for
    the continuation of an agent step that stopped on approvals, named after that step and
    hashed by its decisions (the state it resumes from differs by process)."""
    context = effective_context(kwargs.get("context"), input)
    if kwargs.get("session") is not None and not isinstance(kwargs["session"], DurableSession):
        kwargs = {**kwargs, "session": DurableSession(kwargs["session"], ex)}
    parts = {**agent_fingerprint(agent), **run_options_parts(kwargs)}
    what = f"input of agent {agent.name!r}"
    # The run input's canonical JSON is hashed and recorded (bounded) from one serialization.
    input_text = canonical_json(
        run_input_json(input) if continues is None else continues[1], what=f"{what} (input)"
    )
    input_hash, per_part = parts_hash(
        parts, what=what, hashed={"input": sha256_text(input_text, what=f"{what} (input)")}
    )
    name = (
        _claim(ex, _agent_scope(ex, context), agent.name, input_hash)
        if continues is None
        else continues[0]
    )

    async def decode(payload: Any) -> Any:
        return await decode_result(payload, agent, context)

    spec = StepSpec(
        name=name,
        fn=lambda: sdk_run(runner, agent, input, kwargs, isolate=True),
        input_hash=input_hash,
        input_parts=per_part,
        encode=encode_result,
        decode=decode,
        encode_error=encode_agent_error,
        raise_error=lambda record: raise_recorded_error(
            record, context=context, starting_agent=agent
        ),
        # Usage is recorded per model call, with each turn's journal entry (T1).
        transient=TURN,
        input_json=bounded_json(input_text),
    )
    return with_replay_extras(spec, agent, input, kwargs, context)


class _Interceptor:
    """Turns agent runs inside a pipeline into steps of the executing run."""

    async def run(
        self, runner: AgentRunner, starting_agent: Agent[Any], input: Any, kwargs: dict[str, Any]
    ) -> RunResult:
        ex = active_executor()
        if ex is None:
            return await sdk_run(runner, starting_agent, input, kwargs)
        if asyncio.get_running_loop() is not ex.loop:
            # run_sync from a worker thread runs its own loop: the step, and the database
            # connections it writes through, belong to the pipeline's loop.
            call = self.run(runner, starting_agent, input, kwargs)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, ex.loop))
        spec = _agent_spec(ex, runner, starting_agent, input, kwargs)
        result = await self._step(ex, spec, kwargs)
        # An agent used as a tool hands its approvals to the calling agent run, whose own
        # step parks (the SDK carries nested interruptions up).
        parks = (
            current_pipeline_options().approvals == ApprovalMode.PARK
            and tool_call_scope(kwargs.get("context")) is None
        )
        while parks and result.interruptions:
            decisions = await await_approvals(ex, spec.name, pending_approvals(result))
            state = result.to_state()
            apply_decisions(state, decisions)
            spec = _agent_spec(
                ex,
                runner,
                starting_agent,
                state,
                kwargs,
                continues=(f"{spec.name}/approved", decisions_json(decisions)),
            )
            result = await self._step(ex, spec, kwargs)
        return result

    async def _step(self, ex: Executor, spec: StepSpec, kwargs: dict[str, Any]) -> RunResult:
        try:
            result: RunResult = await ex.execute(spec)
            return result
        except ModelBehaviorError as exc:
            await drop_last_turn(ex, spec.name, str(exc))
            raise
        except StopRun as stop:
            if tool_call_scope(kwargs.get("context")) is not None:
                raise  # an agent used as a tool: stop the calling agent run too
            raise stop.error from None

    def run_streamed(
        self, runner: AgentRunner, starting_agent: Agent[Any], input: Any, kwargs: dict[str, Any]
    ) -> RunResultStreaming:
        ex = active_executor()
        if ex is None:
            return sdk_run_streamed(runner, starting_agent, input, kwargs)
        spec = _agent_spec(ex, runner, starting_agent, input, kwargs)
        decision = ex.lookup(spec)
        if decision.kind == DecisionKind.REPLAY:
            assert decision.record is not None
            context = effective_context(kwargs.get("context"), input)
            finish = replay_finisher(starting_agent, input, kwargs, context)
            return replay_streamed(decision.record.output, starting_agent, context, finish)
        # Agent steps declare no side effects, so starting one writes nothing: the stream can
        # start right away and its checkpoint is written when its run task ends.
        execution = Execution(decision.attempts, utcnow(), time.perf_counter())
        with ex.step_scope(spec.name):
            streamed = sdk_run_streamed(runner, starting_agent, input, kwargs, isolate=True)

        async def record(result: RunResultStreaming, error: BaseException | None) -> None:
            if isinstance(error, StopRun):
                return  # a tool stopped the run: the agent step did not finish
            try:
                await ex.conclude(spec, execution, result if error is None else None, error)
            except ModelBehaviorError as exc:
                await drop_last_turn(ex, spec.name, str(exc))
            except BaseException:  # the consumer of the stream sees the error itself
                return

        recorded = ex.track(on_stream_complete(streamed, record))
        return checkpointed_stream(streamed, recorded, turns_of(ex, spec.name).replayed)


INTERCEPTOR = _Interceptor()
