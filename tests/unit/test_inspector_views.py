"""The inspector's reading of runs, without a database: step nesting and origins, in-doubt
steps, the timeline's geometry, shell-safe commands, page cursors and chart scales."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import shlex
from typing import Any

import pytest
from starlette.datastructures import QueryParams

from tidebase_agents import ConfigurationError, EventRecord, RunRecord, StepRecord, UsageRecord
from tidebase_agents._inspect import parse_since, read_steps
from tidebase_agents._pricing import DEFAULT_PRICES
from tidebase_agents._ui import charts, views
from tidebase_agents._vocab import EventKind, RunStatus, StepStatus

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def run_record(**changes: Any) -> RunRecord:
    base = RunRecord(
        run_id="r",
        pipeline="p",
        status=RunStatus.COMPLETED,
        input=None,
        input_hash=None,
        output=None,
        error=None,
        attempts=2,
        lease_owner=None,
        lease_token=2,
        lease_expires_at=None,
        event_seq=0,
        state_version=0,
        queue=None,
        dedupe_key=None,
        priority=0,
        scheduled_at=None,
        max_attempts=None,
        deadline=None,
        created_at=T0,
        updated_at=at(100),
        finished_at=at(100),
    )
    return dataclasses.replace(base, **changes)


def step(name: str, start: float, ms: float | None, token: int, **changes: Any) -> StepRecord:
    return StepRecord(
        name=name,
        status=changes.pop("status", StepStatus.COMPLETED),
        input_hash="h" * 64,
        lease_token=token,
        started_at=at(start),
        duration_ms=ms,
        completed_at=None if ms is None else at(start + ms / 1000),
        **changes,
    )


def event(seq: int, kind: EventKind, when: float, **data: Any) -> EventRecord:
    return EventRecord("r", seq, str(kind), data.pop("step", None), data or None, at(when))


# Attempt 1 (token 1) ran the researcher and its tool, then died; attempt 2 (token 2), an
# hour later, replayed both and ran the writer. The tool's checkpoint was written first.
EVENTS = [
    event(1, EventKind.RUN_STARTED, 0, owner="a"),
    event(2, EventKind.STEP_STARTED, 1, step="agent:res#1/tool:t:abc#1"),
    event(3, EventKind.STEP_COMPLETED, 1.5, step="agent:res#1/tool:t:abc#1"),
    event(4, EventKind.STEP_COMPLETED, 3, step="agent:res#1"),
    event(5, EventKind.RUN_RESUMED, 3600, token=2),
    event(6, EventKind.STEP_COMPLETED, 3603, step="agent:writer#1"),
]
STEPS = [
    step("agent:res#1/tool:t:abc#1", 1, 500, 1, side_effects=["api"], keyed=True),
    step("agent:res#1", 0.5, 2500, 1),
    step("agent:writer#1", 3601, 2000, 2),
]


def test_steps_read_in_tree_order_with_their_attempt_and_replays() -> None:
    readings = read_steps(run_record(), STEPS, EVENTS, at(4000))
    assert [(r.step.name, r.depth, r.parent, r.attempt, r.replays) for r in readings] == [
        ("agent:res#1", 0, None, 1, 1),
        ("agent:res#1/tool:t:abc#1", 1, "agent:res#1", 1, 1),
        ("agent:writer#1", 0, None, 2, 0),
    ]
    assert [views.origin(r) for r in readings] == [
        "executed in attempt 1, replayed in 1 later attempt",
        "executed in attempt 1, replayed in 1 later attempt",
        "executed in attempt 2",
    ]


def test_a_running_step_is_in_doubt_only_once_its_executor_is_gone() -> None:
    running = [step("tool:t:abc#1", 1, None, 2, status=StepStatus.RUNNING, side_effects=["api"])]
    now = at(3610)
    live = run_record(status=RunStatus.RUNNING, finished_at=None, lease_expires_at=at(3620))
    assert not read_steps(live, running, EVENTS, now)[0].in_doubt
    expired = dataclasses.replace(live, lease_expires_at=at(3605))
    assert read_steps(expired, running, EVENTS, now)[0].in_doubt
    taken_over = dataclasses.replace(live, lease_token=3)  # another executor holds it now
    assert read_steps(taken_over, running, EVENTS, now)[0].in_doubt
    parked = dataclasses.replace(live, status=RunStatus.MANUAL_REVIEW, lease_expires_at=None)
    assert read_steps(parked, running, EVENTS, now)[0].in_doubt


def test_the_timeline_gives_each_attempt_its_own_readable_stretch_of_the_axis() -> None:
    readings = read_steps(run_record(), STEPS, EVENTS, at(4000))
    tl = charts.timeline(run_record(), readings, EVENTS, at(4000), views.origin)
    assert tl is not None
    one, two = tl.segments
    assert (one.attempt, two.attempt) == (1, 2)
    assert one.x >= charts.LABEL_WIDTH and one.x + one.width < two.x  # in order, apart
    assert min(one.width, two.width) >= charts.MIN_SEGMENT  # the hour between is cut out
    assert two.x + two.width <= tl.width
    research, tool, writer = tl.bars
    for bar, seg in ((research, one), (tool, one), (writer, two)):
        assert seg.x <= bar.x and bar.x + bar.width <= seg.x + seg.width + charts.MIN_BAR
        assert bar.width >= charts.MIN_BAR
    assert research.x < tool.x < tool.x + tool.width < research.x + research.width
    assert tool.label_x > research.label_x == writer.label_x  # nested inside its parent
    assert tool.label == "tool:t:abc#1"  # the parent's scope is not repeated
    assert "replayed" in research.classes.split() and "executed" in writer.classes.split()
    assert [(m.kind, m.attempt, m.y) for m in tl.marks] == [
        ("replay", 2, research.y + charts.ROW_HEIGHT / 2),
        ("replay", 2, tool.y + charts.ROW_HEIGHT / 2),
    ]


def test_an_attempt_that_started_a_step_it_did_not_finish_is_marked() -> None:
    parked = step("agent:res#1/tool:t:abc#1", 3600.5, None, 2, status=StepStatus.MANUAL_REVIEW)
    events = [*EVENTS[:2], EVENTS[4]]
    run = run_record(status=RunStatus.MANUAL_REVIEW)
    tl = charts.timeline(run, read_steps(run, [parked], events, at(4000)), events, at(4000), str)
    assert tl is not None
    (mark,) = tl.marks
    assert (mark.kind, mark.attempt) == ("try", 1)
    first = tl.segments[0]
    assert first.x <= mark.x <= first.x + first.width
    assert "status-manual_review" in tl.bars[0].classes.split()


def test_long_step_names_are_elided_in_the_middle_so_their_end_still_names_them() -> None:
    name = "agent:a-very-long-agent-name#1/tool:create_ticket:949bfd04113c#1"
    label = charts._label(name, 30)
    assert len(label) == 30 and label.endswith("949bfd04113c#1") and "…" in label
    assert charts._label("short", 30) == "short"


@pytest.mark.parametrize(
    "name", ["agent:w#1/tool:lookup:ab12cd34ef56#1", 'it\'s a "step" $(rm -rf ~) #1', "a;b|c&d"]
)
def test_resolve_commands_reach_the_shell_as_exactly_their_arguments(name: str) -> None:
    run = run_record(run_id="run-'x'", status=RunStatus.MANUAL_REVIEW)
    parked = step(name, 1, None, 1, status=StepStatus.MANUAL_REVIEW, error={"message": "m"})
    (reading,) = read_steps(run, [parked], EVENTS[:1], at(10))
    item = views.step_pending(run, reading, 1)
    assert item is not None
    args = [shlex.split(c.line) for c in item.commands]
    review = ["tidebase-agents", "steps", "review", "run-'x'", name]
    assert args == [[*review, "--retry"], [*review, "--output", "JSON"], [*review, "--fail"]]


def test_page_cursors_and_filters_round_trip_through_the_url() -> None:
    cursor = views.parse_cursor("2026-12-01T09:00:00.123456+00:00|run|with|bars")
    assert cursor is not None and cursor.run_id == "run|with|bars"
    assert views.parse_cursor(views.cursor_text(cursor)) == cursor
    for bad in ("nope", "2026-12-01T09:00:00|", "2026-12-01T09:00:00|r", "x|r"):
        with pytest.raises(ConfigurationError, match="invalid page cursor"):
            views.parse_cursor(bad)
    query = QueryParams("status=queued&status=running&pipeline=a+b&queue=&since=2h")
    filters = views.RunFilters.from_query(query)
    assert filters.statuses == ("queued", "running") and filters.queues == ()
    again = views.RunFilters.from_query(QueryParams(filters.query(before="c|r")))
    assert again == dataclasses.replace(filters, before="c|r")


def test_since_takes_durations_and_timestamps() -> None:
    now = at(0)
    assert parse_since("90m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("2026-11-30T10:00:00", now) == dt.datetime(
        2026, 11, 30, 10, tzinfo=dt.timezone.utc
    )
    assert parse_since("", now) is None
    with pytest.raises(ConfigurationError, match="neither a duration"):
        parse_since("yesterday", now)


def test_usage_is_summed_per_model_and_unpriced_stays_unpriced() -> None:
    records = [
        UsageRecord("1", model="gpt-4o-mini", requests=1, input_tokens=1_000_000),
        UsageRecord("2", model="gpt-4o-mini", requests=1, output_tokens=1_000_000),
        UsageRecord("3", model="mystery", requests=2, input_tokens=10),
    ]
    lines = views.usage_by_model(records, DEFAULT_PRICES)
    assert [(x.model, x.requests, x.cost) for x in lines] == [
        ("gpt-4o-mini", 2, pytest.approx(0.75)),
        ("mystery", 2, None),
    ]
    assert views.total_cost(lines) is None
    assert views.total_cost(lines[:1]) == pytest.approx(0.75)


def test_stacked_bars_scale_to_a_round_top_and_stack_without_gaps() -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    buckets = [at(3600 * i) for i in range(rnd.randint(1, 30))]
    series = ["a", "b", "c"]
    values = {(b, s): float(rnd.randint(0, 5000)) for b in buckets for s in series}
    chart = charts.stacked_bars(buckets, series, values, value_label=str, bucket_label=str)
    top = charts.nice_ceiling(max(sum(values[(b, s)] for s in series) for b in buckets))
    scale = charts.CHART_HEIGHT / top
    bottom = charts.CHART_TOP + charts.CHART_HEIGHT
    for b in buckets:
        title = f"{b} · "
        stack = [bar for bar in chart.bars if bar.title.startswith(title)]
        assert sum(bar.height for bar in stack) == pytest.approx(
            sum(values[(b, s)] for s in series) * scale
        )
        y = bottom
        for bar in stack:  # each sits on the one below it
            assert bar.y + bar.height == pytest.approx(y)
            y = bar.y
        assert y >= charts.CHART_TOP - 1e-6
    assert [charts.nice_ceiling(v) for v in (0, 0.7, 1, 3, 240, 1001)] == [
        1,
        1,
        1,
        5,
        250,
        2000,
    ]
