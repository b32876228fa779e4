"""Agents SDK features inside pipelines, each crashed at a meaningful point and resumed in a
fresh process (``tests/process/test_sdk_features.py``).

Every scenario is an async function of a :class:`Kit`: it builds its agents, tools and pipeline
from scratch (so each process and each run has its own objects and model call counts), runs the
pipeline under ``kit.run_id`` (creating or resuming the run) and reports what user code sees.
``await kit.point(NAME)`` marks a crash point.

A crash child (:func:`crash_all`) starts every job of :data:`JOBS` at once; each job stops at its
crash point, and when all have stopped (or ended) the process dies with ``os._exit``. One
process, many runs, each killed at its own point: far cheaper than a process per job, and each
run sees exactly a kill at that point. A resume child (:func:`resume_all`) then resumes every
job's run, and runs each scenario once more under a run id of its own, crash-free: the
reference the resumed runs must match.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import secrets
import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agentkit_common import (
    ExternalApi,
    async_url,
    crash,
    log_line,
    message,
    policy_model,
    read_lines,
    tool_calls,
    until_unlocked,
    user_text,
)
from agents import (
    Agent,
    AgentHooks,
    GuardrailFunctionOutput,
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    RunContextWrapper,
    RunErrorHandlerResult,
    RunHooks,
    Runner,
    SQLiteSession,
    StopAtTools,
    ToolGuardrailFunctionOutput,
    ToolsToFinalOutputResult,
    function_tool,
    handoff,
    input_guardrail,
    output_guardrail,
    tool_input_guardrail,
)
from agents.extensions import handoff_filters
from agents.extensions.memory import SQLAlchemySession
from agents.mcp import MCPServerStdio
from agents.run_state import RunState
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from tidebase_agents import (
    NotDurableWarning,
    StepNeedsReview,
    checkpointed_pipeline,
    durable_mcp,
    durable_tool,
    idempotency_key,
    is_replaying,
    register_types,
)

#: Long enough for the heartbeats of twenty runs in one loaded process; a resume waits it out.
LEASE = 5.0
SUPPORT = Path(__file__).parent

Scenario = Callable[["Kit"], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


class Barrier:
    """Holds every job at its crash point until all jobs stopped there or ended."""

    def __init__(self, jobs: int) -> None:
        self.waiting = jobs
        self.arrived: set[str] = set()
        self.all_stopped = asyncio.Event()

    def done(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_stopped.set()

    async def hold(self, job: str) -> None:
        self.arrived.add(job)
        self.done()
        await asyncio.Event().wait()  # until the process dies


@dataclasses.dataclass
class Kit:
    url: str
    directory: Path
    run_id: str
    job: str = ""
    crash_at: str | None = None
    barrier: Barrier | None = None

    async def point(self, name: str) -> None:
        if self.crash_at == name and self.barrier is not None:
            await self.barrier.hold(self.job)

    def pipeline(self, name: str, **options: Any) -> Any:
        return checkpointed_pipeline(
            f"sdkfeat-{name}", database_url=self.url, lease_seconds=LEASE, **options
        )

    async def call(self, pipeline: Any, *args: Any) -> Any:
        """Create or resume this kit's run of ``pipeline``."""
        return await until_unlocked(lambda: pipeline(*args, run_id=self.run_id))


# -- model helpers --------------------------------------------------------------------------------


def turn_items(call: Any) -> list[dict[str, Any]]:
    """Input items of a model call from the last user message on."""
    items = [call.input] if isinstance(call.input, str) else list(call.input)
    users = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("role")]
    users = [i for i in users if items[i].get("role") == "user"]
    return [i for i in items[users[-1] if users else 0 :] if isinstance(i, dict)]


def _text(output: Any) -> str:
    if isinstance(output, list):  # MCP and structured outputs: content parts
        return "".join(str(part.get("text", "")) for part in output if isinstance(part, dict))
    return str(output)


def outputs_of(call: Any, tool: str) -> list[str]:
    """Outputs of the calls of ``tool`` answered since the last user message."""
    items = turn_items(call)
    ids = {
        i.get("call_id") for i in items if i.get("type") == "function_call" and i["name"] == tool
    }
    return [
        _text(i.get("output"))
        for i in items
        if i.get("type") == "function_call_output" and i.get("call_id") in ids
    ]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def user_texts(call: Any) -> list[str]:
    """Every user message of the call's input (session history included)."""
    items = [{"role": "user", "content": call.input}] if isinstance(call.input, str) else call.input
    return [
        str(i["content"])
        for i in items
        if isinstance(i, dict) and i.get("role") == "user" and isinstance(i.get("content"), str)
    ]


# -- customer service: context set by on_handoff and tools, a keyed seat write, three turns ------


class AirlineAgentContext(BaseModel):
    passenger_name: str | None = None
    confirmation_number: str | None = None
    seat_number: str | None = None
    flight_number: str | None = None


@scenario
async def customer_service(kit: Kit) -> dict[str, Any]:
    """The SDK's customer-service example, offline: triage hands off to seat booking (whose
    ``on_handoff`` draws the flight number), the seat tool sets the confirmation and seat on the
    context and books the seat (a keyed write), and the FAQ agent's dynamic instructions read
    the context."""
    api = ExternalApi(kit.directory)
    draws = kit.directory / "flight-draws.log"

    @function_tool(name_override="faq_lookup_tool")
    async def faq_lookup_tool(question: str) -> str:
        """Lookup frequently asked questions."""
        if "bag" in question:
            return "You are allowed to bring one bag on the plane."
        return "I'm sorry, I don't know the answer to that question."

    @function_tool
    @durable_tool(side_effects=["seat-api"])
    async def update_seat(
        context: RunContextWrapper[AirlineAgentContext], confirmation_number: str, new_seat: str
    ) -> str:
        """Update the seat for a given confirmation number.

        Args:
            confirmation_number: The confirmation number for the flight.
            new_seat: The new seat to update to.
        """
        context.context.confirmation_number = confirmation_number
        context.context.seat_number = new_seat
        assert context.context.flight_number is not None, "Flight number is required"
        api.create(f"{context.context.flight_number}:{new_seat}", idempotency_key())
        await kit.point("in_write")
        return f"Updated seat to {new_seat} for confirmation number {confirmation_number}"

    async def on_seat_booking_handoff(context: RunContextWrapper[AirlineAgentContext]) -> None:
        flight_number = f"FLT-{secrets.randbelow(900) + 100}"
        log_line(draws, flight_number)
        context.context.flight_number = flight_number

    def faq_instructions(
        context: RunContextWrapper[AirlineAgentContext], agent: Agent[AirlineAgentContext]
    ) -> str:
        ctx = context.context
        return f"Answer FAQs. Passenger seat: {ctx.seat_number}; flight: {ctx.flight_number}."

    def triage(call: Any) -> Any:
        text = user_text(call)
        if "baggage" in text:
            return tool_calls(("transfer_to_faq_agent", {}))
        return tool_calls(("transfer_to_seat_booking_agent", {}))

    async def seat(call: Any) -> Any:
        text = user_text(call)
        done = outputs_of(call, "update_seat")
        if done:
            await kit.point("after_seat_tool")
            return message(f"Your seat is booked. {done[0]}")
        if "ABC123" in text:
            return tool_calls(("update_seat", {"confirmation_number": "ABC123", "new_seat": "12A"}))
        if "baggage" in text:
            return tool_calls(("transfer_to_triage_agent", {}))
        return message("What is your confirmation number and which seat would you like?")

    def faq(call: Any) -> Any:
        answer = outputs_of(call, "faq_lookup_tool")
        if not answer:
            return tool_calls(("faq_lookup_tool", {"question": "baggage allowance"}))
        found = re.search(r"seat: (\S+); flight: (\S+)\.", call.system_instructions or "")
        where = f"seat {found.group(1)} on {found.group(2)}" if found else "unknown"
        return message(f"{answer[0]} You keep {where}.")

    faq_agent = Agent[AirlineAgentContext](
        name="FAQ Agent",
        handoff_description="Answers frequently asked questions about the airline.",
        instructions=faq_instructions,
        tools=[faq_lookup_tool],
        model=policy_model(faq),
    )
    seat_booking_agent = Agent[AirlineAgentContext](
        name="Seat Booking Agent",
        handoff_description="Updates a seat on a flight.",
        instructions="Ask for the confirmation number and the seat, then use update_seat.",
        tools=[update_seat],
        model=policy_model(seat),
    )
    triage_agent = Agent[AirlineAgentContext](
        name="Triage Agent",
        instructions="Delegate the question to the right agent.",
        handoffs=[faq_agent, handoff(agent=seat_booking_agent, on_handoff=on_seat_booking_handoff)],
        model=policy_model(triage),
    )
    faq_agent.handoffs.append(triage_agent)
    seat_booking_agent.handoffs.append(triage_agent)
    contexts: list[AirlineAgentContext] = []

    @kit.pipeline("customer-service")
    async def airline() -> dict[str, Any]:
        ctx = AirlineAgentContext()
        contexts.append(ctx)
        r1 = await Runner.run(triage_agent, "I want to change my seat", context=ctx)
        await kit.point("after_turn_1")
        turn = [*r1.to_input_list(), user("My confirmation number is ABC123, seat 12A please")]
        r2 = await Runner.run(r1.last_agent, turn, context=ctx)
        await kit.point("after_turn_2")
        turn = [*r2.to_input_list(), user("What is the baggage allowance?")]
        r3 = await Runner.run(r2.last_agent, turn, context=ctx)
        await kit.point("after_turn_3")
        return {
            "answers": [r1.final_output, r2.final_output, r3.final_output],
            "agents": [r.last_agent.name for r in (r1, r2, r3)],
            "context": ctx.model_dump(),
        }

    result = await kit.call(airline)
    return {
        "result": result,
        "caller_context": contexts[-1].model_dump() if contexts else None,
        "draws": read_lines(draws),
        "writes": api.write_rows(),
        "attempts": api.attempt_rows(),
    }


# -- handoffs with an input filter ----------------------------------------------------------------


@scenario
async def handoffs(kit: Kit) -> dict[str, Any]:
    @function_tool
    def lookup(topic: str) -> str:
        """Look a topic up."""
        return f"notes on {topic}"

    def triage(call: Any) -> Any:
        if not outputs_of(call, "lookup"):
            return tool_calls(("lookup", {"topic": "refunds"}))
        return tool_calls(("transfer_to_specialist", {}))

    def specialist(call: Any) -> Any:
        kinds = sorted({str(i.get("type", i.get("role"))) for i in call.input})
        return message(f"specialist for {user_text(call)!r} saw {kinds}")

    specialist_agent = Agent(name="specialist", model=policy_model(specialist))
    triage_agent = Agent(
        name="triage",
        tools=[lookup],
        handoffs=[handoff(specialist_agent, input_filter=handoff_filters.remove_all_tools)],
        model=policy_model(triage),
    )

    @kit.pipeline("handoffs")
    async def pipeline() -> dict[str, Any]:
        r1 = await Runner.run(triage_agent, "I want a refund")
        await kit.point("after_handoff")
        r2 = await Runner.run(r1.last_agent, [*r1.to_input_list(), user("thanks")])
        return {
            "answers": [r1.final_output, r2.final_output],
            "last_agent_is_live": r1.last_agent is specialist_agent,
            "items": [type(i).__name__ for i in r1.new_items],
            "input_list": r1.to_input_list(),
        }

    return {
        "result": await kit.call(pipeline),
        "specialist_calls": len(specialist_agent.model.calls),  # type: ignore[union-attr]
    }


# -- agents as tools, one of them streamed to on_stream; the outer run streamed too --------------


@scenario
async def agents_as_tools(kit: Kit) -> dict[str, Any]:
    translator = Agent(
        name="translator", model=policy_model(lambda c: message(f"[fr] {user_text(c)}"))
    )
    summarizer = Agent(
        name="summarizer", model=policy_model(lambda c: message(f"summary: {user_text(c)}"))
    )
    streamed_to_tool: list[str] = []

    async def on_stream(event: Any) -> None:
        streamed_to_tool.append(event["event"].type)

    async def orchestrate(call: Any) -> Any:
        translated = outputs_of(call, "translate")
        summary = outputs_of(call, "summarize")
        if not translated:
            return tool_calls(
                ("translate", {"input": "good morning"}), ("summarize", {"input": "a long story"})
            )
        await kit.point("after_tools")
        return message(f"{translated[0]} / {summary[0]}")

    orchestrator = Agent(
        name="orchestrator",
        tools=[
            translator.as_tool("translate", "Translate to French."),
            summarizer.as_tool("summarize", "Summarize a text.", on_stream=on_stream),
        ],
        model=policy_model(orchestrate),
    )

    @kit.pipeline("agents-as-tools")
    async def pipeline() -> dict[str, Any]:
        streamed = Runner.run_streamed(orchestrator, "translate and summarize")
        events = [e.type async for e in streamed.stream_events() if e.type != "raw_response_event"]
        return {"output": streamed.final_output, "events": events}

    return {
        "result": await kit.call(pipeline),
        "nested_calls": len(translator.model.calls) + len(summarizer.model.calls),  # type: ignore[union-attr]
        "on_stream": sorted(set(streamed_to_tool)),
    }


# -- guardrails: input, output and tool, typed outputs, a tripwire --------------------------------


@dataclasses.dataclass
class InputCheck:
    words: int


class OutputCheck(BaseModel):
    length: int
    checked: dt.datetime
    tags: set[str]


class ToolCheck(BaseModel):
    arguments: int


class UnregisteredNote(BaseModel):
    note: str


class CityAnswer(BaseModel):
    city: str
    summary: str


register_types(InputCheck, OutputCheck, ToolCheck)


def _describe_guardrails(result: Any, live: dict[str, Any]) -> dict[str, Any]:
    def info(r: Any) -> list[Any]:
        value = r.output.output_info
        return [type(value).__name__, to_jsonable_python(value)]

    return {
        "input": [info(r) for r in result.input_guardrail_results],
        "input_live": [
            r.guardrail is live[r.guardrail.get_name()] for r in result.input_guardrail_results
        ],
        "output": [info(r) for r in result.output_guardrail_results],
        "output_live": [
            r.guardrail is live[r.guardrail.get_name()] for r in result.output_guardrail_results
        ],
        "agent_output": [
            [type(r.agent_output).__name__, repr(r.agent_output)]
            for r in result.output_guardrail_results
        ],
        "tool_input": [info(r) for r in result.tool_input_guardrail_results],
    }


@scenario
async def guardrails(kit: Kit) -> dict[str, Any]:
    @input_guardrail
    async def word_count(ctx: Any, agent: Any, input: Any) -> GuardrailFunctionOutput:
        text = input if isinstance(input, str) else json.dumps(input)
        return GuardrailFunctionOutput(
            output_info=InputCheck(words=len(text.split())),
            tripwire_triggered="forbidden" in text,
        )

    @input_guardrail
    async def unregistered(ctx: Any, agent: Any, input: Any) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(
            output_info=UnregisteredNote(note="seen"), tripwire_triggered=False
        )

    @output_guardrail
    async def summary_check(ctx: Any, agent: Any, output: CityAnswer) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(
            output_info=OutputCheck(
                length=len(output.summary), checked=dt.datetime(2024, 5, 1, 12, 1), tags={"ok"}
            ),
            tripwire_triggered=False,
        )

    @tool_input_guardrail
    def arguments_check(data: Any) -> ToolGuardrailFunctionOutput:
        count = len(json.loads(data.context.tool_arguments or "{}"))
        return ToolGuardrailFunctionOutput.allow(output_info=ToolCheck(arguments=count))

    @function_tool(tool_input_guardrails=[arguments_check])
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    def respond(call: Any) -> Any:
        found = outputs_of(call, "weather")
        if not found and "forbidden" not in user_text(call):
            return tool_calls(("weather", {"city": "Rome"}))
        summary = found[0] if found else "no"
        return message(json.dumps({"city": "Rome", "summary": summary}))

    live = {"word_count": word_count, "unregistered": unregistered, "summary_check": summary_check}
    agent = Agent(
        name="weather",
        tools=[weather],
        output_type=CityAnswer,
        input_guardrails=[word_count, unregistered],
        output_guardrails=[summary_check],
        model=policy_model(respond),
    )

    @kit.pipeline("guardrails")
    async def pipeline() -> dict[str, Any]:
        passed = await Runner.run(agent, "weather in Rome")
        tripped: Any = None
        try:
            await Runner.run(agent, "a forbidden question")
        except InputGuardrailTripwireTriggered as exc:
            value = exc.guardrail_result.output.output_info
            tripped = [type(value).__name__, repr(value), exc.guardrail_result.guardrail.get_name()]
        await kit.point("after_guardrails")
        return {
            "final_output": [type(passed.final_output).__name__, repr(passed.final_output)],
            "guardrails": _describe_guardrails(passed, live),
            "tripwire": tripped,
        }

    return {"result": await kit.call(pipeline)}


# -- structured outputs ---------------------------------------------------------------------------


class Forecast(BaseModel):
    city: str
    temp_c: int
    at: dt.datetime
    tags: set[str]


@scenario
async def structured_outputs(kit: Kit) -> dict[str, Any]:
    forecaster = Agent(
        name="forecaster",
        output_type=Forecast,
        model=policy_model(
            lambda c: message(
                json.dumps(
                    {"city": "Oslo", "temp_c": -3, "at": "2024-01-02T03:04:05", "tags": ["snow"]}
                )
            )
        ),
    )
    counter = Agent(
        name="counter",
        output_type=list[int],
        model=policy_model(lambda c: message(json.dumps({"response": [3, 1, 2]}))),
    )

    @kit.pipeline("structured-outputs")
    async def pipeline() -> dict[str, Any]:
        forecast = await Runner.run(forecaster, "forecast for Oslo")
        await kit.point("after_forecast")
        counts = await Runner.run(counter, f"count {forecast.final_output.city}")
        return {
            "values": [repr(forecast.final_output), repr(counts.final_output)],
            "types": [type(forecast.final_output).__name__, type(counts.final_output).__name__],
        }

    return {"result": await kit.call(pipeline)}


# -- tool_use_behavior variants -------------------------------------------------------------------


@scenario
async def tool_use_behavior(kit: Kit) -> dict[str, Any]:
    @function_tool
    def price(sku: str) -> int:
        """Price of an article in cents."""
        return 150 if sku == "A" else 275

    @function_tool
    def final_total(cents: int) -> str:
        """The final total, formatted."""
        return f"{cents / 100:.2f} EUR"

    def first_tool(call: Any) -> Any:
        return tool_calls(("price", {"sku": "A"}))

    def stop_at(call: Any) -> Any:
        if not outputs_of(call, "price"):
            return tool_calls(("price", {"sku": "B"}))
        return tool_calls(("final_total", {"cents": int(outputs_of(call, "price")[0])}))

    def totals(context: Any, results: list[Any]) -> ToolsToFinalOutputResult:
        return ToolsToFinalOutputResult(
            is_final_output=True, final_output={"sum": sum(int(r.output) for r in results)}
        )

    def both(call: Any) -> Any:
        return tool_calls(("price", {"sku": "A"}), ("price", {"sku": "B"}))

    agents = [
        Agent(
            name="first-tool",
            tools=[price],
            tool_use_behavior="stop_on_first_tool",
            model=policy_model(first_tool),
        ),
        Agent(
            name="stop-at",
            tools=[price, final_total],
            tool_use_behavior=StopAtTools(stop_at_tool_names=["final_total"]),
            model=policy_model(stop_at),
        ),
        Agent(
            name="custom",
            tools=[price],
            tool_use_behavior=totals,
            model=policy_model(both),
        ),
    ]

    @kit.pipeline("tool-use-behavior")
    async def pipeline() -> dict[str, Any]:
        outputs = []
        for agent in agents:
            result = await Runner.run(agent, "what does it cost?")
            outputs.append([type(result.final_output).__name__, result.final_output])
        await kit.point("after_runs")
        return {"outputs": outputs}

    return {
        "result": await kit.call(pipeline),
        "model_calls": sum(len(a.model.calls) for a in agents),  # type: ignore[union-attr]
    }


# -- dynamic instructions reading a context a tool changes ----------------------------------------


@dataclasses.dataclass
class Customer:
    name: str
    tier: str = "basic"


@scenario
async def dynamic_instructions(kit: Kit) -> dict[str, Any]:
    @function_tool
    async def upgrade(context: RunContextWrapper[Customer], tier: str) -> str:
        """Upgrade the customer."""
        context.context.tier = tier
        return f"upgraded to {tier}"

    async def instructions(context: RunContextWrapper[Customer], agent: Agent[Customer]) -> str:
        return f"Serve {context.context.name}, a {context.context.tier} customer."

    def respond(call: Any) -> Any:
        if "upgrade" in user_text(call) and not outputs_of(call, "upgrade"):
            return tool_calls(("upgrade", {"tier": "gold"}))
        return message(f"[{call.system_instructions}] {user_text(call)}")

    agent = Agent[Customer](
        name="concierge", instructions=instructions, tools=[upgrade], model=policy_model(respond)
    )

    @kit.pipeline("dynamic-instructions")
    async def pipeline() -> dict[str, Any]:
        customer = Customer(name="Ann")
        first = await Runner.run(agent, "please upgrade me", context=customer)
        await kit.point("after_upgrade")
        second = await Runner.run(agent, "what am I?", context=customer)
        return {"answers": [first.final_output, second.final_output], "tier": customer.tier}

    return {"result": await kit.call(pipeline)}


# -- lifecycle hooks ------------------------------------------------------------------------------


class RecordingRunHooks(RunHooks[Any]):
    def __init__(self, events: list[list[Any]]) -> None:
        self.events = events

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        self.events.append(["run.agent_start", agent.name, is_replaying()])

    async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
        self.events.append(["run.agent_end", agent.name, output, is_replaying()])

    async def on_handoff(self, context: Any, from_agent: Any, to_agent: Any) -> None:
        self.events.append(["run.handoff", from_agent.name, to_agent.name, is_replaying()])

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        self.events.append(["run.llm_end", agent.name, is_replaying()])

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        self.events.append(["run.tool_end", tool.name, is_replaying()])


class RecordingAgentHooks(AgentHooks[Any]):
    def __init__(self, events: list[list[Any]]) -> None:
        self.events = events

    async def on_start(self, context: Any, agent: Any) -> None:
        self.events.append(["agent.start", agent.name, is_replaying()])

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        usage = context.usage.total_tokens
        self.events.append(["agent.end", agent.name, output, usage, is_replaying()])

    async def on_handoff(self, context: Any, agent: Any, source: Any) -> None:
        self.events.append(["agent.handoff", agent.name, source.name, is_replaying()])


@scenario
async def hooks(kit: Kit) -> dict[str, Any]:
    events: list[list[Any]] = []

    @function_tool
    def book(seat: str) -> str:
        """Book a seat."""
        return f"booked {seat}"

    def seat(call: Any) -> Any:
        if not outputs_of(call, "book"):
            return tool_calls(("book", {"seat": "12A"}))
        return message("booked 12A")

    seat_agent = Agent(
        name="seat",
        tools=[book],
        hooks=RecordingAgentHooks(events),
        model=policy_model(seat),
    )
    triage = Agent(
        name="triage",
        handoffs=[seat_agent],
        hooks=RecordingAgentHooks(events),
        model=policy_model(lambda c: tool_calls(("transfer_to_seat", {}))),
    )

    @kit.pipeline("hooks")
    async def pipeline() -> str:
        result = await Runner.run(triage, "book 12A", hooks=RecordingRunHooks(events))
        await kit.point("after_run")
        return str(result.final_output)

    return {"result": await kit.call(pipeline), "events": events}


# -- sessions -------------------------------------------------------------------------------------


async def _session_scenario(kit: Kit, session: Any) -> dict[str, Any]:
    agent = Agent(
        name="rememberer",
        model=policy_model(lambda c: message("I have heard: " + " | ".join(user_texts(c)))),
    )

    @kit.pipeline(f"session-{type(session).__name__}")
    async def pipeline() -> dict[str, Any]:
        first = await Runner.run(agent, "my name is Ann", session=session)
        await kit.point("after_turn_1")
        second = await Runner.run(agent, "what is my name?", session=session)
        return {"answers": [first.final_output, second.final_output]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotDurableWarning)
        result = await kit.call(pipeline)
    items = await session.get_items()
    return {
        "result": result,
        "session_items": len(items),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, NotDurableWarning)],
    }


@scenario
async def session_file(kit: Kit) -> dict[str, Any]:
    return await _session_scenario(kit, SQLiteSession(kit.run_id, kit.directory / "conv.db"))


@scenario
async def session_sqlalchemy(kit: Kit) -> dict[str, Any]:
    url = async_url(kit.url)
    if url.startswith("sqlite"):
        url = f"sqlite+aiosqlite:///{kit.directory / 'sessions.db'}"
    session = SQLAlchemySession.from_url(kit.run_id, url=url, create_tables=True)
    try:
        return await _session_scenario(kit, session)
    finally:
        await session.engine.dispose()


@scenario
async def session_memory(kit: Kit) -> dict[str, Any]:
    return await _session_scenario(kit, SQLiteSession(kit.run_id))


# -- approvals by hand: to_state, a human's approve, Runner.run(agent, state) ---------------------


@scenario
async def approval(kit: Kit) -> dict[str, Any]:
    api = ExternalApi(kit.directory)

    def tenant_enabled(context: RunContextWrapper[dict[str, Any]], agent: Any) -> bool:
        return bool(context.context["tenant"] == "t1")  # a None context would raise here

    @function_tool(needs_approval=True, is_enabled=tenant_enabled)
    @durable_tool(side_effects=["payments"])
    async def charge(context: RunContextWrapper[dict[str, Any]], amount: int) -> str:
        """Charge the customer."""
        receipt = api.create(f"charge {amount}", idempotency_key())
        context.context["charged"] = amount
        return f"charged {amount} ({receipt})"

    def respond(call: Any) -> Any:
        done = outputs_of(call, "charge")
        if not done:
            return tool_calls(("charge", {"amount": 5}))
        return message(f"done: {done[0]}")

    def build_agent() -> Agent[dict[str, Any]]:
        return Agent(name="payer", tools=[charge], model=policy_model(respond))

    agent = build_agent()

    # The code drives RunState itself: the interrupted result is handed to it.
    @kit.pipeline("approval-request", approvals="return")
    async def request() -> str:
        result = await Runner.run(agent, "pay 5", context={"tenant": "t1"})
        return result.to_state().to_string()

    @kit.pipeline("approval-resume")
    async def resume(state_text: str) -> dict[str, Any]:
        state = await RunState.from_string(agent, state_text)
        state.approve(state.get_interruptions()[0])
        result = await Runner.run(agent, state)
        await kit.point("after_approved_run")
        return {
            "output": result.final_output,
            "context": result.context_wrapper.context,
            "state_context_is_result_context": result.context_wrapper.context
            is state._context.context,
        }

    state_text = await until_unlocked(lambda: request(run_id=f"{kit.run_id}-request"))
    result = await kit.call(resume, state_text)
    return {"result": result, "writes": api.write_rows(), "attempts": api.attempt_rows()}


# -- MCP over stdio -------------------------------------------------------------------------------


def _ledger_params(kit: Kit) -> dict[str, Any]:
    log = kit.directory / "ledger.log"
    return {"command": sys.executable, "args": [str(SUPPORT / "mcp_ledger_server.py"), str(log)]}


def _ledger(kit: Kit) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(kit.directory / "ledger.log")]


@scenario
async def mcp(kit: Kit) -> dict[str, Any]:
    stdio = MCPServerStdio(
        params=_ledger_params(kit),  # type: ignore[arg-type]
        name="ledger",
        cache_tools_list=True,
        client_session_timeout_seconds=30,
    )
    server = durable_mcp(stdio, side_effects=["ledger"], read_only={"lookup"}, idempotency="meta")

    async def respond(call: Any) -> Any:
        numbers = outputs_of(call, "issue_number")
        if not numbers:
            return tool_calls(("issue_number", {}), ("lookup", {"term": "durable"}))
        await kit.point("after_mcp_answer")
        return message(f"your number is {numbers[0]} ({outputs_of(call, 'lookup')[0]})")

    agent = Agent(name="clerk", mcp_servers=[server], model=policy_model(respond))

    @kit.pipeline("mcp")
    async def pipeline() -> str:
        result = await Runner.run(agent, "issue me a number")
        return str(result.final_output)

    async with server:
        output = await kit.call(pipeline)
    return {"result": output, "ledger": _ledger(kit)}


class PausingStdioServer(MCPServerStdio):
    """A stdio MCP server whose answers to one tool reach the caller only past a crash point:
    a crash there leaves the call in doubt (the server answered, nothing was checkpointed)."""

    def __init__(self, kit: Kit, tool: str, **options: Any) -> None:
        super().__init__(**options)
        self.kit = kit
        self.pausing_tool = tool

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> Any:
        result = await super().call_tool(tool_name, arguments, meta=meta)
        if tool_name == self.pausing_tool:
            await self.kit.point("in_call")
        return result


def _mcp_in_doubt(mode: str) -> Scenario:
    """A call of an MCP tool declared ``mode`` (keyed, unkeyed or read_only), in doubt."""
    tool, arguments = (
        ("lookup", {"term": "durable"}) if mode == "read_only" else ("issue_number", {})
    )

    async def run(kit: Kit) -> dict[str, Any]:
        stdio = PausingStdioServer(
            kit, tool, params=_ledger_params(kit), name="ledger", client_session_timeout_seconds=30
        )
        server = durable_mcp(
            stdio,
            side_effects=["ledger"],
            read_only={"lookup"},
            idempotency="meta" if mode == "keyed" else None,
        )

        def respond(call: Any) -> Any:
            done = outputs_of(call, tool)
            return message(f"got {done[0]}") if done else tool_calls((tool, arguments))

        agent = Agent(name="clerk", mcp_servers=[server], model=policy_model(respond))

        @kit.pipeline(f"mcp-{mode}")
        async def pipeline() -> str:
            result = await Runner.run(agent, "go")
            return str(result.final_output)

        output, parked = None, None
        async with server:
            try:
                output = await kit.call(pipeline)
            except StepNeedsReview as exc:
                parked = exc.step
        return {"result": output, "parked": parked, "ledger": _ledger(kit)}

    run.__name__ = run.__qualname__ = f"mcp_{mode}_in_doubt"
    return scenario(run)


mcp_keyed_in_doubt = _mcp_in_doubt("keyed")
mcp_unkeyed_in_doubt = _mcp_in_doubt("unkeyed")
mcp_read_only_in_doubt = _mcp_in_doubt("read_only")


# -- run_sync -------------------------------------------------------------------------------------


@scenario
async def run_sync(kit: Kit) -> dict[str, Any]:
    first = Agent(name="drafter", model=policy_model(lambda c: message(f"draft: {user_text(c)}")))
    second = Agent(name="editor", model=policy_model(lambda c: message(f"edited {user_text(c)}")))

    @kit.pipeline("run-sync")
    async def pipeline() -> str:
        draft = await asyncio.to_thread(Runner.run_sync, first, "a haiku")
        await kit.point("after_run_sync")
        edited = await asyncio.to_thread(Runner.run_sync, second, str(draft.final_output))
        return str(edited.final_output)

    return {
        "result": await kit.call(pipeline),
        "drafter_calls": len(first.model.calls),  # type: ignore[union-attr]
    }


# -- max_turns, raised and handled ----------------------------------------------------------------


@scenario
async def max_turns(kit: Kit) -> dict[str, Any]:
    @function_tool
    def poll(attempt: int) -> str:
        """Poll a job."""
        return f"still running ({attempt})"

    def loop(call: Any) -> Any:
        return tool_calls(("poll", {"attempt": len(outputs_of(call, "poll")) + 1}))

    looper = Agent(name="looper", tools=[poll], model=policy_model(loop))

    def give_up(data: Any) -> RunErrorHandlerResult:
        return RunErrorHandlerResult(final_output=f"gave up after {data.run_data.last_agent.name}")

    @kit.pipeline("max-turns")
    async def pipeline() -> dict[str, Any]:
        try:
            await Runner.run(looper, "wait for the job", max_turns=2)
            raised = None
        except MaxTurnsExceeded as exc:
            raised = str(exc)
        handled = await Runner.run(
            looper, "wait again", max_turns=2, error_handlers={"max_turns": give_up}
        )
        await kit.point("after_max_turns")
        return {"raised": raised, "handled": handled.final_output}

    return {
        "result": await kit.call(pipeline),
        "model_calls": len(looper.model.calls),  # type: ignore[union-attr]
    }


# -- jobs and the two children --------------------------------------------------------------------

#: (scenario, crash point) of every crash test.
JOBS: list[tuple[str, str]] = [
    ("customer_service", "after_turn_1"),
    ("customer_service", "after_turn_2"),
    ("customer_service", "after_turn_3"),
    ("customer_service", "in_write"),
    ("customer_service", "after_seat_tool"),
    ("handoffs", "after_handoff"),
    ("agents_as_tools", "after_tools"),
    ("guardrails", "after_guardrails"),
    ("structured_outputs", "after_forecast"),
    ("tool_use_behavior", "after_runs"),
    ("dynamic_instructions", "after_upgrade"),
    ("hooks", "after_run"),
    ("session_file", "after_turn_1"),
    ("session_sqlalchemy", "after_turn_1"),
    ("session_memory", "after_turn_1"),
    ("approval", "after_approved_run"),
    ("mcp", "after_mcp_answer"),
    ("mcp_keyed_in_doubt", "in_call"),
    ("mcp_unkeyed_in_doubt", "in_call"),
    ("mcp_read_only_in_doubt", "in_call"),
    ("run_sync", "after_run_sync"),
    ("max_turns", "after_max_turns"),
]


def job_key(name: str, crash_at: str) -> str:
    return f"{name}@{crash_at}"


def _kit(url: str, root: str, key: str, **fields: Any) -> Kit:
    directory = Path(root, key.replace("@", "-"))
    directory.mkdir(parents=True, exist_ok=True)
    run_id = "sdkfeat-" + re.sub(r"[^a-z0-9-]", "-", key.lower())
    return Kit(url=url, directory=directory, run_id=run_id, job=key, **fields)


async def crash_all(url: str, root: str) -> dict[str, Any]:
    """Start every job at once; die once each stopped at its crash point (or ended).

    What each job did before the kill goes to ``ROOT/crash-report.json``.
    """
    barrier = Barrier(len(JOBS))
    ended: dict[str, str] = {}

    async def run(name: str, crash_at: str) -> None:
        key = job_key(name, crash_at)
        try:
            await SCENARIOS[name](_kit(url, root, key, crash_at=crash_at, barrier=barrier))
            ended[key] = "ended without reaching its crash point"
        except BaseException:
            ended[key] = traceback.format_exc()[-3000:]
        barrier.done()

    tasks = [asyncio.create_task(run(name, crash_at)) for name, crash_at in JOBS]
    await asyncio.wait_for(barrier.all_stopped.wait(), timeout=240)
    report = {"arrived": sorted(barrier.arrived), "ended": ended}
    Path(root, "crash-report.json").write_text(json.dumps(report, default=repr))
    assert len(tasks) == len(JOBS)  # held until here: the loop keeps only weak references
    crash()
    raise AssertionError("unreachable")


async def resume_all(url: str, root: str) -> dict[str, Any]:
    """Resume every job's run, then run each scenario once crash-free for reference."""
    reports: dict[str, Any] = {"resumed": {}, "reference": {}}
    for name, crash_at in JOBS:
        key = job_key(name, crash_at)
        reports["resumed"][key] = await _report(SCENARIOS[name], _kit(url, root, key))
    for name in dict.fromkeys(name for name, _ in JOBS):
        key = job_key(name, "reference")
        reports["reference"][name] = await _report(SCENARIOS[name], _kit(url, root, key))
    return reports


async def _report(fn: Scenario, kit: Kit) -> dict[str, Any]:
    try:
        return {"outcome": "ok", **(await fn(kit))}
    except Exception as exc:
        return {"outcome": type(exc).__name__, "error": traceback.format_exc()[-3000:]}
