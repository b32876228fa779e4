"""Agent runs inside a pipeline are checkpointed steps (I1-I3, R1, R3, R9), on SQLite and
PostgreSQL. Every replay happens with models whose calls are counted: a replay that calls a
model, a result that differs from the original, or usage counted twice fails the test."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import httpx2
import openai
import pytest
from agentkit_common import (
    Interrupted,
    assert_same_result,
    message,
    policy_model,
    roundtrip,
    tool_calls,
    tool_outputs,
    total_calls,
    user_text,
)
from agentkit_common import close_engines as close_engines
from agents import (
    Agent,
    GuardrailFunctionOutput,
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    Runner,
    function_tool,
    handoff,
    input_guardrail,
)
from agents.extensions.handoff_filters import remove_all_tools
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from agents.testing import ModelStep, ScriptedModel
from pydantic import BaseModel

from tidebase_agents import Tidebase, checkpointed_pipeline, durable_tool

HASH12 = "[0-9a-f]{12}"


class Report(BaseModel):
    title: str
    score: int
    tags: list[str]


@dataclasses.dataclass
class Pair:
    left: int
    right: str


async def usage_rows(url: str, run_id: str) -> list[tuple[str | None, str | None, int, int]]:
    rows = await Tidebase(url).store.get_usage(run_id)
    return sorted((r.step, r.model, r.requests, r.total_tokens) for r in rows)


async def step_status(url: str, run_id: str) -> dict[str, str]:
    return {s.name: s.status for s in await Tidebase(url).steps(run_id)}


# -- step names and usage -------------------------------------------------------------------------


async def test_step_names_count_calls_per_agent_and_nest_tool_calls(db_url: str) -> None:
    lookups: list[str] = []

    @function_tool
    @durable_tool
    async def lookup(term: str) -> str:
        lookups.append(term)
        return f"definition of {term}"

    def research(call: Any) -> ModelStep:
        if not tool_outputs(call):
            return tool_calls(("lookup", {"term": user_text(call)}))
        return message(f"notes: {tool_outputs(call)[0]}")

    researcher_model = policy_model(research)
    writer_model = policy_model(lambda call: message("POST " + user_text(call)))
    researcher = Agent(name="researcher", model=researcher_model, tools=[lookup])
    writer = Agent(name="writer", model=writer_model)

    @checkpointed_pipeline("names", database_url=db_url)
    async def pipeline(a: str, b: str) -> list[str]:
        first = await Runner.run(researcher, a)
        second = await Runner.run(researcher, b)
        post = await Runner.run(writer, f"{first.final_output} / {second.final_output}")
        return [str(first.final_output), str(second.final_output), str(post.final_output)]

    out = await pipeline("alpha", "beta", run_id="run-names")
    assert out[2] == "POST notes: definition of alpha / notes: definition of beta"
    names = sorted(await step_status(db_url, "run-names"))
    assert len(names) == 5
    assert names[0] == "agent:researcher#1"
    assert re.fullmatch(rf"agent:researcher#1/tool:lookup:{HASH12}#1", names[1])
    assert names[2] == "agent:researcher#2"
    assert re.fullmatch(rf"agent:researcher#2/tool:lookup:{HASH12}#1", names[3])
    assert names[4] == "agent:writer#1"
    assert names[1].rsplit("/", 1)[1] != names[3].rsplit("/", 1)[1]  # other arguments

    # Usage: one row per model call (T1), none for tool steps, none added by re-invoking.
    rows = await usage_rows(db_url, "run-names")
    assert [(step, requests, tokens) for step, _, requests, tokens in rows] == [
        ("agent:researcher#1/model#1", 1, 15),
        ("agent:researcher#1/model#2", 1, 15),
        ("agent:researcher#2/model#1", 1, 15),
        ("agent:researcher#2/model#2", 1, 15),
        ("agent:writer#1/model#1", 1, 15),
    ]
    assert await pipeline("alpha", "beta", run_id="run-names") == out
    assert await usage_rows(db_url, "run-names") == rows
    assert lookups == ["alpha", "beta"]

    # The query API totals the same rows, by run and by pipeline and model.
    tide = Tidebase(db_url)
    by_run = await tide.usage(by=["run"], run_id="run-names")
    assert [(r["run"], r["requests"], r["total_tokens"], r["records"]) for r in by_run] == [
        ("run-names", 5, 75, 5)
    ]
    (by_model,) = await tide.usage(by=["pipeline", "model"])
    model_name = rows[0][1]
    assert (by_model["pipeline"], by_model["model"], by_model["total_tokens"]) == (
        "names",
        model_name,
        75,
    )
    assert (by_model["cost_usd"], by_model["unpriced_models"]) == (None, [model_name])


async def test_usage_is_recorded_once_per_model_call_and_replay_adds_none(db_url: str) -> None:
    model = policy_model(lambda call: message("ok " + user_text(call), inp=40, out=2))
    agent = Agent(name="counter", model=model)
    original, replayed, run_id = await roundtrip(
        db_url, lambda: Runner.run(agent, "count me"), [model]
    )
    assert_same_result(replayed, original)
    rows = await usage_rows(db_url, run_id)
    assert [(step, requests, tokens) for step, _, requests, tokens in rows] == [
        ("agent:counter#1/model#1", 1, 42)
    ]
    assert replayed.context_wrapper.usage.total_tokens == 42


# -- R1 round trips ------------------------------------------------------------------------------


OUTPUTS: dict[str, tuple[Any, str, Any]] = {
    "pydantic": (
        Report,
        json.dumps({"title": "Durable agents", "score": 7, "tags": ["a", "b"]}),
        Report(title="Durable agents", score=7, tags=["a", "b"]),
    ),
    "dataclass": (Pair, json.dumps({"response": {"left": 3, "right": "x"}}), Pair(3, "x")),
    "list_int": (list[int], json.dumps({"response": [3, 1, 2]}), [3, 1, 2]),
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
async def test_typed_output_round_trips(db_url: str, kind: str) -> None:
    output_type, text, expected = OUTPUTS[kind]

    @function_tool
    def measure(what: str) -> int:
        return len(what)

    def respond(call: Any) -> ModelStep:
        if not tool_outputs(call):
            return tool_calls(("measure", {"what": user_text(call)}))
        return message(text)

    model = policy_model(respond)
    analyst = Agent(name="analyst", model=model, tools=[measure], output_type=output_type)
    original, replayed, _ = await roundtrip(
        db_url, lambda: Runner.run(analyst, "analyze this"), [model]
    )
    assert original.final_output == expected
    assert type(replayed.final_output) is type(expected)
    assert_same_result(replayed, original)
    assert replayed.last_agent is analyst
    assert [type(i) for i in replayed.new_items] == [
        ToolCallItem,
        ToolCallOutputItem,
        MessageOutputItem,
    ]


async def test_handoff_with_input_filter_round_trips(db_url: str) -> None:
    @function_tool
    def classify(text: str) -> str:
        return "billing"

    specialist_model = policy_model(
        lambda call: message(json.dumps({"title": "refund", "score": 2, "tags": ["billing"]}))
    )
    specialist = Agent(name="specialist", model=specialist_model, output_type=Report)

    def triage_respond(call: Any) -> ModelStep:
        if not tool_outputs(call):
            return tool_calls(("classify", {"text": user_text(call)}))
        return tool_calls(("transfer_to_specialist", {}))

    triage_model = policy_model(triage_respond)
    triage = Agent(
        name="triage",
        model=triage_model,
        tools=[classify],
        handoffs=[handoff(specialist, input_filter=remove_all_tools)],
    )
    models = [triage_model, specialist_model]
    original, replayed, run_id = await roundtrip(
        db_url, lambda: Runner.run(triage, "I want my money back"), models
    )
    assert original.final_output == Report(title="refund", score=2, tags=["billing"])
    assert original.last_agent is specialist
    # The filter ran: the specialist never saw the tool call.
    assert not any(
        isinstance(i, dict) and i.get("type") == "function_call"
        for i in specialist_model.calls[0].input
        if isinstance(specialist_model.calls[0].input, list)
    )
    assert_same_result(replayed, original)
    assert replayed.last_agent is specialist
    assert replayed.new_items[-1].agent is specialist
    assert [type(i).__name__ for i in original.new_items] == [
        type(i).__name__ for i in replayed.new_items
    ]
    assert await step_status(db_url, run_id) == {"agent:triage#1": "completed"}


def _expert_graph(
    *, fail_once: bool = False
) -> tuple[Agent[Any], Agent[Any], ScriptedModel, ScriptedModel, list[str]]:
    """An orchestrator that asks an expert agent (as a tool) two questions in one turn. With
    ``fail_once`` its first final-answer model call fails (a transient model error)."""
    asked: list[str] = []
    fail = [fail_once]

    def expert_respond(call: Any) -> ModelStep:
        asked.append(user_text(call))
        return message(f"expert says {user_text(call)}", inp=7, out=2)

    expert_model = policy_model(expert_respond)
    expert = Agent(name="expert", instructions="Answer briefly.", model=expert_model)

    def orchestrate(call: Any) -> ModelStep:
        outputs = tool_outputs(call)
        if not outputs:
            return tool_calls(
                ("ask_expert", {"input": "q1: why?"}), ("ask_expert", {"input": "q2: how?"})
            )
        if fail[0]:
            fail[0] = False
            return ModelStep(error=RuntimeError("model connection reset"))
        return message(" | ".join(outputs), inp=50, out=10)

    orchestrator_model = policy_model(orchestrate)
    orchestrator = Agent(
        name="orchestrator",
        model=orchestrator_model,
        tools=[expert.as_tool(tool_name="ask_expert", tool_description="Ask the expert.")],
    )
    return orchestrator, expert, orchestrator_model, expert_model, asked


async def test_agent_as_tool_steps_nest_and_usage_matches_an_unchecked_run(db_url: str) -> None:
    plain_orchestrator, *_ = _expert_graph()
    unchecked = await Runner.run(plain_orchestrator, "plan")

    orchestrator, _, orchestrator_model, expert_model, asked = _expert_graph()
    original, replayed, run_id = await roundtrip(
        db_url, lambda: Runner.run(orchestrator, "plan"), [orchestrator_model, expert_model]
    )
    assert original.final_output == unchecked.final_output
    assert original.final_output == "expert says q1: why? | expert says q2: how?"
    assert sorted(asked) == ["q1: why?", "q2: how?"]  # parallel sub-agent calls, once each
    assert_same_result(replayed, original)
    assert replayed.last_agent is orchestrator

    names = sorted(await step_status(db_url, run_id))
    assert names[0] == "agent:orchestrator#1"
    nested = names[1:]
    assert len(nested) == 2
    for name in nested:
        assert re.fullmatch(
            rf"agent:orchestrator#1/tool:ask_expert:{HASH12}#1/agent:expert#1", name
        )
    assert nested[0] != nested[1]

    # Usage: each model call is recorded under its own turn; the totals are an unchecked run's.
    rows = await usage_rows(db_url, run_id)
    assert [(step, requests, tokens) for step, _, requests, tokens in rows] == [
        ("agent:orchestrator#1/model#1", 1, 15),
        ("agent:orchestrator#1/model#2", 1, 60),
        (f"{nested[0]}/model#1", 1, 9),
        (f"{nested[1]}/model#1", 1, 9),
    ]
    expected = unchecked.context_wrapper.usage
    for result in (original, replayed):
        got = result.context_wrapper.usage
        assert (got.requests, got.input_tokens, got.output_tokens, got.total_tokens) == (
            expected.requests,
            expected.input_tokens,
            expected.output_tokens,
            expected.total_tokens,
        )
    assert sum(r[2] for r in rows) == expected.requests
    assert sum(r[3] for r in rows) == expected.total_tokens


async def test_reexecuted_orchestrator_replays_finished_sub_agent_steps(db_url: str) -> None:
    """The orchestrator fails after its sub-agents finished: re-invoking re-executes the
    orchestrator, whose first turn (the one that asked the sub-agents) replays from the
    journal (T1), and the nested sub-agent steps replay from their checkpoints."""
    plain_orchestrator, *_ = _expert_graph()
    unchecked = await Runner.run(plain_orchestrator, "plan")
    orchestrator, _, orchestrator_model, expert_model, asked = _expert_graph(fail_once=True)

    @checkpointed_pipeline("nested-reexecute", database_url=db_url)
    async def pipeline() -> str:
        result = await Runner.run(orchestrator, "plan")
        assert result.context_wrapper.usage.total_tokens == (
            unchecked.context_wrapper.usage.total_tokens
        )
        return str(result.final_output)

    with pytest.raises(RuntimeError, match="model connection reset"):
        await pipeline(run_id="run-nested")
    statuses = await step_status(db_url, "run-nested")
    assert statuses.pop("agent:orchestrator#1") == "failed_retryable"
    assert statuses.pop("agent:orchestrator#1/model#1") == "completed"  # its journaled turn
    assert sorted(statuses.values()) == ["completed", "completed"]
    assert len(asked) == 2

    assert await pipeline(run_id="run-nested") == unchecked.final_output
    assert len(asked) == 2  # the sub-agents were replayed, not asked again
    assert len(expert_model.calls) == 2
    assert len(orchestrator_model.calls) == 3  # 2 on the failed attempt, 1 on the re-execution
    rows = await usage_rows(db_url, "run-nested")
    assert [step for step, *_ in rows].count("agent:orchestrator#1/model#1") == 1
    assert len(rows) == 4
    assert sum(r[3] for r in rows) == unchecked.context_wrapper.usage.total_tokens


# -- R3: deterministic failures are outcomes, transient ones are retried ---------------------------


async def test_max_turns_exceeded_is_a_recorded_outcome(db_url: str) -> None:
    executed: list[int] = []

    @function_tool
    def step_once(n: int) -> str:
        executed.append(n)
        return f"did {n}"

    model = policy_model(lambda call: tool_calls(("step_once", {"n": len(tool_outputs(call))})))
    looper = Agent(name="looper", model=model, tools=[step_once])

    @checkpointed_pipeline("max-turns", database_url=db_url)
    async def pipeline() -> str:
        result = await Runner.run(looper, "loop forever", max_turns=1)
        return str(result.final_output)

    with pytest.raises(MaxTurnsExceeded):
        await pipeline(run_id="run-max-turns")
    calls, runs = len(model.calls), list(executed)
    assert calls >= 1
    with pytest.raises(MaxTurnsExceeded, match="Max turns"):
        await pipeline(run_id="run-max-turns")
    assert len(model.calls) == calls  # replayed: the model was not called again
    assert executed == runs
    assert await step_status(db_url, "run-max-turns") == {"agent:looper#1": "completed"}
    rows = await usage_rows(db_url, "run-max-turns")
    assert [(step, requests) for step, _, requests, _ in rows] == [
        (f"agent:looper#1/model#{n}", 1) for n in range(1, calls + 1)
    ]


async def test_input_guardrail_tripwire_is_a_recorded_outcome(db_url: str) -> None:
    checks: list[str] = []

    @input_guardrail
    def no_secrets(ctx: Any, agent: Any, text: Any) -> GuardrailFunctionOutput:
        checks.append(str(text))
        return GuardrailFunctionOutput(output_info={"reason": "secret"}, tripwire_triggered=True)

    model = policy_model(lambda call: message("should not matter"))
    guarded = Agent(name="guarded", model=model, input_guardrails=[no_secrets])

    @checkpointed_pipeline("guardrail", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(guarded, "the password is hunter2")).final_output)

    with pytest.raises(InputGuardrailTripwireTriggered):
        await pipeline(run_id="run-guardrail")
    calls = len(model.calls)
    assert checks == ["the password is hunter2"]
    with pytest.raises(InputGuardrailTripwireTriggered) as exc:
        await pipeline(run_id="run-guardrail")
    assert exc.value.guardrail_result.output.output_info == {"reason": "secret"}
    assert checks == ["the password is hunter2"]  # not evaluated again
    assert len(model.calls) == calls
    assert await step_status(db_url, "run-guardrail") == {"agent:guarded#1": "completed"}


def _connection_error() -> Exception:
    return openai.APIConnectionError(request=httpx2.Request("POST", "https://api.invalid/v1"))


@pytest.mark.parametrize(
    "error", [RuntimeError("connection reset by peer"), _connection_error()], ids=type
)
async def test_transient_model_failure_leaves_the_step_retryable(
    db_url: str, error: Exception
) -> None:
    model = ScriptedModel([ModelStep(error=error), message("recovered")])
    agent = Agent(name="flaky", model=model)

    @checkpointed_pipeline("transient", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "try")).final_output)

    with pytest.raises(type(error)):
        await pipeline(run_id="run-transient")
    assert len(model.calls) == 1
    assert await step_status(db_url, "run-transient") == {"agent:flaky#1": "failed_retryable"}
    assert (await Tidebase(db_url).get_run("run-transient")).status == "failed_retryable"
    assert await usage_rows(db_url, "run-transient") == []

    assert await pipeline(run_id="run-transient") == "recovered"
    assert len(model.calls) == 2  # executed again on the next invocation
    steps = await Tidebase(db_url).steps("run-transient")
    assert [(s.status, s.attempts) for s in steps] == [("completed", 2)]


async def test_transient_failure_after_a_finished_step_keeps_the_finished_one(
    db_url: str,
) -> None:
    first_model = policy_model(lambda call: message("first done"))
    second_model = ScriptedModel([ModelStep(error=RuntimeError("boom")), message("second done")])
    first = Agent(name="first", model=first_model)
    second = Agent(name="second", model=second_model)

    @checkpointed_pipeline("partial", database_url=db_url)
    async def pipeline() -> list[str]:
        a = await Runner.run(first, "one")
        b = await Runner.run(second, str(a.final_output))
        return [str(a.final_output), str(b.final_output)]

    with pytest.raises(RuntimeError, match="boom"):
        await pipeline(run_id="run-partial")
    assert await pipeline(run_id="run-partial") == ["first done", "second done"]
    assert len(first_model.calls) == 1
    assert len(second_model.calls) == 2
    assert total_calls([first_model, second_model]) == 3


async def test_interrupted_pipeline_replays_every_finished_agent(db_url: str) -> None:
    """A pipeline body that fails after two agents resumes without calling either model."""
    a_model = policy_model(lambda call: message("A:" + user_text(call)))
    b_model = policy_model(lambda call: message("B:" + user_text(call)))
    a, b = Agent(name="a", model=a_model), Agent(name="b", model=b_model)
    attempts = 0

    @checkpointed_pipeline("interrupted", database_url=db_url)
    async def pipeline(x: str) -> str:
        nonlocal attempts
        attempts += 1
        ra = await Runner.run(a, x)
        rb = await Runner.run(b, str(ra.final_output))
        if attempts == 1:
            raise Interrupted
        return str(rb.final_output)

    with pytest.raises(Interrupted):
        await pipeline("go", run_id="run-interrupted")
    assert await pipeline("go", run_id="run-interrupted") == "B:A:go"
    assert (len(a_model.calls), len(b_model.calls)) == (1, 1)
