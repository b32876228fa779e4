"""The run context in agent checkpoints (R16), typed guardrail outputs and hooks on replay, on
SQLite and PostgreSQL, in one process: an attempt fails after its agent runs, the next one
replays them with fresh objects, and must see what the first attempt saw."""

from __future__ import annotations

import dataclasses
import threading
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from agentkit_common import Interrupted, message, policy_model, tool_calls, tool_outputs
from agentkit_common import close_engines as close_engines
from agents import (
    Agent,
    AgentHooks,
    GuardrailFunctionOutput,
    MaxTurnsExceeded,
    OutputGuardrailTripwireTriggered,
    RunContextWrapper,
    RunHooks,
    Runner,
    function_tool,
    output_guardrail,
)
from agents.run_state import RunState
from pydantic import BaseModel, Field

import tidebase_agents._sdk.replay as sdk_replay
from tidebase_agents import (
    CheckpointSerializationError,
    ConfigurationError,
    NotDurableWarning,
    Tidebase,
    checkpointed_pipeline,
    is_replaying,
    register_types,
)


class Address(BaseModel):
    city: str = "?"
    tags: list[str] = []


class Profile(BaseModel):
    name: str = ""
    address: Address = Field(default_factory=Address)
    secret: str = Field(default="live", exclude=True)


@dataclasses.dataclass
class Basket:
    items: list[str] = dataclasses.field(default_factory=list)
    total: float = 0.0


def _set_context(context: Any) -> None:
    value = context.context
    if isinstance(value, Profile):
        value.name = "Ann"
        value.address.city = "Oslo"
        value.address.tags.append("vip")
        value.secret = "changed"
    elif isinstance(value, Basket):
        value.items.append("apple")
        value.total = 1.5
    elif isinstance(value, dict):
        value["user"] = "Ann"
        value["seen"] = [1, 2]
    else:
        value.visits += 1


def _mutating_agent(name: str = "mutator") -> Agent[Any]:
    @function_tool
    def remember(context: RunContextWrapper[Any], note: str) -> str:
        """Remember a note on the context."""
        _set_context(context)
        return f"noted {note}"

    def respond(call: Any) -> Any:
        done = tool_outputs(call)
        return message(f"done: {done[0]}") if done else tool_calls(("remember", {"note": "x"}))

    return Agent(name=name, tools=[remember], model=policy_model(respond))


async def _twice(
    url: str,
    agent: Agent[Any],
    make_context: Callable[[], Any],
    **pipeline_options: Any,
) -> list[Any]:
    """Run ``agent`` in a pipeline whose first attempt fails after the run; re-invoke it, so the
    agent step replays with a fresh context. Returns the contexts of both attempts."""
    contexts: list[Any] = []

    @checkpointed_pipeline(f"ctx-{uuid.uuid4().hex[:8]}", database_url=url, **pipeline_options)
    async def pipeline() -> str:
        context = make_context()
        contexts.append(context)
        result = await Runner.run(agent, "go", context=context)
        if len(contexts) == 1:
            raise Interrupted
        return str(result.final_output)

    run_id = f"ctx-{uuid.uuid4().hex[:10]}"
    with pytest.raises(Interrupted):
        await pipeline(run_id=run_id)
    calls = len(agent.model.calls)  # type: ignore[union-attr]
    assert await pipeline(run_id=run_id) == "done: noted x"
    assert len(agent.model.calls) == calls  # type: ignore[union-attr]  # replayed
    return contexts


# -- kinds of context -----------------------------------------------------------------------------


async def test_pydantic_context_is_restored_in_place(db_url: str) -> None:
    first, second = await _twice(db_url, _mutating_agent(), Profile)
    address, tags = second.address, second.address.tags
    assert (
        second.model_dump()
        == first.model_dump()
        == {
            "name": "Ann",
            "address": {"city": "Oslo", "tags": ["vip"]},
        }
    )
    assert second.address is address and second.address.tags is tags  # nested objects kept
    assert second.secret == "live"  # excluded from dumps: never stored, the live value stays


async def test_dataclass_and_dict_contexts_are_restored_in_place(db_url: str) -> None:
    first, second = await _twice(db_url, _mutating_agent(), Basket)
    assert second == first == Basket(items=["apple"], total=1.5)
    first, second = await _twice(db_url, _mutating_agent(), lambda: {"user": None})
    assert second == first == {"user": "Ann", "seen": [1, 2]}


async def test_context_that_cannot_be_stored_warns_once_per_type(db_url: str) -> None:
    class Unstorable:  # a type of this test's own: the warning comes once per type and process
        """A plain class: no pydantic model, dataclass or mapping."""

        def __init__(self) -> None:
            self.visits = 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = await _twice(db_url, _mutating_agent(), Unstorable)
        await _twice(db_url, _mutating_agent("again"), Unstorable)
    found = [w for w in caught if issubclass(w.category, NotDurableWarning)]
    assert len(found) == 1
    assert f"test_sdk_context.{Unstorable.__qualname__}" in str(found[0].message)
    assert "context_codec" in str(found[0].message)
    assert (first.visits, second.visits) == (1, 0)  # left as the pipeline has it


class LockedCounter:
    """Holds a lock (never JSON) beside the state that matters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.visits = 0


class CounterCodec:
    def dump(self, context: Any) -> Any:
        return {"visits": context.visits}

    def restore(self, context: Any, data: Any) -> None:
        context.visits = data["visits"]


async def test_context_codec_checkpoints_any_context(db_url: str) -> None:
    first, second = await _twice(
        db_url, _mutating_agent(), LockedCounter, context_codec=CounterCodec()
    )
    assert (first.visits, second.visits) == (1, 1)


def test_context_codec_needs_dump_and_restore() -> None:
    with pytest.raises(ConfigurationError, match="context_codec"):

        @checkpointed_pipeline("bad-codec", context_codec=object())  # type: ignore[arg-type]
        async def pipeline() -> None: ...


async def test_context_codec_returning_non_json_fails_the_step(db_url: str) -> None:
    class Broken(CounterCodec):
        def dump(self, context: Any) -> Any:
            return {"lock": context.lock}

    @checkpointed_pipeline("broken-codec", database_url=db_url, context_codec=Broken())
    async def pipeline() -> None:
        await Runner.run(_mutating_agent(), "go", context=LockedCounter())

    with pytest.raises(CheckpointSerializationError, match=r"context_codec\.dump"):
        await pipeline()


async def test_recorded_context_of_another_kind_fails_clearly(db_url: str) -> None:
    agent = _mutating_agent()
    contexts: list[Any] = [{"user": None}, Profile()]

    @checkpointed_pipeline("ctx-kind", database_url=db_url)
    async def pipeline() -> None:
        await Runner.run(agent, "go", context=contexts.pop(0))
        raise Interrupted

    with pytest.raises(Interrupted):
        await pipeline(run_id="ctx-kind")
    with pytest.raises(CheckpointSerializationError, match="mapping context"):
        await pipeline(run_id="ctx-kind")


async def test_checkpoint_without_a_context_section_still_replays(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agent checkpoints written before contexts were stored have no ``context`` key."""
    agent = _mutating_agent()
    contexts: list[Basket] = []

    @checkpointed_pipeline("ctx-old", database_url=db_url)
    async def pipeline() -> str:
        contexts.append(Basket())
        result = await Runner.run(agent, "go", context=contexts[-1])
        if len(contexts) == 1:
            raise Interrupted
        return str(result.final_output)

    with monkeypatch.context() as patched:
        patched.setattr(sdk_replay, "snapshot", lambda _context: None)
        with pytest.raises(Interrupted):
            await pipeline(run_id="ctx-old")
    (step,) = await Tidebase(db_url).steps("ctx-old")
    assert "context" not in step.output
    assert await pipeline(run_id="ctx-old") == "done: noted x"
    assert contexts[1] == Basket()  # nothing recorded, nothing restored


async def test_run_from_a_state_without_context_replays_with_the_states_context(
    db_url: str,
) -> None:
    """``Runner.run(agent, state)``: the SDK runs with the state's context, and so does the
    replay (``is_enabled`` reads it while the state is restored)."""

    def enabled(context: RunContextWrapper[Any], agent: Any) -> bool:
        return bool(context.context["tenant"] == "t1")

    @function_tool(needs_approval=True, is_enabled=enabled)
    def charge(context: RunContextWrapper[Any], amount: int) -> str:
        """Charge money."""
        context.context["charged"] = amount
        return f"charged {amount}"

    def respond(call: Any) -> Any:
        done = tool_outputs(call)
        return message(f"done: {done[0]}") if done else tool_calls(("charge", {"amount": 5}))

    agent = Agent(name="payer", tools=[charge], model=policy_model(respond))
    paused = await Runner.run(agent, "pay", context={"tenant": "t1"})
    saved = paused.to_state().to_string()
    seen: list[Any] = []

    @checkpointed_pipeline("ctx-state", database_url=db_url)
    async def pipeline() -> str:
        state = await RunState.from_string(agent, saved)
        state.approve(state.get_interruptions()[0])
        result = await Runner.run(agent, state)
        seen.append((result.context_wrapper.context, state._context.context))
        if len(seen) == 1:
            raise Interrupted
        return str(result.final_output)

    with pytest.raises(Interrupted):
        await pipeline(run_id="ctx-state")
    assert await pipeline(run_id="ctx-state") == "done: charged 5"
    replayed, state_context = seen[1]
    assert replayed is state_context
    assert replayed == {"tenant": "t1", "charged": 5}


async def test_run_ending_in_max_turns_replays_the_context_it_failed_with(db_url: str) -> None:
    @function_tool
    def tick(context: RunContextWrapper[Basket]) -> str:
        """Count a tick."""
        context.context.items.append("tick")
        return "ticked"

    agent = Agent(
        name="ticker", tools=[tick], model=policy_model(lambda call: tool_calls(("tick", {})))
    )
    contexts: list[Basket] = []

    @checkpointed_pipeline("ctx-max-turns", database_url=db_url)
    async def pipeline() -> str:
        contexts.append(Basket())
        with pytest.raises(MaxTurnsExceeded):
            await Runner.run(agent, "tick", context=contexts[-1], max_turns=1)
        if len(contexts) == 1:
            raise Interrupted
        return "done"

    with pytest.raises(Interrupted):
        await pipeline(run_id="ctx-max-turns")
    assert await pipeline(run_id="ctx-max-turns") == "done"
    assert len(agent.model.calls) == 1  # type: ignore[union-attr]
    assert contexts[1] == contexts[0] == Basket(items=["tick"])


# -- guardrails and hooks -------------------------------------------------------------------------


class Verdict(BaseModel):
    reason: str


class Summary(BaseModel):
    text: str


register_types(Verdict)


async def test_output_guardrail_tripwire_replays_with_its_types(db_url: str) -> None:
    @output_guardrail
    async def too_short(ctx: Any, agent: Any, output: Summary) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(
            output_info=Verdict(reason=f"{len(output.text)} characters"), tripwire_triggered=True
        )

    model = policy_model(lambda call: message('{"text": "hi"}'))
    agent = Agent(name="summer", output_type=Summary, output_guardrails=[too_short], model=model)
    caught: list[OutputGuardrailTripwireTriggered] = []

    @checkpointed_pipeline("guard-trip", database_url=db_url)
    async def pipeline() -> str:
        try:
            await Runner.run(agent, "summarize")
        except OutputGuardrailTripwireTriggered as exc:
            caught.append(exc)
        if len(caught) == 1:
            raise Interrupted
        return "done"

    with pytest.raises(Interrupted):
        await pipeline(run_id="guard-trip")
    assert await pipeline(run_id="guard-trip") == "done"
    assert len(model.calls) == 1
    live, replayed = (exc.guardrail_result for exc in caught)
    assert replayed.agent_output == live.agent_output == Summary(text="hi")
    assert replayed.output.output_info == live.output.output_info == Verdict(reason="2 characters")
    assert replayed.guardrail is too_short


class Events(RunHooks[Any]):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        self.seen.append(("start", agent.name, is_replaying()))

    async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
        self.seen.append(("end", str(output), is_replaying()))


class EndUsage(AgentHooks[Any]):
    def __init__(self) -> None:
        self.totals: list[int] = []

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        self.totals.append(context.usage.total_tokens)


async def test_hooks_fire_for_a_replayed_stream(db_url: str) -> None:
    ends = EndUsage()
    agent = Agent(
        name="streamer", hooks=ends, model=policy_model(lambda call: message("streamed answer"))
    )
    hooks = Events()
    attempts: list[list[str]] = []

    @checkpointed_pipeline("hooks-stream", database_url=db_url)
    async def pipeline() -> str:
        streamed = Runner.run_streamed(agent, "go", hooks=hooks)
        attempts.append([e.type async for e in streamed.stream_events()])
        if len(attempts) == 1:
            raise Interrupted
        return str(streamed.final_output)

    with pytest.raises(Interrupted):
        await pipeline(run_id="hooks-stream")
    assert await pipeline(run_id="hooks-stream") == "streamed answer"
    live = [("start", "streamer", False), ("end", "streamed answer", False)]
    assert hooks.seen == [*live, *((kind, name, True) for kind, name, _ in live)]
    assert ends.totals[0] == ends.totals[1] > 0  # the replay's hook context carries the usage
    assert not is_replaying()
