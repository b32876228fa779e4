"""Crash recovery of agent pipelines: a real child process dies (``os._exit``) at a chosen point
and the run is resumed in another process (a second child, or this test process).

What each test guards against: re-running and re-billing a finished agent, firing a
side-effecting tool twice, losing a finished step, or answering with a stale result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import agentkit_fanout as fanout
import pytest
from agentkit_common import (
    CHILD_CODE,
    ExternalApi,
    assert_crashed,
    report_of,
    until_unlocked,
    user_text,
)
from agentkit_common import close_engines as close_engines
from agentkit_research import build
from harness import run_child

from tidebase_agents import StepNeedsReview, Tidebase

pytestmark = pytest.mark.crash

TOPIC = "durable agents"
TOOL_STEP = re.compile(r"^agent:researcher#1/tool:create_ticket:[0-9a-f]{12}#1$")


def child(target: str, **kwargs: Any) -> Any:
    return run_child(CHILD_CODE, target, json.dumps(kwargs))


def ext_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


async def reference_output(db_url: str, tmp_path: Path, tool: str = "key_read") -> str:
    """The answer of a crash-free run of the same pipeline (own run id, own external API)."""
    kit = build(db_url, str(ext_dir(tmp_path, "reference")), tool=tool, lease_seconds=None)
    output: str = await kit.pipeline(TOPIC, run_id=f"reference-{tool}")
    assert output.startswith("POST: Write a post from:\nfindings on durable agents (ticket T-1)")
    return output


async def test_crash_after_first_agent_resumes_in_a_new_process(
    db_url: str, tmp_path: Path
) -> None:
    run_id = "research-after-first-agent"
    d = ext_dir(tmp_path, "ext")
    first = child(
        "agentkit_research:child",
        url=db_url,
        directory=str(d),
        run_id=run_id,
        crash_at="after_researcher",
    )
    assert_crashed(first)
    assert len(ExternalApi(d).write_rows()) == 1

    second = report_of(
        child("agentkit_research:child", url=db_url, directory=str(d), run_id=run_id, resume=True)
    )
    assert second["outcome"] == "ok", second
    assert second["researcher_calls"] == 0  # finished agent: replayed, never re-billed
    assert second["writer_calls"] == 1
    assert second["seen_keys"] == []  # the tool did not run again
    assert second["output"] == await reference_output(db_url, tmp_path)

    api = ExternalApi(d)
    assert len(api.attempt_rows()) == 1
    assert len(api.write_rows()) == 1

    tide = Tidebase(db_url)
    steps = {s.name: s for s in await tide.steps(run_id)}
    assert len(steps) == 3
    assert {"agent:researcher#1", "agent:writer#1"} <= steps.keys()
    (tool_step,) = [name for name in steps if name.startswith("agent:researcher#1/")]
    assert TOOL_STEP.match(tool_step)
    assert all(s.status == "completed" for s in steps.values())
    assert steps["agent:researcher#1"].attempts == 1
    assert (await tide.get_run(run_id)).status == "completed"

    rows = await tide.store.get_usage(run_id)
    # One row per model call (T1), under its turn.
    assert sorted((r.step, r.requests, r.total_tokens) for r in rows) == [
        ("agent:researcher#1/model#1", 1, 15),
        ("agent:researcher#1/model#2", 1, 28),
        ("agent:writer#1/model#1", 1, 39),
    ]


@pytest.mark.parametrize("tool", ["key_read", "key_fn"])
async def test_crash_inside_keyed_tool_reexecutes_once_with_the_same_key(
    db_url: str, tmp_path: Path, tool: str
) -> None:
    run_id = f"research-keyed-{tool}"
    d = ext_dir(tmp_path, "ext")
    first = child(
        "agentkit_research:child",
        url=db_url,
        directory=str(d),
        run_id=run_id,
        tool=tool,
        crash_at="in_tool",
    )
    assert_crashed(first)
    api = ExternalApi(d)
    (attempt,) = api.attempt_rows()
    key = attempt["key"]
    assert key
    if tool == "key_fn":
        assert key == "ticket:about durable agents"
    assert len(api.write_rows()) == 1

    # Resume in this (another) process once the dead executor's 1 s lease has expired.
    kit = build(db_url, str(d), tool=tool)
    output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert output == await reference_output(db_url, tmp_path, tool)

    attempts = api.attempt_rows()
    assert len(attempts) == 2  # re-executed exactly once ...
    assert {a["key"] for a in attempts} == {key}  # ... with the same key (I4), in two processes
    assert len({a["pid"] for a in attempts}) == 2
    assert kit.seen_keys == [key]
    assert len(api.write_rows()) == 1  # the external write happened once

    steps = {s.name: s for s in await kit.pipeline.tide.steps(run_id)}
    (tool_step,) = [s for name, s in steps.items() if TOOL_STEP.match(name)]
    assert tool_step.status == "completed"
    assert tool_step.idempotency_key == key
    assert tool_step.attempts == 2
    events = await kit.pipeline.tide.store.get_events(run_id)
    in_doubt = [e for e in events if e.kind == "step_in_doubt" and e.step == tool_step.name]
    assert len(in_doubt) == 1
    assert in_doubt[0].data["idempotency_key"] == key

    # Completed: invoking it again returns the recorded answer and fires nothing (R7).
    assert await kit.pipeline.resume(run_id) == output
    assert len(api.attempt_rows()) == 2


async def test_crash_inside_unkeyed_tool_parks_for_review(db_url: str, tmp_path: Path) -> None:
    run_id = "research-unkeyed-in-doubt"
    d = ext_dir(tmp_path, "ext")
    first = child(
        "agentkit_research:child",
        url=db_url,
        directory=str(d),
        run_id=run_id,
        tool="unkeyed",
        crash_at="in_tool",
    )
    assert_crashed(first)
    api = ExternalApi(d)
    assert len(api.write_rows()) == 1

    kit = build(db_url, str(d), tool="unkeyed")
    with pytest.raises(StepNeedsReview) as parked:
        await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert TOOL_STEP.match(parked.value.step)
    assert kit.seen_keys == []  # not fired blindly
    assert len(api.attempt_rows()) == 1
    assert len(api.write_rows()) == 1
    assert len(kit.writer_model.calls) == 0

    tide = kit.pipeline.tide
    steps = {s.name: s for s in await tide.steps(run_id)}
    assert steps[parked.value.step].status == "manual_review"
    assert (await tide.get_run(run_id)).status == "manual_review"

    # R4: still parked on the next invocation; the tool is not executed.
    with pytest.raises(StepNeedsReview):
        await kit.pipeline.resume(run_id)
    assert kit.seen_keys == []
    assert len(api.attempt_rows()) == 1


async def test_crash_after_tool_returned_before_agent_finished(db_url: str, tmp_path: Path) -> None:
    """The tool call was checkpointed; the agent was not. The agent step re-executes, the tool
    call replays from its checkpoint (even unkeyed: it is not in doubt)."""
    run_id = "research-after-tool"
    d = ext_dir(tmp_path, "ext")
    first = child(
        "agentkit_research:child",
        url=db_url,
        directory=str(d),
        run_id=run_id,
        tool="unkeyed",
        crash_at="before_agent_done",
    )
    assert_crashed(first)
    api = ExternalApi(d)
    assert len(api.write_rows()) == 1

    kit = build(db_url, str(d), tool="unkeyed")
    output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert output == await reference_output(db_url, tmp_path, "unkeyed")
    assert kit.seen_keys == []  # replayed, not re-fired
    assert len(api.attempt_rows()) == 1
    # The unfinished agent step ran again, its first turn (the tool call) replayed (T1).
    assert len(kit.researcher_model.calls) == 1
    assert len(kit.writer_model.calls) == 1

    steps = {s.name: s for s in await kit.pipeline.tide.steps(run_id)}
    (tool_step,) = [s for name, s in steps.items() if TOOL_STEP.match(name)]
    assert (tool_step.status, tool_step.attempts) == ("completed", 1)
    # Usage: each model call once; the dead attempt's last answer (it crashed before its agent
    # step completed) was never recorded, and was asked for again.
    rows = await kit.pipeline.tide.store.get_usage(run_id)
    assert sorted((r.step, r.requests) for r in rows) == [
        ("agent:researcher#1/model#1", 1),
        ("agent:researcher#1/model#2", 1),
        ("agent:writer#1/model#1", 1),
    ]


@pytest.mark.parametrize("mode", ["gather", "as_completed"])
async def test_concurrent_fan_out_resumes_onto_the_same_checkpoints(
    db_url: str, tmp_path: Path, mode: str
) -> None:
    """I1: concurrent calls of one agent replay onto their own checkpoints even though they start
    in another order on the resumed attempt; finished calls are not re-run."""
    run_id = f"fanout-{mode}"
    d = ext_dir(tmp_path, "ext")
    first = child("agentkit_fanout:child", url=db_url, directory=str(d), run_id=run_id, mode=mode)
    assert_crashed(first)
    finished = {int(line) for line in (d / "finished.log").read_text().split()}
    assert finished == {1, 3, 5}
    crashed_start_order = [int(x) for x in (d / "started.log").read_text().split()]

    kit = fanout.build(db_url, str(d), mode=mode, phase="resume")
    output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert kit.started != crashed_start_order  # the resumed attempt started them differently

    assert output == fanout.expected()  # right answers, in the right order
    called = sorted(user_text(call) for call in kit.model.calls)
    assert called == ["item 0", "item 2", "item 4"]  # finished calls were not re-run

    clean = fanout.build(db_url, str(d), mode=mode, phase="clean")
    assert await clean.pipeline(fanout.N, run_id=f"{run_id}-clean") == output

    steps = await kit.pipeline.tide.steps(run_id)
    assert len(steps) == fanout.N
    assert all(re.fullmatch(r"agent:worker#\d+", s.name) for s in steps)
    assert all(s.status == "completed" and s.attempts == 1 for s in steps)
    rows = await kit.pipeline.tide.store.get_usage(run_id)
    # Once per model call: each worker answers in one turn.
    assert sorted(r.step for r in rows) == sorted(f"{s.name}/model#1" for s in steps)
