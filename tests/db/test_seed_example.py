"""The seed document's example runs with only its import line changed.

``SEED`` below is the code of "How to checkpoint OpenAI Agents SDK runs" verbatim, except
``from tidebase.aio import AsyncTidebase`` became ``from tidebase_agents import AsyncTidebase``.
It is executed as written (its last line with top-level await); the only test setup is giving
the seed's two agents offline ``ScriptedModel`` models (``Agent.clone(model=...)``) and pointing
``AsyncTidebase()`` at the test database through TIDEBASE_DATABASE_URL.
"""

from __future__ import annotations

import ast
from typing import Any

import pytest
from agents import Agent
from agents.testing import ScriptedModel, assistant_message

SEED = """\
from agents import Agent, Runner, function_tool
from tidebase_agents import AsyncTidebase

tide = AsyncTidebase()  # reads TIDEBASE_URL, default http://localhost:7373

researcher = Agent(
    name="researcher",
    instructions="Research the topic and return key findings.",
)
writer = Agent(
    name="writer",
    instructions="Turn findings into a short publishable post.",
)

async def pipeline(run, input):
    findings = await run.step(
        "research",
        lambda: Runner.run(researcher, f"Research: {input['topic']}"),
        input={"topic": input["topic"]},
    )

    draft = await run.step(
        "draft",
        lambda: Runner.run(writer, f"Write a post from:\\n{findings.final_output}"),
        input={"findings": findings.final_output},
    )

    await run.state_set({"phase": "done"})
    return draft.final_output

result = await tide.run("research-pipeline", pipeline, run_id=run_id, input={"topic": topic})
"""

SEED_MODULE, _, SEED_CALL = SEED.rstrip("\n").rpartition("\n")
FINDINGS = "Findings: checkpoints make agent pipelines resumable."
POST = "Durable agents: a short post."


def _versions(versions: list[Any]) -> list[tuple[int, Any]]:
    return [(v.version, v.value) for v in versions]


class Seed:
    """One "process" worth of the seed: its module executed in a fresh namespace."""

    def __init__(self, researcher_script: list[Any], writer_script: list[Any]) -> None:
        self.ns: dict[str, Any] = {"__name__": "seed_example"}
        exec(compile(SEED_MODULE, "<seed>", "exec"), self.ns)
        # Test setup: the seed's agents, unchanged but for an offline scripted model.
        self.researcher_model = ScriptedModel(researcher_script)
        self.writer_model = ScriptedModel(writer_script)
        self.ns["researcher"] = self.ns["researcher"].clone(model=self.researcher_model)
        self.ns["writer"] = self.ns["writer"].clone(model=self.writer_model)

    async def invoke(self, run_id: str, topic: str) -> Any:
        self.ns.update(run_id=run_id, topic=topic)
        code = compile(SEED_CALL, "<seed>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            await eval(code, self.ns)
        finally:
            await self.ns["tide"].close()
        return self.ns["result"]


@pytest.fixture
def seed_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TIDEBASE_DATABASE_URL", db_url)
    return db_url


def test_seed_code_is_the_documented_example() -> None:
    assert SEED_MODULE.splitlines()[1] == "from tidebase_agents import AsyncTidebase"
    assert isinstance(Seed([], []).ns["researcher"], Agent)
    assert SEED_CALL.startswith("result = await tide.run(")


async def test_seed_example_runs_end_to_end_and_replays_when_reinvoked(seed_db: str) -> None:
    """The seed runs as written; re-invoking the completed run (fresh agents whose models have
    no script at all) returns the same result without calling any model (R7)."""
    first = Seed([[assistant_message(FINDINGS)]], [[assistant_message(POST)]])
    assert await first.invoke("seed-1", "durable agents") == POST
    assert len(first.researcher_model.calls) == 1
    assert len(first.writer_model.calls) == 1
    assert FINDINGS in str(first.writer_model.calls[0].input)

    from tidebase_agents import Tidebase

    tide = Tidebase(seed_db)
    try:
        run = await tide.get_run("seed-1")
        assert run.status == "completed"
        assert run.input == {"topic": "durable agents"}
        steps = {s.name: s for s in await tide.steps("seed-1")}
        assert {"research", "draft"} <= set(steps)
        assert all(s.status == "completed" for s in steps.values())
        assert _versions(await tide.state_versions("seed-1")) == [(1, {"phase": "done"})]
    finally:
        await tide.close()

    again = Seed([], [])
    assert await again.invoke("seed-1", "durable agents") == POST
    assert again.researcher_model.calls == ()
    assert again.writer_model.calls == ()


async def test_seed_example_resumes_after_a_failure_without_rerunning_research(
    seed_db: str,
) -> None:
    """A failure in the second step (the writer's model raises) then a re-invocation in a
    fresh setup: the researcher's model is never called again (R1: the replayed Runner.run
    hands back the recorded result, so "draft" sees the same findings), the writer's is."""
    crashed = Seed([[assistant_message(FINDINGS)]], [RuntimeError("model outage")])
    with pytest.raises(RuntimeError, match="model outage"):
        await crashed.invoke("seed-2", "durable agents")
    assert len(crashed.researcher_model.calls) == 1

    resumed = Seed([], [[assistant_message(POST)]])
    assert await resumed.invoke("seed-2", "durable agents") == POST
    assert resumed.researcher_model.calls == (), "research ran (and billed) again"
    assert len(resumed.writer_model.calls) == 1
    assert FINDINGS in str(resumed.writer_model.calls[0].input)

    from tidebase_agents import Tidebase

    tide = Tidebase(seed_db)
    try:
        assert (await tide.get_run("seed-2")).status == "completed"
        assert _versions(await tide.state_versions("seed-2")) == [(1, {"phase": "done"})]
    finally:
        await tide.close()
