"""Streamed agent runs: completion callbacks, and replay of a checkpoint as a completed stream."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from agents import Agent, RunContextWrapper, RunResultStreaming
from agents.exceptions import InputGuardrailTripwireTriggered, MaxTurnsExceeded
from agents.items import HandoffOutputItem
from agents.run_internal.run_steps import QueueCompleteSentinel  # SDK private
from agents.run_internal.streaming import stream_step_items_to_queue  # SDK private
from agents.stream_events import AgentUpdatedStreamEvent, RawResponsesStreamEvent

from .._engine import StopRun
from .fingerprint import model_name
from .model import completed_event
from .result_codec import apply_state, restore_state


def _stream_outcome(streamed: RunResultStreaming) -> BaseException | None:
    """The exception a consumer of ``stream_events()`` would get, or None."""
    task = streamed.run_loop_task
    if task is not None and task.done():
        if task.cancelled():
            return asyncio.CancelledError()
        error = task.exception()
        if error is not None:
            return error
    if streamed._stored_exception is not None:  # SDK private
        return streamed._stored_exception  # SDK private
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
            and not streamed._max_turns_handled  # SDK private
        ):
            late_error = MaxTurnsExceeded(f"Max turns ({streamed.max_turns}) exceeded")
    if late_error is not None:
        late_error.run_data = streamed._create_error_details()  # SDK private
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
    tasks = [
        t for t in (streamed.run_loop_task, streamed._input_guardrails_task) if t is not None
    ]  # SDK private

    async def watch() -> None:
        if tasks:
            await asyncio.wait(tasks)
        await callback(streamed, _stream_outcome(streamed))

    return asyncio.create_task(watch())


def replay_streamed(
    payload: Mapping[str, Any],
    starting_agent: Agent[Any],
    context: Any,
    finish: Callable[[RunResultStreaming, Mapping[str, Any]], Awaitable[None]] | None = None,
) -> RunResultStreaming:
    """A ``RunResultStreaming`` replayed from :func:`encode_result` output. Needs a running loop.

    ``stream_events()`` yields what the first run yielded, less the token deltas: an
    ``AgentUpdatedStreamEvent`` for the starting agent; per model response a synthesized raw
    ``response.completed`` event, followed by a ``RunItemStreamEvent`` per item it produced
    with the SDK's names; another agent update after each handoff. Every event is marked
    replayed (``is_replayed(event)``). Restoring is async (the SDK's ``RunState.from_json``),
    so like a live stream the result completes in its ``run_loop_task``; after the events (or
    awaiting that task) it has ``final_output``, ``new_items``, ``last_agent`` and usage as
    :func:`decode_result` gives. ``finish(streamed, payload)``, if given, completes the result
    before the events are queued.
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
        _fill_replayed_stream(streamed, payload, starting_agent, context, finish)
    )
    return _marked(streamed, lambda _event: True)


async def _fill_replayed_stream(
    streamed: RunResultStreaming,
    payload: Mapping[str, Any],
    starting_agent: Agent[Any],
    context: Any,
    finish: Callable[[RunResultStreaming, Mapping[str, Any]], Awaitable[None]] | None,
) -> None:
    try:
        state, wrapper = await restore_state(payload, starting_agent, context)
        streamed.current_agent = apply_state(streamed, state, payload, wrapper)
        streamed.current_turn = state._current_turn  # SDK private
        if finish is not None:
            await finish(streamed, payload)

        queue = streamed._event_queue  # SDK private
        queue.put_nowait(AgentUpdatedStreamEvent(new_agent=starting_agent))
        responses = list(streamed.raw_responses)
        for item in streamed.new_items:
            while responses and any(item.raw_item == out for out in responses[0].output):
                raw = completed_event(responses.pop(0), model_name(streamed.current_agent.model))
                queue.put_nowait(RawResponsesStreamEvent(data=raw))
            stream_step_items_to_queue([item], queue)  # the SDK's item -> event-name mapping
            if isinstance(item, HandoffOutputItem):
                queue.put_nowait(AgentUpdatedStreamEvent(new_agent=item.target_agent))
        streamed.is_complete = True
    finally:
        # Unblock consumers even if restoring failed; stream_events() then raises the error.
        streamed._event_queue.put_nowait(QueueCompleteSentinel())  # SDK private


def checkpointed_stream(
    streamed: RunResultStreaming, recorded: asyncio.Task[None], replayed: Mapping[int, Any]
) -> RunResultStreaming:
    """Make ``stream_events()`` end only once the run's checkpoint task ``recorded`` is done,
    so a crash right after consuming the stream cannot lose the run, and mark the events of
    turns replayed from the journal (``replayed``: the objects those turns handed the SDK, by
    id). A durable tool that must stop the run (``StopRun``) surfaces as the error it carries."""

    def from_journal(event: Any) -> bool:
        carried = getattr(event, "data", None) or getattr(
            getattr(event, "item", None), "raw_item", None
        )
        return carried is not None and replayed.get(id(carried)) is carried

    _marked(streamed, from_journal)
    events = streamed.stream_events

    async def stream_events() -> AsyncIterator[Any]:
        try:
            async for event in events():
                yield event
        except StopRun as stop:
            await asyncio.shield(recorded)
            raise stop.error from None
        await asyncio.shield(recorded)

    streamed.stream_events = stream_events  # type: ignore[method-assign]
    return streamed


#: Set on streamed events whose turn (or whole agent run) was replayed from a checkpoint.
REPLAYED_MARK = "tidebase_replayed"


def _marked(streamed: RunResultStreaming, replayed: Callable[[Any], bool]) -> RunResultStreaming:
    """Set ``tidebase_replayed`` on each event ``stream_events()`` yields."""
    events = streamed.stream_events

    async def stream_events() -> AsyncIterator[Any]:
        async for event in events():
            if replayed(event):
                setattr(event, REPLAYED_MARK, True)
            yield event

    # An instance attribute shadows the SDK's method for this one stream.
    streamed.stream_events = stream_events  # type: ignore[method-assign]
    return streamed


def is_replayed(event: Any) -> bool:
    """Whether a streamed event came from a checkpoint rather than the model: a turn replayed
    from the journal, or an agent run replayed whole."""
    return bool(getattr(event, REPLAYED_MARK, False))
