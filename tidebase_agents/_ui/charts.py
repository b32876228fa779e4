"""Geometry of the inspector's pictures: a run's step timeline and stacked bars of usage.

Plain numbers and strings only; the templates draw them as SVG (autoescaped like any text).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence

from .._inspect import ACQUISITIONS, StepReading
from .._store import EventRecord, RunRecord
from .._vocab import EventKind, StepStatus

# Timeline layout, in SVG user units.
LABEL_WIDTH = 300
PLOT_WIDTH = 700
ROW_HEIGHT = 22
HEADER_HEIGHT = 40
SEGMENT_GAP = 16
MIN_SEGMENT = 150
MIN_BAR = 3
INDENT = 14
CHAR_WIDTH = 7.2


@dataclasses.dataclass(frozen=True)
class Segment:
    """The part of the time axis one attempt of the run occupies."""

    attempt: int
    x: float
    width: float
    start: dt.datetime
    end: dt.datetime


@dataclasses.dataclass(frozen=True)
class Bar:
    """One step's row: its label and the bar of its execution."""

    index: int
    y: float
    label_x: float
    label: str
    name: str
    x: float
    width: float
    classes: str
    title: str


@dataclasses.dataclass(frozen=True)
class Mark:
    """A step in an attempt other than the one its bar is drawn in: ``replay`` (the attempt
    returned its recorded output) or ``try`` (the attempt started it, and did not finish)."""

    kind: str
    x: float
    y: float
    attempt: int
    title: str


@dataclasses.dataclass(frozen=True)
class Timeline:
    width: float
    height: float
    label_width: float
    segments: list[Segment]
    bars: list[Bar]
    marks: list[Mark]


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def step_classes(r: StepReading) -> str:
    """CSS classes of a step's bar: its status, whether it was replayed or is in doubt."""
    classes = ["step-bar", f"status-{r.step.status}"]
    if r.in_doubt:
        classes.append("in-doubt")
    classes.append("replayed" if r.replays else "executed")
    return " ".join(classes)


def _attempt_spans(
    run: RunRecord,
    readings: Sequence[StepReading],
    events: Sequence[EventRecord],
    now: dt.datetime,
) -> list[tuple[int, dt.datetime, dt.datetime]]:
    """(attempt, start, end) per attempt: from its acquisition to its last event or step end."""
    spans: list[list[dt.datetime]] = []
    for e in events:
        if e.kind in ACQUISITIONS:
            spans.append([e.created_at, e.created_at])
        elif spans:
            spans[-1][1] = max(spans[-1][1], e.created_at)
    for r in readings:
        end = _step_end(r)
        if end is not None and 0 < r.attempt <= len(spans):
            spans[r.attempt - 1][1] = max(spans[r.attempt - 1][1], end)
    for r in readings:
        if r.in_doubt and 0 < r.attempt <= len(spans):
            # Its executor died at some point before the next attempt (or its lease) began.
            if r.attempt < len(spans):
                until = spans[r.attempt][0]
            else:
                until = min(run.lease_expires_at or spans[-1][1], now)
            spans[r.attempt - 1][1] = max(spans[r.attempt - 1][1], until)
    if spans and any(r.step.status == StepStatus.RUNNING and not r.in_doubt for r in readings):
        spans[-1][1] = max(spans[-1][1], now)  # a live step runs until now
    return [(i, start, end) for i, (start, end) in enumerate(spans, 1)]


#: Step events that show an attempt worked on a step (whatever its checkpoint says now).
_TRIED = (EventKind.STEP_STARTED, EventKind.STEP_IN_DOUBT, EventKind.STEP_FAILED_RETRYABLE)


def _tries(events: Sequence[EventRecord]) -> list[tuple[int, EventRecord]]:
    """(attempt, event) for each step event of ``_TRIED``, in order."""
    attempt, out = 0, []
    for e in events:
        if e.kind in ACQUISITIONS:
            attempt += 1
        elif e.kind in _TRIED and e.step is not None and attempt:
            out.append((attempt, e))
    return out


def _label(name: str, room: int) -> str:
    """``name`` in at most ``room`` characters, eliding its middle (its end names it best)."""
    if len(name) <= room:
        return name
    head = max((room - 1) // 3, 1)
    return name[:head] + "…" + name[len(name) - (room - 1 - head) :]


def _step_end(r: StepReading) -> dt.datetime | None:
    s = r.step
    if s.started_at is not None and s.duration_ms is not None:
        return s.started_at + dt.timedelta(milliseconds=s.duration_ms)
    return s.completed_at


def _allocate(durations: Sequence[float], room: float) -> list[float]:
    """Widths summing to ``room`` for segments of these (positive) durations: proportional,
    none narrower than MIN_SEGMENT (``room`` holds at least that much per segment)."""
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(durations)) if i not in fixed]
        left = room - MIN_SEGMENT * len(fixed)
        weight = sum(durations[i] for i in free)
        widths = [
            MIN_SEGMENT if i in fixed else left * durations[i] / weight
            for i in range(len(durations))
        ]
        narrow = [i for i in free if widths[i] < MIN_SEGMENT]
        if not narrow:
            return widths
        fixed.update(narrow)


def timeline(
    run: RunRecord,
    readings: Sequence[StepReading],
    events: Sequence[EventRecord],
    now: dt.datetime,
    describe: Callable[[StepReading], str],
) -> Timeline | None:
    """Lay out a bar per step on a time axis broken into the run's attempts (each attempt
    gets a readable width, however long the run waited between them). None without steps."""
    spans = _attempt_spans(run, readings, events, now)
    if not readings or not spans:
        return None
    durations = [max(_seconds(start, end), 1e-3) for _, start, end in spans]
    plot = max(PLOT_WIDTH, len(spans) * (MIN_SEGMENT + SEGMENT_GAP))
    widths = _allocate(durations, plot - SEGMENT_GAP * (len(spans) - 1))
    segments = []
    x = float(LABEL_WIDTH)
    for (attempt, start, end), width in zip(spans, widths, strict=True):
        segments.append(Segment(attempt, x, width, start, end))
        x += width + SEGMENT_GAP

    def place(attempt: int, when: dt.datetime) -> tuple[Segment, float]:
        seg = segments[min(max(attempt, 1), len(segments)) - 1]
        span = max(_seconds(seg.start, seg.end), 1e-3)
        frac = min(max(_seconds(seg.start, when) / span, 0.0), 1.0)
        return seg, seg.x + frac * seg.width

    bars, marks = [], []
    rows: dict[str, float] = {}
    readings_by_name = {r.step.name: r for r in readings}
    for index, r in enumerate(readings, 1):
        y = HEADER_HEIGHT + (index - 1) * ROW_HEIGHT
        started = r.step.started_at or run.created_at
        seg, x0 = place(r.attempt, started)
        end = _step_end(r) or (seg.end if r.in_doubt else now)
        _, x1 = place(r.attempt, end)
        width = max(x1 - x0, MIN_BAR)
        label_x = 8 + r.depth * INDENT
        room = int((LABEL_WIDTH - label_x - 10) / CHAR_WIDTH)
        label = _label(r.step.name[len(r.parent) + 1 :] if r.parent else r.step.name, room)
        bars.append(
            Bar(
                index=index,
                y=y,
                label_x=label_x,
                label=label,
                name=r.step.name,
                x=x0,
                width=min(width, seg.x + seg.width - x0 + MIN_BAR),
                classes=step_classes(r),
                title=f"{r.step.name}: {describe(r)}",
            )
        )
        for later in range(r.attempt + 1, r.attempt + r.replays + 1):
            if later <= len(segments):
                s = segments[later - 1]
                marks.append(
                    Mark(
                        "replay", s.x + 6, y + ROW_HEIGHT / 2, later, f"replayed in attempt {later}"
                    )
                )
        rows[r.step.name] = y
    for attempt, e in _tries(events):
        name = e.step or ""
        if name not in rows or attempt == readings_by_name[name].attempt:
            continue
        _, x = place(attempt, e.created_at)
        row = rows[name] + ROW_HEIGHT / 2
        marks.append(Mark("try", x, row, attempt, f"{e.kind} in attempt {attempt}"))
    height = HEADER_HEIGHT + len(readings) * ROW_HEIGHT + 8
    return Timeline(LABEL_WIDTH + plot + 10, height, LABEL_WIDTH, segments, bars, marks)


# -- stacked bars ----------------------------------------------------------------------------

CHART_LEFT = 70
CHART_WIDTH = 860
CHART_HEIGHT = 200
CHART_TOP = 10
SERIES_COLORS = 8
MAX_BAR_WIDTH = 48


@dataclasses.dataclass(frozen=True)
class ChartBar:
    x: float
    y: float
    width: float
    height: float
    series: int
    title: str


@dataclasses.dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclasses.dataclass(frozen=True)
class BarChart:
    width: float
    height: float
    left: float
    top: float
    plot_height: float
    bars: list[ChartBar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(s * power for s in (1, 2, 2.5, 5, 10) if value <= s * power * (1 + 1e-9))


def stacked_bars(
    buckets: Sequence[dt.datetime],
    series: Sequence[str],
    values: Mapping[tuple[dt.datetime, str], float],
    *,
    value_label: Callable[[float], str],
    bucket_label: Callable[[dt.datetime], str],
) -> BarChart:
    """A bar per bucket, stacked by series (in ``series`` order), on a 0-based y axis."""
    totals = [sum(values.get((b, s), 0.0) for s in series) for b in buckets]
    top = nice_ceiling(max(totals, default=0.0))
    slot = CHART_WIDTH / max(len(buckets), 1)
    width = min(max(slot * 0.8, 1.0), MAX_BAR_WIDTH)
    scale = CHART_HEIGHT / top
    bars = []
    for i, b in enumerate(buckets):
        y = float(CHART_TOP + CHART_HEIGHT)
        for k, name in enumerate(series):
            v = values.get((b, name), 0.0)
            if v <= 0:
                continue
            h = v * scale
            y -= h
            bars.append(
                ChartBar(
                    x=CHART_LEFT + i * slot + (slot - width) / 2,
                    y=y,
                    width=width,
                    height=h,
                    series=k % SERIES_COLORS,
                    title=f"{bucket_label(b)} · {name}: {value_label(v)}",
                )
            )
    y_ticks = [
        Tick(CHART_TOP + CHART_HEIGHT - CHART_HEIGHT * f, value_label(top * f))
        for f in (0, 0.25, 0.5, 0.75, 1)
    ]
    every = max(1, math.ceil(len(buckets) / 8))
    x_ticks = [
        Tick(CHART_LEFT + i * slot + slot / 2, bucket_label(b))
        for i, b in enumerate(buckets)
        if i % every == 0
    ]
    return BarChart(
        width=CHART_LEFT + CHART_WIDTH + 20,
        height=CHART_TOP + CHART_HEIGHT + 30,
        left=CHART_LEFT,
        top=CHART_TOP,
        plot_height=CHART_HEIGHT,
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
    )
