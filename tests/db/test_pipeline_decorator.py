"""``@checkpointed_pipeline`` through the public API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from agentkit_common import answers
from agentkit_common import close_engines as close_engines
from agents import Agent, Runner
from pydantic import BaseModel

from tidebase_agents import (
    NotInRun,
    StepInputMismatch,
    Tidebase,
    checkpointed_pipeline,
    current_run,
)


class Brief(BaseModel):
    topic: str
    words: int
    tags: list[str] = []


class Interrupted(Exception):
    """Raised by a pipeline body to end an attempt early (a crash without a process death)."""


def test_bare_decorator_names_the_pipeline_module_qualname() -> None:
    @checkpointed_pipeline
    async def summarize(text: str) -> str:
        return text

    assert summarize.name == (
        f"{__name__}:test_bare_decorator_names_the_pipeline_module_qualname.<locals>.summarize"
    )

    @checkpointed_pipeline(database_url="sqlite:///unused.db")
    async def named_by_default(text: str) -> str:
        return text

    assert named_by_default.name.endswith(":" + named_by_default.__qualname__)
    assert named_by_default.name.startswith(__name__ + ":")


def test_declaring_run_id_is_a_type_error_at_decoration() -> None:
    async def pipeline(topic: str, run_id: str) -> str:
        return topic

    with pytest.raises(TypeError, match="run_id"):
        checkpointed_pipeline("reserved")(pipeline)
    with pytest.raises(TypeError, match="run_id"):
        checkpointed_pipeline(pipeline)


async def test_current_run_outside_and_inside(db_url: str) -> None:
    with pytest.raises(NotInRun):
        current_run()
    seen: list[str] = []

    @checkpointed_pipeline("current-run", database_url=db_url)
    async def pipeline(x: int) -> int:
        seen.append(current_run().run_id)
        return x + 1

    assert await pipeline(1, run_id="run-current-1") == 2
    assert seen == ["run-current-1"]
    with pytest.raises(NotInRun):
        current_run()  # the context does not leak out of the pipeline


async def test_resume_reinvokes_with_the_recorded_arguments(db_url: str) -> None:
    calls: list[tuple[Brief, int, str]] = []

    @checkpointed_pipeline("resume-args", database_url=db_url)
    async def pipeline(brief: Brief, level: int, *, style: str = "plain") -> str:
        calls.append((brief, level, style))
        if len(calls) == 1:
            raise Interrupted
        return f"{brief.topic}/{brief.words}/{level}/{style}"

    brief = Brief(topic="durability", words=300, tags=["a", "b"])
    with pytest.raises(Interrupted):
        await pipeline(brief, 3, style="bold", run_id="run-resume-args")
    assert await pipeline.resume("run-resume-args") == "durability/300/3/bold"
    resumed_brief, level, style = calls[1]
    assert type(resumed_brief) is Brief  # restored typed, not a dict
    assert resumed_brief == brief
    assert (level, style) == (3, "bold")


async def test_completed_run_returns_recorded_result_without_calling_body(db_url: str) -> None:
    """R7: re-invoking a completed run never calls the body (nor the model)."""
    model = answers(lambda text: f"answer to {text}")
    agent = Agent(name="answerer", model=model)
    body_calls = 0

    @checkpointed_pipeline("completed-once", database_url=db_url)
    async def pipeline(question: str) -> dict[str, Any]:
        nonlocal body_calls
        body_calls += 1
        result = await Runner.run(agent, question)
        return {"answer": result.final_output, "nonce": uuid.uuid4().hex}

    first = await pipeline("why?", run_id="run-completed")
    again = await pipeline("why?", run_id="run-completed")
    resumed = await pipeline.resume("run-completed")
    assert first == again == resumed  # the recorded result, nonce included
    assert body_calls == 1
    assert len(model.calls) == 1


async def test_changed_prompt_or_instructions_raise_step_input_mismatch(db_url: str) -> None:
    """R2: a recorded agent step invoked with another prompt or other instructions is stale; the
    error names what changed, and nothing runs."""
    model = answers(lambda text: f"answer to {text}")
    agent = Agent(name="planner", instructions="Plan the work.", model=model)
    prompt = {"template": "Plan: {}"}
    attempts = 0

    @checkpointed_pipeline("mismatch", database_url=db_url)
    async def pipeline(topic: str) -> str:
        nonlocal attempts
        attempts += 1
        result = await Runner.run(agent, prompt["template"].format(topic))
        if attempts == 1:
            raise Interrupted
        return str(result.final_output)

    with pytest.raises(Interrupted):
        await pipeline("x", run_id="run-mismatch")
    assert len(model.calls) == 1

    prompt["template"] = "Make a plan for: {}"  # a code change between attempts
    with pytest.raises(StepInputMismatch) as exc:
        await pipeline("x", run_id="run-mismatch")
    assert exc.value.step == "agent:planner#1"
    assert exc.value.changed == ["input"]
    assert exc.value.recorded_hash != exc.value.new_hash
    assert len(model.calls) == 1  # raised before the model was called

    prompt["template"] = "Plan: {}"
    agent.instructions = "Plan the work carefully."
    with pytest.raises(StepInputMismatch) as exc:
        await pipeline("x", run_id="run-mismatch")
    assert exc.value.changed == ["instructions"]
    assert len(model.calls) == 1

    agent.instructions = "Plan the work."  # back to what was recorded: replays
    assert await pipeline("x", run_id="run-mismatch") == "answer to Plan: x"
    assert len(model.calls) == 1
    tide = Tidebase(db_url)
    (step,) = await tide.steps("run-mismatch")
    assert (step.name, step.status, step.attempts) == ("agent:planner#1", "completed", 1)


async def test_runner_outside_a_pipeline_is_the_plain_sdk(db_url: str) -> None:
    model = answers(lambda text: f"answer to {text}")
    agent = Agent(name="plain", model=model)

    @checkpointed_pipeline("outside-check", database_url=db_url)
    async def pipeline(q: str) -> str:
        return str((await Runner.run(agent, q)).final_output)

    # The interceptor is installed by the first pipeline run in this process.
    assert await pipeline("inside", run_id="run-inside") == "answer to inside"
    tide = Tidebase(db_url)
    runs_before = [r.run_id for r in await tide.store.list_runs()]
    steps_before = await tide.steps("run-inside")
    usage_before = await tide.store.get_usage("run-inside")

    plain_model = answers(lambda text: f"answer to {text}")
    reference = await Runner.run(Agent(name="plain", model=plain_model), "outside")
    result = await Runner.run(agent, "outside")
    assert result.final_output == reference.final_output == "answer to outside"
    assert result.to_input_list() == reference.to_input_list()
    assert len(model.calls) == 2  # called, not replayed
    result_again = await Runner.run(agent, "outside")
    assert result_again.final_output == "answer to outside"
    assert len(model.calls) == 3

    assert [r.run_id for r in await tide.store.list_runs()] == runs_before
    assert await tide.steps("run-inside") == steps_before
    assert await tide.store.get_usage("run-inside") == usage_before


def test_run_sync_outside_a_pipeline_is_the_plain_sdk(db_url: str) -> None:
    """``Runner.run_sync`` goes through the same hook; outside a pipeline it is untouched.
    (Inside an async pipeline it cannot be called at all: it needs no running event loop.)"""
    model = answers(lambda text: f"answer to {text}")
    agent = Agent(name="plain-sync", model=model)

    @checkpointed_pipeline("outside-sync", database_url=db_url)
    async def pipeline(q: str) -> str:
        return str((await Runner.run(agent, q)).final_output)

    async def in_pipeline() -> list[str]:
        tide = Tidebase(db_url)
        try:
            assert await pipeline("inside", run_id="run-sync-inside") == "answer to inside"
            return [s.name for s in await tide.steps("run-sync-inside")]
        finally:
            await tide.close()

    async def all_runs() -> list[str]:
        tide = Tidebase(db_url)
        try:
            return [r.run_id for r in await tide.store.list_runs()]
        finally:
            await tide.close()

    assert asyncio.run(in_pipeline()) == ["agent:plain-sync#1"]
    result = Runner.run_sync(agent, "outside")
    assert result.final_output == "answer to outside"
    assert len(model.calls) == 2
    assert asyncio.run(all_runs()) == ["run-sync-inside"]
