"""An application written from the README's examples, for the type checkers
(``tests/unit/test_typing.py`` runs ``mypy --strict`` and pyright in strict mode on it).

It is checked, never run: ``ticket_api`` stands for the application's own client.
"""

from __future__ import annotations

import datetime as dt

from agents import Agent, Runner, function_tool
from sqlalchemy.ext.asyncio import create_async_engine

from tidebase_agents import (
    AsyncTidebase,
    Run,
    RunRecord,
    StepRecord,
    Tidebase,
    WorkerOptions,
    checkpointed_pipeline,
    current_run,
    durable_tool,
    idempotency_key,
    run_worker,
)


class TicketApi:
    async def create(self, title: str, body: str, *, idempotency_key: str) -> str:
        return f"{title}:{idempotency_key}"


ticket_api = TicketApi()


@function_tool
@durable_tool(side_effects=["ticketing-api"])
async def create_ticket(title: str, body: str) -> str:
    """Open a ticket."""
    return await ticket_api.create(title, body, idempotency_key=idempotency_key())


researcher = Agent(name="researcher", instructions="Research the topic.", tools=[create_ticket])
writer = Agent(name="writer", instructions="Turn findings into a short post.")


@checkpointed_pipeline("research-pipeline")
async def research(topic: str) -> str:
    findings = await Runner.run(researcher, f"Research: {topic}")  # a checkpoint
    draft = await Runner.run(writer, f"Write a post from:\n{findings.final_output}")
    return draft.final_output_as(str)


async def decorated() -> list[str]:
    new = await research("durable agents")  # a new run
    again = await research.with_run_id("run-42")("durable agents")  # create or resume run-42
    resumed = await research.resume("run-42")  # re-invoke with the recorded arguments
    return [new, again, resumed]


async def explicit(run_id: str, topic: str) -> str:
    tide = AsyncTidebase()

    async def pipeline(run: Run, input: dict[str, str]) -> str:
        findings = await run.step(
            "research",
            lambda: Runner.run(researcher, f"Research: {input['topic']}"),
            input={"topic": input["topic"]},
        )
        await run.state_set({"phase": "done"})
        return findings.final_output_as(str)

    result = await tide.run("research-pipeline", pipeline, run_id=run_id, input={"topic": topic})
    return result


async def explicit_steps_return_their_values() -> int:
    async def pipeline(run: Run, input: None) -> int:
        plain: int = await run.step("count", lambda: 3)
        awaited: str = await run.step(
            "fetch", lambda: ticket_api.create("t", "b", idempotency_key="k")
        )
        version: int = await current_run().state_patch({"count": plain})
        return plain + len(awaited) + version

    return await Tidebase().run("steps", pipeline, run_id="steps-1")


async def workers() -> list[str]:
    first = await research.enqueue("durable agents")  # the default queue and options
    second = await research.enqueue_with(
        queue="default",
        dedupe_key="topic:durable",
        max_attempts=5,
        delay=0,
        deadline=None,
        priority=0,
    )("durable agents")
    await run_worker("myapp.pipelines:research", concurrency=8)
    await run_worker(research, WorkerOptions.from_env(concurrency=8))
    return [first, second]


async def reading(run_id: str) -> tuple[RunRecord, list[StepRecord], list[RunRecord]]:
    tide = Tidebase(
        engine=create_async_engine("postgresql+psycopg://app@db/app"), schema="tidebase"
    )
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    runs = await tide.list_runs(
        status=["failed", "manual_review"], pipeline="research-pipeline", since=since
    )
    report = await tide.usage(by=["pipeline", "model"], since=since)
    print(report[0]["cost_usd"])
    return await tide.get_run(run_id), await tide.steps(run_id), runs
