"""T1 in one process: every model call inside an agent step is journaled through the SDK's
per-turn model resolution, whatever serves it; replay stops at the first turn whose input
differs; a changed static part is a StepInputMismatch naming the turn; an answer that led to a
ModelBehaviorError is not pinned; streamed turns replay marked as replayed.

An attempt is cut short inside a tool by a BaseException, which the SDK does not catch: the
agent step is left unfinished with its turns journaled, as after a crash.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from agentkit_common import close_engines as close_engines
from agentkit_common import message, policy_model, tool_calls, tool_outputs
from agents import Agent, ModelProvider, RunConfig, Runner, function_tool
from agents.models.interface import Model

from tidebase_agents import StepInputMismatch, Tidebase, checkpointed_pipeline, is_replayed


class Abort(BaseException):
    """Ends an attempt inside a tool, past the SDK's error handling (a crash, in one process)."""


def looping(turns: int, answer: str = "done") -> Any:
    def respond(call: Any) -> Any:
        outputs = [o for o in tool_outputs(call) if o.startswith("w")]
        if len(outputs) < turns:
            return tool_calls(("work", {"i": len(outputs) + 1}))
        return message(f"{answer}: {', '.join(outputs)}")

    return policy_model(respond)


def work_tool(abort_at: list[int], values: dict[int, str] | None = None) -> Any:
    @function_tool
    def work(i: int) -> str:
        """Do step i."""
        if abort_at and abort_at[0] == i:
            abort_at.clear()
            raise Abort
        return (values or {}).get(i, f"w{i}")

    return work


async def events_of(url: str, run_id: str) -> list[Any]:
    return await Tidebase(url).events(run_id)


async def run_twice(pipeline: Any, run_id: str) -> Any:
    with pytest.raises(Abort):
        await pipeline(run_id=run_id)
    return await pipeline(run_id=run_id)


async def test_t1_replay_stops_at_the_first_turn_whose_input_differs(db_url: str) -> None:
    model = looping(4)
    values: dict[int, str] = {}
    agent = Agent(name="worker", model=model, tools=[work_tool([3], values)])

    @checkpointed_pipeline(f"diverge-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "go", max_turns=20)).final_output)

    with pytest.raises(Abort):
        await pipeline(run_id="r-diverge")
    assert len(model.calls) == 3  # turns 1-3 answered; tool 3 was cut short
    values[2] = "w2-changed"  # a plain tool that answers differently this time
    assert await pipeline(run_id="r-diverge") == "done: w1, w2-changed, w3, w4"
    # Turn 1 and 2 replay (their inputs match); turn 3's input holds the new tool output.
    assert len(model.calls) == 3 + 3
    diverged = [e for e in await events_of(db_url, "r-diverge") if e.kind == "turn_diverged"]
    assert [(e.step, e.data["changed"]) for e in diverged] == [
        ("agent:worker#1/model#3", ["input"])
    ]
    rows = await Tidebase(db_url).usage_records("r-diverge")
    lost = [r.step for r in rows if r.lost]
    assert lost == ["agent:worker#1/model#3"]  # billed in the first attempt, asked again


async def test_t1_a_changed_instruction_raises_naming_the_turn(db_url: str) -> None:
    agent = Agent(name="worker", instructions="v1", model=looping(3), tools=[work_tool([2])])

    @checkpointed_pipeline(f"static-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "go")).final_output)

    with pytest.raises(Abort):
        await pipeline(run_id="r-static")
    agent.instructions = "v2"
    with pytest.raises(StepInputMismatch) as caught:
        await pipeline(run_id="r-static")
    assert caught.value.step == "agent:worker#1/model#1"
    assert caught.value.changed == ["instructions"]


async def test_t1_an_answer_that_led_to_a_model_behavior_error_is_not_pinned(db_url: str) -> None:
    answers: list[str] = []

    def respond(call: Any) -> Any:
        # The first answer calls a tool that does not exist (a ModelBehaviorError); later
        # ones answer properly.
        answers.append("bad" if not answers else "good")
        return tool_calls(("no_such_tool", {})) if answers[-1] == "bad" else message("fine")

    model = policy_model(respond)
    agent = Agent(name="flaky", model=model, tools=[work_tool([])])

    @checkpointed_pipeline(f"behavior-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, user_text_of("go"))).final_output)

    from agents.exceptions import ModelBehaviorError

    with pytest.raises(ModelBehaviorError):
        await pipeline(run_id="r-behavior")
    assert await pipeline(run_id="r-behavior") == "fine"  # a fresh answer, not the pinned one
    assert answers == ["bad", "good"]
    kinds = [e.kind for e in await events_of(db_url, "r-behavior")]
    assert "turn_dropped" in kinds


def user_text_of(text: str) -> str:
    return text


class Named(Model):
    """Delegates to a scripted model; named like a served model."""

    def __init__(self, inner: Any, model: str) -> None:
        self.inner = inner
        self.model = model

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.get_response(*args, **kwargs)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.stream_response(*args, **kwargs)


class Provider(ModelProvider):
    def __init__(self, served: Model) -> None:
        self.served = served

    def get_model(self, model_name: str | None) -> Model:
        return self.served


@pytest.mark.parametrize("how", ["agent_model", "run_config_model", "provider", "as_tool"])
async def test_t1_every_model_call_is_journaled_under_the_model_that_served_it(
    db_url: str, how: str
) -> None:
    served = Named(looping(2), "served-model-7")
    kwargs: dict[str, Any] = {}
    if how == "agent_model":
        agent = Agent(name="worker", model=served, tools=[work_tool([2])])
    elif how == "run_config_model":
        agent = Agent(name="worker", model="declared-model", tools=[work_tool([2])])
        kwargs["run_config"] = RunConfig(model=served)
    elif how == "provider":
        agent = Agent(name="worker", model="alias", tools=[work_tool([2])])
        kwargs["run_config"] = RunConfig(model_provider=Provider(served))
    else:
        sub = Agent(name="worker", model=served, tools=[work_tool([2])])

        def outer(call: Any) -> Any:
            outputs = tool_outputs(call)
            return message(f"got {outputs[0]}") if outputs else tool_calls(("ask", {"input": "x"}))

        agent = Agent(
            name="outer",
            model=Named(policy_model(outer), "outer-model"),
            tools=[sub.as_tool(tool_name="ask", tool_description="Ask.")],
        )

    @checkpointed_pipeline(f"served-{how}-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "go", **kwargs)).final_output)

    first_calls = len(served.inner.calls)
    with pytest.raises(Abort):
        await pipeline(run_id=f"r-{how}")
    answered = len(served.inner.calls) - first_calls
    await pipeline(run_id=f"r-{how}")
    total = len(served.inner.calls) - first_calls
    assert total == 3  # two tool turns and the answer: none asked twice
    assert answered == 2
    rows = await Tidebase(db_url).usage_records(f"r-{how}")
    served_rows = [r for r in rows if r.model == "served-model-7"]
    assert len(served_rows) == 3 and not any(r.lost for r in served_rows)
    assert {r.model for r in rows} <= {"served-model-7", "outer-model"}


async def test_t1_a_streamed_run_cut_short_resumes_with_replayed_turns_marked(db_url: str) -> None:
    model = looping(3)
    agent = Agent(name="streamer", model=model, tools=[work_tool([3])])
    seen: list[list[tuple[str, bool]]] = []

    @checkpointed_pipeline(f"stream-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        events: list[tuple[str, bool]] = []
        seen.append(events)
        streamed = Runner.run_streamed(agent, "go", max_turns=20)
        async for event in streamed.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.completed":
                events.append(("completed", is_replayed(event)))
            elif event.type == "run_item_stream_event" and event.name == "tool_called":
                events.append(("tool_called", is_replayed(event)))
        return str(streamed.final_output)

    with pytest.raises(Abort):
        await pipeline(run_id="r-stream")
    assert len(model.calls) == 3
    assert await pipeline(run_id="r-stream") == "done: w1, w2, w3"
    assert len(model.calls) == 4  # only the answer was asked for
    assert seen[1] == [
        ("completed", True),
        ("tool_called", True),
        ("completed", True),
        ("tool_called", True),
        ("completed", True),
        ("tool_called", True),
        ("completed", False),
    ]


async def test_t1_a_handoff_between_models_records_each_call_under_its_own(db_url: str) -> None:
    smart = Named(looping(1, "expert says"), "smart-model")
    expert = Agent(name="expert", model=smart, tools=[work_tool([])])

    def front_respond(call: Any) -> Any:
        return tool_calls(("transfer_to_expert", {}))

    front = Agent(
        name="front", model=Named(policy_model(front_respond), "cheap-model"), handoffs=[expert]
    )

    @checkpointed_pipeline(f"handoff-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(front, "go")).final_output)

    assert await pipeline(run_id="r-handoff") == "expert says: w1"
    rows = await Tidebase(db_url).usage_records("r-handoff")
    assert [(r.step, r.model) for r in rows] == [
        ("agent:front#1/model#1", "cheap-model"),
        ("agent:front#1/model#2", "smart-model"),
        ("agent:front#1/model#3", "smart-model"),
    ]


async def test_t1_no_tool_of_an_answer_runs_once_the_run_was_cancelled(db_url: str) -> None:
    # The answer's journal entry is written behind the call; its fence must still be heard
    # before any tool it asked for runs (R12), not at the next write.
    from agents.items import ModelResponse
    from agents.testing import function_call
    from agents.usage import Usage

    from tidebase_agents import RunCancelled

    run_id = f"r-cancel-{uuid.uuid4().hex[:6]}"
    ran: list[int] = []

    @function_tool
    def work(i: int) -> str:
        """Do step i."""
        ran.append(i)
        return f"w{i}"

    class CancelledWhileAnswering(Model):
        calls = 0

        async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
            self.calls += 1
            if self.calls == 2:
                await Tidebase(db_url).cancel(run_id)  # an operator, while the model answers
            call = function_call("work", {"i": self.calls}, call_id=f"c{self.calls}")
            return ModelResponse(output=[call], usage=Usage(requests=1), response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    agent = Agent(name="worker", model=CancelledWhileAnswering(), tools=[work])

    @checkpointed_pipeline(f"cancel-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "go", max_turns=10)).final_output)

    with pytest.raises(RunCancelled):
        await pipeline(run_id=run_id)
    assert ran == [1]  # turn 2's tool never ran
    assert (await Tidebase(db_url).get_run(run_id)).status == "cancelled"
