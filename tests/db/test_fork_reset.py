"""Fork and reset (P5): an operator re-runs a run from a chosen step, on purpose.

Every test runs on embedded SQLite and on PostgreSQL. Step functions count their calls, so
"replayed" and "re-executed" are asserted, never assumed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tidebase_agents import (
    RunCancelled,
    RunConflict,
    RunLocked,
    RunNotFound,
    RunStatus,
    StepInputMismatch,
    StepNotFound,
    Tidebase,
    checkpointed_pipeline,
    current_run,
)
from tidebase_agents._store import get_store


class Interrupt(Exception):
    """Ends an invocation early (stands in for a crash after its steps)."""


@pytest.fixture
async def tide(db_url: str) -> AsyncIterator[Tidebase]:
    t = Tidebase(db_url, retry_backoff=0.001)
    yield t
    await t.close()


class Script:
    """A three-step pipeline ``a -> b -> c`` that counts the calls of each step. ``prompt`` is
    step b's input; ``stop_at`` makes that step raise ``Interrupt`` once; state and usage are
    recorded between the steps."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.prompt = "v1"
        self.stop_at: str | None = None

    def fn(self, name: str, value: str) -> Any:
        def call() -> str:
            self.calls[name] += 1
            if self.stop_at == name:
                self.stop_at = None
                raise Interrupt(name)
            return f"{value}:{self.calls[name]}"

        return call

    async def body(self, run: Any, topic: str) -> str:
        a = await run.step("a", self.fn("a", topic))
        await run.state_set({"after": "a"})
        b = await run.step("b", self.fn("b", a), input=self.prompt)
        await run.state_set({"after": "b", "b": b})
        await run.usage_record(model="m", input_tokens=10, output_tokens=5)
        c = await run.step("c", self.fn("c", b))
        return f"{c}"

    async def run(self, tide: Tidebase, run_id: str) -> str:
        return await tide.run("fork-reset", self.body, run_id=run_id, input="t")


async def names(tide: Tidebase, run_id: str) -> list[str]:
    return [s.name for s in await tide.steps(run_id)]


async def test_fork_from_a_middle_step_replays_before_it_and_executes_from_it(
    tide: Tidebase,
) -> None:
    script = Script()
    assert await script.run(tide, "src") == "t:1:1:1"
    source_steps = await tide.steps("src")

    new = await tide.fork("src", from_step="b", new_run_id="src-fork")
    assert new == "src-fork"
    forked = await tide.get_run(new)
    assert forked.status == RunStatus.FAILED_RETRYABLE  # waits to be invoked
    assert (forked.pipeline, forked.input_hash) == (
        "fork-reset",
        (await tide.get_run("src")).input_hash,
    )
    assert await names(tide, new) == ["a"]
    assert [(v.version, v.value) for v in await tide.state_versions(new)] == [(1, {"after": "a"})]
    assert await tide.usage_records(new) == []  # the fork did not spend the source's tokens

    assert await script.run(tide, new) == "t:1:2:2"
    assert script.calls == {"a": 1, "b": 2, "c": 2}
    assert await names(tide, new) == ["a", "b", "c"]
    assert [v.value for v in await tide.state_versions(new)] == [
        {"after": "a"},
        {"after": "b", "b": "t:1:2"},
    ]
    assert len(await tide.usage_records(new)) == 1

    # The source is untouched, and both logs record the lineage.
    assert await tide.steps("src") == source_steps
    assert (await tide.get_run("src")).status == RunStatus.COMPLETED
    first = (await tide.events(new))[0]
    assert (first.seq, first.kind, first.step) == (1, "run_forked", "b")
    assert first.data["from_run"] == "src" and first.data["steps_copied"] == 1
    last = (await tide.events("src"))[-1]
    assert (last.kind, last.step, last.data["fork"]) == ("run_fork_created", "b", new)


async def test_fork_without_a_step_goes_on_from_the_first_step_that_did_not_complete(
    tide: Tidebase,
) -> None:
    script = Script()
    script.stop_at = "b"
    with pytest.raises(Interrupt):
        await script.run(tide, "half")
    assert await names(tide, "half") == ["a", "b"]  # b failed_retryable

    new = await tide.fork("half")
    assert new != "half"
    assert await names(tide, new) == ["a"]
    assert (await tide.events(new))[0].step == "b"
    assert await script.run(tide, new) == "t:1:2:1"
    assert script.calls == {"a": 1, "b": 2, "c": 1}

    # A completed run is copied whole: its fork replays every step.
    whole = await tide.fork(new)
    assert await names(tide, whole) == ["a", "b", "c"]
    assert (await tide.events(whole))[0].step is None
    assert await script.run(tide, whole) == "t:1:2:1"
    assert script.calls == {"a": 1, "b": 2, "c": 1}


async def test_reset_after_a_prompt_change_reruns_that_step_and_the_later_ones(
    db_url: str,
) -> None:
    script = Script()
    tide = Tidebase(db_url)

    @checkpointed_pipeline("reset-pipeline", tide=tide)
    async def pipeline(topic: str) -> str:
        return await script.body(current_run(), topic)

    script.stop_at = "c"
    with pytest.raises(Interrupt):
        await pipeline("t", run_id="r1")
    script.prompt = "v2"  # the operator changed step b's prompt
    with pytest.raises(StepInputMismatch) as mismatch:
        await pipeline.resume("r1")
    message = str(mismatch.value)
    assert "tidebase-agents steps reset r1 b" in message
    assert "tidebase-agents runs fork r1 --from b" in message
    assert "steps review" not in message
    assert script.calls == {"a": 1, "b": 1, "c": 1}

    reset = await pipeline.reset_step("r1", "b")
    assert reset.discarded == ["b", "c"]
    assert (reset.state_versions_discarded, reset.usage_superseded) == (1, 1)
    assert reset.status == RunStatus.FAILED_RETRYABLE
    assert await names(tide, "r1") == ["a"]

    assert await pipeline.resume("r1") == "t:1:2:2"
    assert script.calls == {"a": 1, "b": 2, "c": 2}
    assert [v.value for v in await tide.state_versions("r1")] == [
        {"after": "a"},
        {"after": "b", "b": "t:1:2"},
    ]
    # The first execution's usage stays in the ledger, set aside as lost; the re-run's counts.
    usage = await tide.usage_records("r1")
    assert sorted((u.lost, u.dedupe_key.startswith("usage#1")) for u in usage) == [
        (False, True),
        (True, True),
    ]
    assert [e.kind for e in await tide.events("r1")].count("steps_reset") == 1
    await tide.close()


async def test_reset_makes_a_completed_run_run_again_from_the_step(tide: Tidebase) -> None:
    script = Script()
    assert await script.run(tide, "done") == "t:1:1:1"
    reset = await tide.reset_step("done", "c")
    assert (reset.discarded, reset.status) == (["c"], RunStatus.FAILED_RETRYABLE)
    run = await tide.get_run("done")
    assert (run.output, run.finished_at) == (None, None)
    # Usage recorded before c started is kept as it was.
    assert [u.lost for u in await tide.usage_records("done")] == [False]
    assert await script.run(tide, "done") == "t:1:1:2"
    assert script.calls == {"a": 1, "b": 1, "c": 2}
    assert (await tide.get_run("done")).status == RunStatus.COMPLETED

    # Resetting the first step re-runs everything, and drops every state version.
    reset = await tide.reset_step("done", "a")
    assert (reset.discarded, reset.state_versions_discarded) == (["a", "b", "c"], 2)
    assert await tide.state_versions("done") == []
    assert await script.run(tide, "done") == "t:2:2:3"


async def test_nested_steps_are_discarded_with_their_step_and_enclosing_steps(
    tide: Tidebase,
) -> None:
    calls: collections.Counter[str] = collections.Counter()

    def count(name: str) -> Any:
        def call() -> str:
            calls[name] += 1
            return name

        return call

    async def body(run: Any, _: None) -> str:
        async def outer() -> str:
            first = await run.step("in1", count("in1"))
            second = await run.step("in2", count("in2"))
            return f"{first}+{second}"

        # A step with side effects writes its record first: it precedes its nested steps.
        out = await run.step("outer", outer, side_effects=["api"], idempotency_key="k")
        return str(await run.step("after", count("after"))) + out

    await tide.run("nested", body, run_id="n1")
    assert await names(tide, "n1") == ["outer", "outer/in1", "outer/in2", "after"]
    reset = await tide.reset_step("n1", "outer/in2")
    # The step enclosing it re-runs too (else it would replay and hide the reset).
    assert reset.discarded == ["outer", "outer/in2", "after"]
    await tide.run("nested", body, run_id="n1")
    assert calls == {"in1": 1, "in2": 2, "after": 2}

    new = await tide.fork("n1", from_step="outer")
    assert await names(tide, new) == []  # outer's subtree and all after it


async def test_fork_and_reset_are_refused_while_the_run_executes(tide: Tidebase) -> None:
    inside, release = asyncio.Event(), asyncio.Event()

    async def body(run: Any, _: None) -> str:
        await run.step("first", lambda: 1)

        async def wait() -> int:
            inside.set()
            await release.wait()
            return 2

        await run.step("second", wait)
        return "done"

    task = asyncio.create_task(tide.run("held", body, run_id="live"))
    await asyncio.wait_for(inside.wait(), 30)
    with pytest.raises(RunLocked, match="live"):
        await tide.reset_step("live", "first")
    with pytest.raises(RunLocked):
        await tide.fork("live", from_step="first", new_run_id="live-fork")
    release.set()
    assert await task == "done"
    assert await names(tide, "live") == ["first", "second"]
    with pytest.raises(RunNotFound):
        await tide.get_run("live-fork")


async def test_unknown_runs_steps_taken_ids_and_cancelled_runs(tide: Tidebase) -> None:
    script = Script()
    await script.run(tide, "known")
    with pytest.raises(RunNotFound):
        await tide.reset_step("nope", "a")
    with pytest.raises(RunNotFound):
        await tide.fork("nope")
    with pytest.raises(StepNotFound, match="runs show known"):
        await tide.reset_step("known", "zzz")
    with pytest.raises(StepNotFound):
        await tide.fork("known", from_step="zzz")
    with pytest.raises(RunConflict):
        await tide.fork("known", new_run_id="known")
    assert await names(tide, "known") == ["a", "b", "c"]  # nothing changed

    script.stop_at = "c"
    with pytest.raises(Interrupt):
        await script.run(tide, "stopped")
    assert await tide.cancel("stopped") == RunStatus.CANCELLED
    with pytest.raises(RunCancelled):
        await tide.reset_step("stopped", "b")
    # A cancelled run stays cancelled; a fork of it re-runs it under a new id.
    new = await tide.fork("stopped", from_step="c")
    assert await script.run(tide, new) == "t:2:2:3"
    assert (await tide.get_run("stopped")).status == RunStatus.CANCELLED


async def test_a_queued_run_is_forked_onto_its_queue_and_a_worker_replays_it(
    tide: Tidebase,
) -> None:
    doubled: list[int] = []

    @checkpointed_pipeline("fork-queued", tide=tide)
    async def queued(x: int) -> int:
        return int(await current_run().step("double", lambda: doubled.append(x) or x * 2))

    store = get_store(tide.database_url)

    async def work_one() -> int:
        (claim,) = await store.claim(
            owner="w", lease_seconds=30, queues=["slow"], pipelines=["fork-queued"]
        )
        return await queued.run_claimed(claim.run_id, owner="w", claim_token=claim.token)

    source = await queued.enqueue_with(queue="slow", priority=3, max_attempts=2)(7)
    assert await work_one() == 14
    new = await queued.fork(source)
    run = await tide.get_run(new)
    assert (run.status, run.queue, run.priority, run.max_attempts) == (
        RunStatus.QUEUED,
        "slow",
        3,
        2,
    )
    assert await work_one() == 14  # the fork's step replays: the body ran, the step did not
    assert doubled == [7]
    assert (await tide.get_run(new)).status == RunStatus.COMPLETED
    with pytest.raises(RunNotFound):
        await queued.fork("not-a-run")


async def test_reset_of_an_agent_step_after_a_prompt_change_asks_its_model_again(
    db_url: str,
) -> None:
    from agentkit_common import message, policy_model, tool_calls, tool_outputs, user_text
    from agents import Agent, Runner, function_tool

    class Abort(BaseException):
        """Cuts an attempt short inside a tool, past the SDK's error handling (a crash)."""

    abort = [True]

    @function_tool
    def look(topic: str) -> str:
        """Look a topic up."""
        if abort:
            abort.clear()
            raise Abort
        return f"facts on {topic}"

    researcher_model = policy_model(lambda call: message(f"notes: {user_text(call)}"))
    researcher = Agent(name="researcher", model=researcher_model)

    def write(call: Any) -> Any:
        if not tool_outputs(call):
            return tool_calls(("look", {"topic": "tides"}))
        return message(f"post from {tool_outputs(call)[0]}")

    writer_model = policy_model(write)
    writer = Agent(name="writer", instructions="v1", model=writer_model, tools=[look])

    @checkpointed_pipeline("reset-agents", database_url=db_url)
    async def pipeline(topic: str) -> str:
        notes = await Runner.run(researcher, topic)
        return str((await Runner.run(writer, str(notes.final_output))).final_output)

    with pytest.raises(Abort):
        await pipeline("tides", run_id="ra")
    tide = Tidebase(db_url)
    # The writer's first turn (it called the tool) is journaled; its agent step is not done.
    assert await names(tide, "ra") == ["agent:researcher#1", "agent:writer#1/model#1"]
    writer.instructions = "v2"
    with pytest.raises(StepInputMismatch) as mismatch:
        await pipeline.resume("ra")
    # Quoted for the shell ('#' would start a comment after a space).
    assert "steps reset ra 'agent:writer#1/model#1'`" in str(mismatch.value)

    reset = await tide.reset_step("ra", "agent:writer#1/model#1")
    assert reset.discarded == ["agent:writer#1/model#1"]
    assert reset.usage_superseded == 1
    assert await pipeline.resume("ra") == "post from facts on tides"
    assert (len(researcher_model.calls), len(writer_model.calls)) == (1, 3)
    usage = await tide.usage_records("ra")
    assert sorted((u.step, u.lost) for u in usage) == [
        ("agent:researcher#1/model#1", False),
        ("agent:writer#1/model#1", False),
        ("agent:writer#1/model#1", True),
        ("agent:writer#1/model#2", False),
    ]

    # Resetting the completed researcher step re-runs both agents; its usage is set aside.
    reset = await tide.reset_step("ra", "agent:researcher#1")
    assert reset.discarded == ["agent:researcher#1", "agent:writer#1"]
    assert await pipeline.resume("ra") == "post from facts on tides"
    assert (len(researcher_model.calls), len(writer_model.calls)) == (2, 5)
    lost = [u.step for u in await tide.usage_records("ra") if u.lost]
    assert sorted(lost) == [
        "agent:researcher#1/model#1",
        "agent:writer#1/model#1",
        "agent:writer#1/model#1",
        "agent:writer#1/model#2",
    ]
    await tide.close()


async def test_a_reset_racing_a_resume_never_leaves_a_half_reset_run(tide: Tidebase) -> None:
    """Whichever comes first, the run ends consistent: completed with every step (the reset
    came first, or was refused), or reset to its first step (it came after the resume)."""
    outcomes: collections.Counter[str] = collections.Counter()
    for trial in range(12):
        script = Script()
        script.stop_at = "c"
        run_id = f"race-{trial}"
        with pytest.raises(Interrupt):
            await script.run(tide, run_id)
        reset, resumed = await asyncio.gather(
            tide.reset_step(run_id, "b"), script.run(tide, run_id), return_exceptions=True
        )
        assert not isinstance(resumed, BaseException), resumed
        run = await tide.get_run(run_id)
        if isinstance(reset, RunLocked):
            outcome = "refused"
        else:
            assert not isinstance(reset, BaseException), reset
            outcome = "before" if run.status == RunStatus.COMPLETED else "after"
        outcomes[outcome] += 1
        if outcome == "after":
            assert run.status == RunStatus.FAILED_RETRYABLE
            assert await names(tide, run_id) == ["a"]
        else:
            assert run.status == RunStatus.COMPLETED
            assert await names(tide, run_id) == ["a", "b", "c"]
            assert script.calls["b"] == (2 if outcome == "before" else 1)
    print("outcomes:", dict(outcomes))
