"""``@durable_tool`` under ``@function_tool``: schema transparency, behaviour outside a pipeline,
idempotency keys (I4), sync tools, in-process retries and failure classification (R3, R4)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Annotated, Any

import agentkit_schema_future as future_tools
import pytest
from agentkit_common import Interrupted, message, policy_model, tool_calls, tool_outputs, user_text
from agentkit_common import close_engines as close_engines
from agents import Agent, RunContextWrapper, Runner, function_tool
from agents.tool_context import ToolContext
from pydantic import BaseModel, Field

from tidebase_agents import (
    NotInRun,
    StepNeedsReview,
    Tidebase,
    checkpointed_pipeline,
    durable_tool,
    idempotency_key,
)

# -- schema transparency --------------------------------------------------------------------------


class Coordinates(BaseModel):
    lat: float
    lon: float


def forecast(city: str, days: int = 3, units: str = "metric") -> str:
    """Weather forecast.

    Args:
        city: City name.
        days: Days ahead.
        units: Unit system.
    """
    return city


async def locate(where: Coordinates, radius_km: float = 1.5, tags: list[str] | None = None) -> str:
    """Find places near a point.

    Args:
        where: The point.
        radius_km: Search radius.
        tags: Filter by tags.
    """
    return "here"


def bounded(n: Annotated[int, Field(ge=1, description="At least one.")], label: str) -> int:
    """Count to n."""
    return n


def undocumented(a: int, b: float, flag: bool = False) -> float:
    return a + b


def ctx_first(ctx: RunContextWrapper[Any], text: str) -> str:
    """Echo with the run context.

    Args:
        text: Text to echo.
    """
    return text


async def tool_ctx_first(ctx: ToolContext[Any], text: str, times: int = 1) -> str:
    """Echo with the tool context.

    Args:
        text: Text to echo.
        times: Repetitions.
    """
    return text * times


SCHEMA_CASES = [
    forecast,
    locate,
    bounded,
    undocumented,
    ctx_first,
    tool_ctx_first,
    *future_tools.FUNCTIONS,
]


@pytest.mark.parametrize(
    "fn", SCHEMA_CASES, ids=[f"{f.__module__.split('_')[-1]}-{f.__name__}" for f in SCHEMA_CASES]
)
@pytest.mark.parametrize("bare", [True, False], ids=["bare", "configured"])
def test_durable_tool_keeps_schema_name_and_description(fn: Any, bare: bool) -> None:
    decorate = durable_tool if bare else durable_tool(side_effects=["x"], retries=1)
    plain = function_tool(fn)
    durable = function_tool(decorate(fn))
    assert durable.name == plain.name == fn.__name__
    assert durable.description == plain.description
    assert durable.params_json_schema == plain.params_json_schema
    assert durable.strict_json_schema == plain.strict_json_schema
    assert "ctx" not in durable.params_json_schema.get("properties", {})


def test_durable_tool_rejects_what_it_cannot_wrap() -> None:
    with pytest.raises(TypeError, match="function_tool"):
        durable_tool(function_tool(forecast))  # wrong order


# -- outside a pipeline ---------------------------------------------------------------------------


async def test_durable_tool_outside_a_pipeline_runs_the_body_unchanged() -> None:
    seen: list[Any] = []

    @function_tool
    @durable_tool(side_effects=["mail"])
    async def send(to: str) -> str:
        try:
            idempotency_key()
        except NotInRun as exc:
            seen.append(exc)
        return f"sent to {to}"

    def respond(call: Any) -> Any:
        if not tool_outputs(call):
            return tool_calls(("send", {"to": "ann"}))
        return message("done: " + tool_outputs(call)[0])

    model = policy_model(respond)
    result = await Runner.run(Agent(name="mailer", model=model, tools=[send]), "mail ann")
    assert result.final_output == "done: sent to ann"
    assert len(seen) == 1 and "outside a durable tool call" in str(seen[0])

    # Called directly, too (a unit test of the tool function).
    @durable_tool
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5
    with pytest.raises(NotInRun):
        idempotency_key()


# -- inside a pipeline ----------------------------------------------------------------------------


def _one_call_agent(name: str, tool: Any, tool_name: str, args: dict[str, Any]) -> Agent[Any]:
    def respond(call: Any) -> Any:
        if not tool_outputs(call):
            return tool_calls((tool_name, args))
        return message(f"{name} got " + " ".join(tool_outputs(call)))

    return Agent(name=name, model=policy_model(respond), tools=[tool])


async def test_sync_durable_tool_runs_in_a_thread_with_its_idempotency_key(db_url: str) -> None:
    calls: list[tuple[str, bool]] = []

    @function_tool
    @durable_tool(side_effects=["ledger"])
    def book(amount: int) -> str:
        key = idempotency_key()
        calls.append((key, threading.current_thread() is threading.main_thread()))
        return f"booked {amount}"

    agent = _one_call_agent("booker", book, "book", {"amount": 5})
    attempts = 0

    @checkpointed_pipeline("sync-tool", database_url=db_url)
    async def pipeline() -> str:
        nonlocal attempts
        attempts += 1
        result = await Runner.run(agent, "book it")
        if attempts == 1:
            raise Interrupted
        return str(result.final_output)

    with pytest.raises(Interrupted):
        await pipeline(run_id="run-sync-tool")
    assert await pipeline(run_id="run-sync-tool") == "booker got booked 5"
    assert len(calls) == 1  # replayed on the second attempt
    key, on_main_thread = calls[0]
    assert not on_main_thread
    (tool_step,) = [s for s in await Tidebase(db_url).steps("run-sync-tool") if "/tool:" in s.name]
    assert tool_step.name.startswith("agent:booker#1/tool:book:")
    assert tool_step.idempotency_key == key
    assert tool_step.keyed  # the body read idempotency_key()
    assert tool_step.side_effects == ["ledger"]


async def test_idempotency_key_is_a_function_of_run_id_and_step_name(db_url: str) -> None:
    keys: list[str] = []

    @function_tool
    @durable_tool(side_effects=["x"])
    async def charge(amount: int) -> str:
        keys.append(idempotency_key())
        return "ok"

    @checkpointed_pipeline("keys", database_url=db_url)
    async def pipeline() -> str:
        agent = _one_call_agent("payer", charge, "charge", {"amount": 1})
        return str((await Runner.run(agent, "pay")).final_output)

    await pipeline(run_id="run-key-a")
    await pipeline(run_id="run-key-b")
    assert len(keys) == 2 and keys[0] != keys[1]  # another run: another key
    recorded = {
        run_id: [
            s.idempotency_key for s in await Tidebase(db_url).steps(run_id) if "/tool:" in s.name
        ]
        for run_id in ("run-key-a", "run-key-b")
    }
    assert recorded == {"run-key-a": [keys[0]], "run-key-b": [keys[1]]}


@dataclasses.dataclass
class Tenant:
    name: str


async def test_tool_with_a_context_parameter_gets_the_live_context(db_url: str) -> None:
    seen: list[tuple[str, str]] = []

    @function_tool
    @durable_tool
    async def whoami(ctx: ToolContext[Tenant], greeting: str) -> str:
        seen.append((ctx.context.name, ctx.tool_name))
        return f"{greeting} {ctx.context.name}"

    agent = _one_call_agent("greeter", whoami, "whoami", {"greeting": "hi"})

    @checkpointed_pipeline("ctx-tool", database_url=db_url)
    async def pipeline(tenant: str) -> str:
        return str((await Runner.run(agent, "who", context=Tenant(tenant))).final_output)

    assert await pipeline("acme", run_id="run-ctx") == "greeter got hi acme"
    assert seen == [("acme", "whoami")]


async def test_retries_retry_the_tool_in_process(db_url: str) -> None:
    tries: list[str] = []

    @function_tool
    @durable_tool(side_effects=["flaky-api"], retries=2)
    async def flaky(item: str) -> str:
        tries.append(idempotency_key())
        if len(tries) < 3:
            raise ConnectionError("flaky network")
        return f"stored {item}"

    agent = _one_call_agent("storer", flaky, "flaky", {"item": "x"})

    @checkpointed_pipeline("retries", tide=Tidebase(db_url, retry_backoff=0.001))
    async def pipeline() -> str:
        return str((await Runner.run(agent, "store")).final_output)

    assert await pipeline(run_id="run-retries") == "storer got stored x"
    assert len(tries) == 3 and len(set(tries)) == 1  # same key on every try
    (tool_step,) = [s for s in await Tidebase(db_url).steps("run-retries") if "/tool:" in s.name]
    assert (tool_step.status, tool_step.attempts) == ("completed", 3)


@pytest.mark.parametrize("surface", ["default", "raise"])
async def test_failing_unkeyed_side_effect_tool_parks_the_run_for_review(
    db_url: str, surface: str
) -> None:
    """R3/R4: an external write without a key that fails may or may not have happened: the run
    parks in manual_review, and re-invoking raises StepNeedsReview without calling the tool.
    ``surface``: the SDK's default tool error handling (the error becomes a message to the model)
    or ``failure_error_function=None`` (the error propagates)."""
    fired: list[str] = []

    def body(title: str) -> str:
        fired.append(title)
        raise ConnectionError("ticketing API timed out mid-request")

    if surface == "default":

        @function_tool
        @durable_tool(side_effects=["ticketing-api"])
        async def create_ticket(title: str) -> str:
            return body(title)

    else:

        @function_tool(failure_error_function=None)
        @durable_tool(side_effects=["ticketing-api"])
        async def create_ticket(title: str) -> str:
            return body(title)

    def respond(call: Any) -> Any:
        # A real model would call the tool again whenever it is re-run from the same input.
        if not tool_outputs(call):
            return tool_calls(("create_ticket", {"title": user_text(call)}))
        return message("ticket: " + tool_outputs(call)[0])

    agent = Agent(name="ticketer", model=policy_model(respond), tools=[create_ticket])

    @checkpointed_pipeline("review", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "printer broken")).final_output)

    with pytest.raises(Exception):  # noqa: B017 - the original failure, in whatever form
        await pipeline(run_id="run-review")
    assert fired == ["printer broken"]
    tide = Tidebase(db_url)
    (tool_step,) = [s for s in await tide.steps("run-review") if "/tool:" in s.name]
    assert tool_step.status == "manual_review"
    assert (await tide.get_run("run-review")).status == "manual_review"

    with pytest.raises(StepNeedsReview) as exc:
        await pipeline(run_id="run-review")
    assert exc.value.step == tool_step.name
    assert fired == ["printer broken"]  # the tool was not called again


async def test_failing_keyed_side_effect_tool_is_retried_with_the_same_key(db_url: str) -> None:
    """R3: a keyed external write that failed for good is failed_retryable: the next
    invocation executes it again, with the same idempotency key."""
    keys: list[str] = []

    @function_tool(failure_error_function=None)
    @durable_tool(side_effects=["ticketing-api"])
    async def create_ticket(title: str) -> str:
        keys.append(idempotency_key())
        if len(keys) == 1:
            raise ConnectionError("ticketing API down")
        return "T-1"

    agent = _one_call_agent("ticketer", create_ticket, "create_ticket", {"title": "t"})

    @checkpointed_pipeline("keyed-retry", database_url=db_url)
    async def pipeline() -> str:
        return str((await Runner.run(agent, "open")).final_output)

    with pytest.raises(Exception):  # noqa: B017
        await pipeline(run_id="run-keyed-retry")
    (tool_step,) = [
        s for s in await Tidebase(db_url).steps("run-keyed-retry") if "/tool:" in s.name
    ]
    assert tool_step.status == "failed_retryable"
    assert await pipeline(run_id="run-keyed-retry") == "ticketer got T-1"
    assert len(keys) == 2 and keys[0] == keys[1]
