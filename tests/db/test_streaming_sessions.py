"""``Runner.run_streamed`` and session-backed runs inside pipelines (R1, R5), on SQLite and
PostgreSQL: a replayed stream yields the recorded semantic events without calling the model, and
a crash mid-run never duplicates session items."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import (
    CHILD_CODE,
    Interrupted,
    assert_crashed,
    assert_same_result,
    until_unlocked,
)
from agentkit_common import close_engines as close_engines
from agentkit_stream import (
    build_session_pipeline,
    build_streaming,
    describe,
    session_items,
)
from harness import run_child

from tidebase_agents import Tidebase

WORDS = ["durable", "agent"]


def semantic(events: list[Any]) -> list[list[str]]:
    return [d for d in map(describe, events) if d is not None]


# -- streaming ------------------------------------------------------------------------------------


async def test_streamed_run_round_trips(db_url: str, tmp_path: Path) -> None:
    kit = build_streaming(db_url, str(tmp_path), interrupt_once=True)
    pipeline = kit.pipeline
    with pytest.raises(Interrupted):
        await pipeline("durable", run_id="run-stream")
    calls, lookups = len(kit.model.calls), list(kit.lookups)
    assert calls == 2 and lookups == ["durable"]
    original, original_events = kit.results[0], kit.events[0]
    assert any(e.type == "raw_response_event" for e in original_events)  # a live stream

    assert await pipeline("durable", run_id="run-stream") == "answer: durable means lasting"
    assert len(kit.model.calls) == calls  # replayed: the model was not called
    assert kit.lookups == lookups
    replayed, replayed_events = kit.results[1], kit.events[1]
    assert semantic(replayed_events) == semantic(original_events)
    assert [d[1] for d in semantic(replayed_events) if d[0] == "run_item_stream_event"] == [
        "tool_called",
        "tool_output",
        "message_output_created",
    ]
    assert replayed.is_complete
    assert_same_result(replayed, original)
    assert replayed.last_agent is kit.agent

    steps = {s.name: s.status for s in await Tidebase(db_url).steps("run-stream")}
    assert steps.pop("agent:explainer#1") == "completed"
    assert list(steps.values()) == ["completed"]  # the durable lookup
    rows = await Tidebase(db_url).store.get_usage("run-stream")
    assert sorted((r.step, r.requests) for r in rows) == [
        ("agent:explainer#1/model#1", 1),
        ("agent:explainer#1/model#2", 1),
    ]


async def test_crash_after_a_streamed_run_replays_the_stream(db_url: str, tmp_path: Path) -> None:
    run_id = "run-stream-crash"
    first = run_child(
        CHILD_CODE,
        "agentkit_stream:stream_child",
        json.dumps({"url": db_url, "directory": str(tmp_path), "run_id": run_id}),
    )
    assert_crashed(first)
    recorded_events = json.loads((tmp_path / "events.log").read_text())
    recorded_output = json.loads((tmp_path / "output.log").read_text())

    kit = build_streaming(db_url, str(tmp_path))
    output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert output == recorded_output == "answer: durable means lasting"
    assert len(kit.model.calls) == 0  # the finished streamed run was not run again
    assert kit.lookups == []
    assert semantic(kit.events[0]) == recorded_events
    rows = await kit.pipeline.tide.store.get_usage(run_id)
    assert sorted((r.step, r.requests) for r in rows) == [
        ("agent:explainer#1/model#1", 1),
        ("agent:explainer#1/model#2", 1),
    ]


# -- sessions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlalchemy", "sqlite"])
async def test_session_run_round_trips_without_touching_the_session(
    db_url: str, tmp_path: Path, kind: str
) -> None:
    reference = build_session_pipeline(db_url, str(tmp_path), kind)
    assert await reference.pipeline("s-ref", WORDS, run_id="run-session-ref") == [
        "answer: durable means lasting",
        "answer: agent means lasting",
    ]
    expected_items = await session_items(kind, "s-ref", db_url, str(tmp_path))
    assert len(expected_items) == 8  # 2 x (user, function_call, function_call_output, message)

    kit = build_session_pipeline(db_url, str(tmp_path), kind, interrupt_once=True)
    with pytest.raises(Interrupted):
        await kit.pipeline("s-1", WORDS, run_id="run-session")
    calls = len(kit.model.calls)
    assert await kit.pipeline("s-1", WORDS, run_id="run-session") == [
        "answer: durable means lasting",
        "answer: agent means lasting",
    ]
    assert len(kit.model.calls) == calls
    for original, replayed in zip(kit.results[:2], kit.results[2:], strict=True):
        assert_same_result(replayed, original)
        assert replayed.last_agent is kit.agent
    assert await session_items(kind, "s-1", db_url, str(tmp_path)) == expected_items


@pytest.mark.parametrize("kind", ["sqlalchemy", "sqlite"])
async def test_crash_mid_run_does_not_duplicate_session_items(
    db_url: str, tmp_path: Path, kind: str
) -> None:
    run_id = f"run-session-crash-{kind}"
    first = run_child(
        CHILD_CODE,
        "agentkit_stream:session_child",
        json.dumps(
            {
                "url": db_url,
                "directory": str(tmp_path),
                "run_id": run_id,
                "kind": kind,
                "session_id": "s-crash",
                "words": WORDS,
            }
        ),
    )
    assert_crashed(first)
    # The crashed attempt had written the second run's input and tool turn to the session.
    partial = await session_items(kind, "s-crash", db_url, str(tmp_path))
    assert len(partial) == 7

    kit = build_session_pipeline(db_url, str(tmp_path), kind)
    output = await until_unlocked(lambda: kit.pipeline.resume(run_id))
    assert output == ["answer: durable means lasting", "answer: agent means lasting"]
    # Only the unfinished second run executed again, and of it only the turn after its tool
    # call: that turn's answer was journaled (T1).
    assert len(kit.model.calls) == 1
    assert kit.lookups == []  # its tool call replayed

    reference = build_session_pipeline(db_url, str(tmp_path), kind)
    await reference.pipeline("s-ref", WORDS, run_id=f"{run_id}-ref")
    expected = await session_items(kind, "s-ref", db_url, str(tmp_path))
    assert await session_items(kind, "s-crash", db_url, str(tmp_path)) == expected
    # The resumed second run saw the same history as a crash-free one.
    assert kit.model.calls[0].input == reference.model.calls[3].input
