"""Every model turn inside an agent step is a checkpoint (T1).

The SDK resolves the model of each turn through ``run_loop.get_model`` (turn_preparation's
rules: ``RunConfig.model``, a provider, the agent's own ``Model``), handoffs and agent-as-tool
sub-runs included; that is the one place that sees every model call. Inside an agent step of a
pipeline the resolved model is wrapped: each successful call is journaled as the step
``<agent step>/model#<n>`` (n advances only on success, so the SDK's own retries do not count),
and on resume a recorded turn replays, as fresh objects, while its fingerprint matches.

- A turn whose dynamic parts (input items, previous response, conversation) differ from the
  record (a plain tool returned something else) runs live, with the rest of the step; an event
  names what changed. A changed static part (instructions, tools, model, settings, output
  schema, handoffs, prompt) raises ``StepInputMismatch`` naming the turn.
- Usage is recorded per call, under the model that served it, with the turn's journal entry.
- Journal entries are written behind the call (``Executor.journal``): sent at once, they land
  while the SDK reads the answer, and before any tool it asked for runs, any other side effect,
  and the agent step's completion, which drops them: a completed agent step replays from its
  own checkpoint in one read.
"""

from __future__ import annotations

import contextvars
import dataclasses
import typing
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any, Union

import pydantic_core
from agents import Agent, FunctionTool, Handoff
from agents.items import ModelResponse, TResponseOutputItem
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.run_internal import (
    run_loop,  # SDK private
    turn_preparation,  # SDK private
    turn_resolution,  # SDK private
)
from agents.run_internal.model_retry import apply_retry_attempt_usage  # SDK private
from agents.usage import (  # SDK private
    Usage,
    _attach_normalized_usage,
    _requests_for_response_without_usage,
    _response_usage_to_usage,
    deserialize_usage,
    serialize_usage,
)
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseOutputItemDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import Field, TypeAdapter

from .._engine import Executor, StopRun, active_executor, current_scope
from .._errors import CheckpointSerializationError, StepInputMismatch, TidebaseError
from .._hashing import parts_hash, sha256_hex
from .._store import Event, UsageRecord
from .._vocab import EventKind, StepStatus
from .fingerprint import model_name, settings_json

#: The name segment of a model turn's journal entry; an agent step's completion drops them.
TURN = "model#"
STATIC_PARTS = (
    "agent",
    "model",
    "instructions",
    "settings",
    "tools",
    "output",
    "handoffs",
    "prompt",
)

# The SDK's output item type is an annotated union that pydantic does not discriminate by
# itself; the same members with a pydantic discriminator round-trip every item kind.
_MEMBERS = typing.get_args(typing.get_args(TResponseOutputItem)[0])
_OUTPUT_ITEM: TypeAdapter[Any] = TypeAdapter(
    Annotated[Union[_MEMBERS], Field(discriminator="type")]  # type: ignore[arg-type]  # noqa: UP007
)


def _encode_item(item: Any) -> dict[str, Any]:
    if hasattr(item, "model_dump"):
        # exclude_unset keeps the fields the item was built with, as to_input_list() dumps it.
        return {"m": _OUTPUT_ITEM.dump_python(item, mode="json", exclude_unset=True)}
    return {"d": pydantic_core.to_jsonable_python(item)}


def _decode_item(encoded: Any) -> Any:
    if not isinstance(encoded, dict):
        raise CheckpointSerializationError("journaled output item is not an object")
    if "m" in encoded:
        return _OUTPUT_ITEM.validate_python(encoded["m"])
    return encoded["d"]


def encode_response(response: ModelResponse, failed_attempts: int) -> dict[str, Any]:
    """A model response as JSON (the SDK folds failed retries into its usage afterwards)."""
    return {
        "output": [_encode_item(item) for item in response.output],
        "usage": serialize_usage(response.usage),
        "response_id": response.response_id,
        "request_id": response.request_id,
        "failed_attempts": failed_attempts,
    }


def decode_response(data: Any) -> ModelResponse:
    """A fresh ``ModelResponse`` from :func:`encode_response` output (the runner mutates it)."""
    try:
        usage = deserialize_usage(data["usage"])
        # A replayed call has no failed attempts for the SDK to fold in: fold the recorded ones.
        usage = apply_retry_attempt_usage(usage, int(data.get("failed_attempts", 0)))
        return ModelResponse(
            output=[_decode_item(item) for item in data["output"]],
            usage=usage,
            response_id=data.get("response_id"),
            request_id=data.get("request_id"),
        )
    except CheckpointSerializationError:
        raise
    except Exception as exc:
        raise CheckpointSerializationError(
            f"journaled model turn is malformed: {type(exc).__name__}: {exc}"
        ) from None


def _jsonable(value: Any) -> Any:
    return pydantic_core.to_jsonable_python(value, fallback=lambda o: f"<{type(o).__qualname__}>")


def _tool_json(tool: Any) -> dict[str, Any]:
    if isinstance(tool, FunctionTool):
        return {
            "name": tool.name,
            "params": tool.params_json_schema,
            "strict": tool.strict_json_schema,
        }
    out: dict[str, Any] = {"type": type(tool).__qualname__, "name": getattr(tool, "name", None)}
    if dataclasses.is_dataclass(tool):  # hosted tools: their configuration
        out["config"] = _jsonable({f.name: getattr(tool, f.name) for f in dataclasses.fields(tool)})
    return out


def _handoff_json(h: Handoff[Any, Any]) -> dict[str, Any]:
    return {"tool": h.tool_name, "agent": h.agent_name, "params": h.input_json_schema}


def _input_json(items: Any, known: list[tuple[Any, str]]) -> Any:
    if isinstance(items, str):
        return items
    # Per-item hashes by position: each turn's input is the previous turn's plus new items, as
    # copies, so an item equal to the one hashed at its position reuses that hash, and a long
    # tool loop hashes each item once instead of once per later turn.
    hashes = []
    for i, item in enumerate(items):
        if i < len(known):
            seen, digest = known[i]
            if seen is item or seen == item:
                hashes.append(digest)
                continue
            del known[i:]
        digest = sha256_hex(_jsonable(item), what="model input item")
        known.append((item, digest))
        hashes.append(digest)
    return hashes


def _turn_hash(turns: _Turns, parts: dict[str, Any], name: str) -> tuple[str, dict[str, str]]:
    """A turn's fingerprint. The static parts rarely change within an agent step: a part equal
    to the last turn's reuses its hash instead of hashing its schemas again."""
    fresh: dict[str, Any] = {}
    hashed: dict[str, str] = {}
    for part, value in parts.items():
        seen = turns.static.get(part)
        if seen is not None and seen[0] == value:
            hashed[part] = seen[1]
        else:
            fresh[part] = value
    input_hash, per_part = parts_hash(fresh, what=f"model turn {name!r}", hashed=hashed)
    for part in STATIC_PARTS:
        if part in fresh:
            turns.static[part] = (fresh[part], per_part[part])
    return input_hash, per_part


_SAYING = frozenset({"message", "reasoning"})


def _acts(response: ModelResponse) -> bool:
    """Whether an answer asks for more than words: a tool call, a handoff, an action."""
    for item in response.output:
        kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
        if kind not in _SAYING:
            return True
    return False


@dataclasses.dataclass(eq=False)
class _Turns:
    """The model turns of one agent step execution."""

    step: str
    last: int = 0
    #: A turn ran live because its input differed: later records are of another history.
    diverged: bool = False
    failed_attempts: int = 0
    #: A call for turn ``last + 1`` started and has not succeeded.
    calling: bool = False
    #: The items of the last turn's input with their hashes, in order.
    items: list[tuple[Any, str]] = dataclasses.field(default_factory=list)
    #: The static parts of the last turn's fingerprint with their hashes, by part.
    static: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    #: Objects a replayed turn handed to the SDK (raw events, output items): streamed events
    #: carrying them are marked as replayed.
    replayed: dict[int, Any] = dataclasses.field(default_factory=dict)

    def name(self, turn: int) -> str:
        return f"{self.step}/{TURN}{turn}"


# The turns of each agent step an execution runs, by step name.
_executions: weakref.WeakKeyDictionary[Executor, dict[str, _Turns]] = weakref.WeakKeyDictionary()


def turns_of(ex: Executor, step: str) -> _Turns:
    """The model turns of agent step ``step`` in this execution."""
    steps = _executions.setdefault(ex, {})
    turns = steps.get(step)
    if turns is None:
        turns = steps[step] = _Turns(step=step)
    return turns


async def drop_last_turn(ex: Executor, step: str, why: str) -> None:
    """After a deterministic agent failure (``ModelBehaviorError``): forget the journaled
    answer that led to it, so the retry of the agent step asks the model again. A failure of
    the call in flight (no answer at all) keeps the journal as it is."""
    turns = turns_of(ex, step)
    if turns.calling or turns.last == 0:
        return
    name = turns.name(turns.last)
    await ex.flush_journal()
    if ex.recorded(name) is not None:
        await ex.discard([name], Event(EventKind.TURN_DROPPED, name, {"why": why[:500]}))


# The agent whose turn is being prepared: set by the hook in the run loop's task, right
# before the call through the wrapper it returned.
_turn_agent: contextvars.ContextVar[str] = contextvars.ContextVar("tidebase_turn_agent", default="")


class JournaledModel(Model):
    """The model of a turn inside an agent step: replays recorded answers, journals new ones.

    One wrapper per live inner model, because the SDK tells models apart by identity (one
    end-of-run cleanup per model). Everything the SDK asks of a model besides the calls is
    forwarded: retry advice, cleanup, prompt-cache support.
    """

    def __init__(self, inner: Model) -> None:
        self.inner = inner
        self.label = model_name(inner)

    def _supports_default_prompt_cache_key(self) -> bool:
        supports = getattr(self.inner, "_supports_default_prompt_cache_key", None)  # SDK private
        return bool(supports()) if callable(supports) else False

    def get_retry_advice(self, request: Any) -> Any:
        return self.inner.get_retry_advice(request)

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self.inner._cleanup_on_run_end(owner)  # SDK private

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- a turn ----------------------------------------------------------------------------

    def _parts(
        self,
        turns: _Turns,
        system_instructions: str | None,
        input: Any,
        model_settings: ModelSettings,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Any],
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> dict[str, Any]:
        schema = None
        if output_schema is not None and not output_schema.is_plain_text():
            schema = {"name": output_schema.name(), "schema": output_schema.json_schema()}
        return {
            "agent": _turn_agent.get(),
            "model": self.label,
            "instructions": system_instructions,
            "settings": settings_json(model_settings),
            "tools": [_tool_json(t) for t in tools],
            "output": schema,
            "handoffs": [_handoff_json(h) for h in handoffs],
            "prompt": _jsonable(prompt),
            "input": _input_json(input, turns.items),
            "previous_response_id": previous_response_id,
            "conversation_id": conversation_id,
        }

    def _decide(
        self, ex: Executor, turns: _Turns, parts: dict[str, Any]
    ) -> tuple[int, str, dict[str, str], ModelResponse | None, list[Event]]:
        """Replay the next turn, or say what the live call's journal entry carries."""
        turn = turns.last + 1
        name = turns.name(turn)
        input_hash, per_part = _turn_hash(turns, parts, name)
        turns.calling = True
        rec = ex.recorded(name)
        if turns.diverged or rec is None or rec.status != StepStatus.COMPLETED:
            return turn, input_hash, per_part, None, []
        old = rec.input_parts or {}
        changed = sorted(k for k in per_part.keys() | old.keys() if per_part.get(k) != old.get(k))
        static = [k for k in changed if k in STATIC_PARTS]
        if static:
            raise StopRun(StepInputMismatch(ex.run_id, name, rec.input_hash, input_hash, static))
        if changed:
            turns.diverged = True
            diverged = Event(EventKind.TURN_DIVERGED, name, {"changed": changed})
            return turn, input_hash, per_part, None, [diverged]
        response = decode_response(rec.output)
        ex.replayed.append(name)
        self._advance(turns, turn)
        return turn, input_hash, per_part, response, []

    @staticmethod
    def _advance(turns: _Turns, turn: int) -> None:
        turns.last = turn
        turns.calling = False
        turns.failed_attempts = 0

    async def _journal(
        self,
        ex: Executor,
        turns: _Turns,
        turn: int,
        input_hash: str,
        per_part: dict[str, str],
        response: ModelResponse,
        events: list[Event],
    ) -> None:
        """Journal a live answer. One that acts (calls a tool, hands off) is sent at once and
        lands while the SDK reads it, before any of its tools runs (:func:`_execute_tools`),
        so a resume replays it instead of asking anew; a final answer rides along with the
        agent step's completion, which follows at once (a crash in between asks the model
        once more)."""
        name = turns.name(turn)
        try:
            await self._write(ex, turns, name, input_hash, per_part, response, events)
        except TidebaseError as exc:
            raise StopRun(exc) from exc  # the library's failure: it must not reach the model
        self._advance(turns, turn)

    async def _write(
        self,
        ex: Executor,
        turns: _Turns,
        name: str,
        input_hash: str,
        per_part: dict[str, str],
        response: ModelResponse,
        events: list[Event],
    ) -> None:
        usage = response.usage
        await ex.journal(
            name,
            input_hash,
            per_part,
            encode_response(response, turns.failed_attempts),
            usage=[
                UsageRecord(
                    dedupe_key=f"{name}@{ex.lease.token}",
                    step=name,
                    model=self.label,
                    requests=usage.requests + turns.failed_attempts,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cached_tokens=usage.input_tokens_details.cached_tokens or 0,
                    reasoning_tokens=usage.output_tokens_details.reasoning_tokens or 0,
                    total_tokens=usage.total_tokens,
                )
            ],
            events=events,
            defer=not _acts(response),
        )

    async def get_response(
        self,
        system_instructions: str | None,
        input: Any,
        model_settings: ModelSettings,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Any],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        ex, scope = active_executor(), current_scope()
        call = dict(
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        )
        args = (system_instructions, input, model_settings, tools, output_schema, handoffs, tracing)
        if ex is None or scope is None or not scope.prefix:
            return await self.inner.get_response(*args, **call)
        turns = turns_of(ex, scope.prefix.rstrip("/"))
        parts = self._parts(
            turns, system_instructions, input, model_settings, tools, output_schema, handoffs,
            previous_response_id, conversation_id, prompt,
        )  # fmt: skip
        turn, input_hash, per_part, replayed, events = self._decide(ex, turns, parts)
        if replayed is not None:
            return replayed
        try:
            response = await self.inner.get_response(*args, **call)
        except BaseException:
            turns.failed_attempts += 1  # the SDK may retry; the turn does not advance
            raise
        await self._journal(ex, turns, turn, input_hash, per_part, response, events)
        return response

    async def stream_response(
        self,
        system_instructions: str | None,
        input: Any,
        model_settings: ModelSettings,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Any],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> AsyncIterator[Any]:
        ex, scope = active_executor(), current_scope()
        call = dict(
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        )
        args = (system_instructions, input, model_settings, tools, output_schema, handoffs, tracing)
        if ex is None or scope is None or not scope.prefix:
            async for event in self.inner.stream_response(*args, **call):
                yield event
            return
        turns = turns_of(ex, scope.prefix.rstrip("/"))
        parts = self._parts(
            turns, system_instructions, input, model_settings, tools, output_schema, handoffs,
            previous_response_id, conversation_id, prompt,
        )  # fmt: skip
        turn, input_hash, per_part, replayed, events = self._decide(ex, turns, parts)
        if replayed is not None:
            event = completed_event(replayed, self.label)
            turns.replayed[id(event)] = event
            for item in event.response.output:
                turns.replayed[id(item)] = item
            yield event
            return
        completed: Response | None = None
        done_items: list[Any] = []
        try:
            async for event in self.inner.stream_response(*args, **call):
                if isinstance(event, ResponseCompletedEvent):
                    completed = event.response
                elif isinstance(event, ResponseOutputItemDoneEvent):
                    done_items.append(event.item)
                yield event
        except BaseException:
            turns.failed_attempts += 1
            raise
        if completed is None:
            return  # the run loop raises "Model did not produce a final response!"
        # The terminal event carries the turn, as the run loop reads it.
        usage = (
            _response_usage_to_usage(completed.usage)
            if completed.usage
            else Usage(requests=_requests_for_response_without_usage(completed))
        )
        response = ModelResponse(
            output=list(completed.output) or done_items,
            usage=usage,
            response_id=completed.id,
            request_id=getattr(completed, "_request_id", None),
        )
        await self._journal(ex, turns, turn, input_hash, per_part, response, events)


def _response_usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=usage.input_tokens_details.cached_tokens or 0,
            cache_write_tokens=getattr(usage.input_tokens_details, "cache_write_tokens", 0) or 0,
        ),
        output_tokens_details=OutputTokensDetails(
            reasoning_tokens=usage.output_tokens_details.reasoning_tokens or 0
        ),
    )


def completed_event(response: ModelResponse, model: str) -> ResponseCompletedEvent:
    """A recorded model response as the one stream event the run loop needs for a turn: a
    terminal ``ResponseCompletedEvent`` carrying the exact recorded usage."""
    usage = _response_usage(response.usage)
    _attach_normalized_usage(usage, response.usage)  # SDK private: read before ResponseUsage
    completed = Response(
        id=response.response_id or "",
        created_at=0,
        model=model,
        object="response",
        output=list(response.output),
        tool_choice="auto",
        tools=[],
        top_p=None,
        parallel_tool_calls=False,
        status="completed",  # the Responses API's vocabulary, not the library's
        usage=usage,
    )
    if response.response_id is None:
        object.__setattr__(completed, "id", None)
    return ResponseCompletedEvent(type="response.completed", response=completed, sequence_number=0)


_original_get_model = turn_preparation.get_model  # SDK private
_wrappers: dict[int, weakref.ref[JournaledModel]] = {}


def _wrapper_for(inner: Model) -> JournaledModel:
    if isinstance(inner, JournaledModel):
        return inner
    ref = _wrappers.get(id(inner))
    wrapper = ref() if ref is not None else None
    if wrapper is not None and wrapper.inner is inner:
        return wrapper
    wrapper = JournaledModel(inner)
    key = id(inner)

    def forget(_ref: object) -> None:
        _wrappers.pop(key, None)

    _wrappers[key] = weakref.ref(wrapper, forget)
    return wrapper


def _get_model(agent: Agent[Any], run_config: Any) -> Model:
    inner = _original_get_model(agent, run_config)
    scope = current_scope()
    if active_executor() is None or scope is None or not scope.prefix:
        return inner  # not inside an agent step of a pipeline: the SDK runs untouched
    _turn_agent.set(agent.name)
    return _wrapper_for(inner)


_original_execute_tools = turn_resolution.execute_tools_and_side_effects  # SDK private


async def _execute_tools(*args: Any, **kwargs: Any) -> Any:
    """The SDK's one entry to running a turn's tools, handoffs and actions: the journal
    entry of the answer that asked for them lands first."""
    ex = active_executor()
    if ex is not None:
        try:
            await ex.journal_landed()
        except TidebaseError as exc:
            raise StopRun(exc) from exc  # the library's failure: it must not reach the model
    return await _original_execute_tools(*args, **kwargs)


def install() -> None:
    """Route the run loop's per-turn model resolution through the journal, and its tool
    execution behind the journal's writes (idempotent)."""
    run_loop.get_model = _get_model  # SDK private
    turn_resolution.execute_tools_and_side_effects = _execute_tools  # SDK private
