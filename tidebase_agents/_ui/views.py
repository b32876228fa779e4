"""What the inspector's pages show, computed from records read through the facade.

No web framework here: each page's data is built by a plain function, the templates only
arrange it. Stored values stay values (the templates escape them); nothing here makes markup.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from .._errors import ConfigurationError
from .._inspect import StepReading, error_text, parse_since
from .._pricing import Price, record_cost
from .._store import EventRecord, RunCursor, RunRecord, StateVersion, UsageRecord
from .._vocab import RunStatus, StepStatus
from . import charts

#: Payloads longer than this (as pretty JSON) are collapsed; longer than the cap, cut.
COLLAPSE_CHARS = 1200
COLLAPSE_LINES = 30
PAYLOAD_CAP = 200_000
#: Run statuses a page keeps refreshing for: something is (about to be) happening.
LIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
REFRESH_SECONDS = 3
#: Status counts stop here ("10,000+"), so the runs page costs the same at any table size.
COUNT_CAP = 10_000
#: The ``since`` choices the runs and usage pages offer (any other value is accepted too).
SINCE_CHOICES = ("15m", "1h", "24h", "7d", "30d", "90d")
CLI = "tidebase-agents"


# -- formatting ------------------------------------------------------------------------------


def when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def span(seconds: float | None) -> str:
    """A duration for people: ``850 ms``, ``12.3 s``, ``4 min``, ``2.5 h``, ``3 d``."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def usd(cost: float | None) -> str:
    if cost is None:
        return "unpriced"
    return f"${cost:.4f}" if cost < 100 else f"${cost:,.2f}"


def count(n: float) -> str:
    if n >= 10_000_000:
        return f"{n / 1_000_000:.0f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,.0f}"


def capped(n: int) -> str:
    """A count from a capped read: past :data:`COUNT_CAP` it only says so."""
    return f"{COUNT_CAP:,}+" if n > COUNT_CAP else f"{n:,}"


@dataclasses.dataclass(frozen=True)
class Payload:
    """A stored JSON value as text: pretty, collapsed when long, cut past the cap."""

    text: str
    collapsed: bool
    cut: int  # characters left out

    @property
    def summary(self) -> str:
        return " ".join(self.text[:100].split()) + "…"


def payload(value: Any, *, compact: bool = False) -> Payload | None:
    """``value`` as text to show: a string as it is, anything else as JSON (indented unless
    ``compact``)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, indent=None if compact else 2, ensure_ascii=False, default=str)
    cut = max(len(text) - PAYLOAD_CAP, 0)
    collapsed = len(text) > COLLAPSE_CHARS or text.count("\n") > COLLAPSE_LINES
    return Payload(text[:PAYLOAD_CAP], collapsed, cut)


def command(*args: str) -> str:
    """A command line that a POSIX shell reads back as exactly these arguments."""
    return shlex.join([CLI, *args])


# -- filters of the runs page ----------------------------------------------------------------


def parse_cursor(value: str | None) -> RunCursor | None:
    """``<ISO created_at>|<run id>`` (what :func:`cursor_text` writes)."""
    if not value:
        return None
    stamp, sep, run_id = value.partition("|")
    try:
        created = dt.datetime.fromisoformat(stamp)
    except ValueError:
        created = None
    if not sep or not run_id or created is None or created.tzinfo is None:
        raise ConfigurationError(f"invalid page cursor {value!r}")
    return RunCursor(created, run_id)


def cursor_text(cursor: RunCursor) -> str:
    return f"{cursor.created_at.isoformat()}|{cursor.run_id}"


@dataclasses.dataclass(frozen=True)
class RunFilters:
    """The runs page's filters, as the URL query holds them (each may repeat)."""

    statuses: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    since: str = ""
    before: str = ""

    @classmethod
    def from_query(cls, query: Any) -> RunFilters:
        """From a multi-valued query mapping (``getlist``); empty values mean no filter."""

        def many(key: str) -> tuple[str, ...]:
            return tuple(dict.fromkeys(v for v in query.getlist(key) if v))

        return cls(
            statuses=many("status"),
            pipelines=many("pipeline"),
            queues=many("queue"),
            since=query.get("since") or "",
            before=query.get("before") or "",
        )

    def since_time(self, now: dt.datetime) -> dt.datetime | None:
        return parse_since(self.since, now)

    def cursor(self) -> RunCursor | None:
        return parse_cursor(self.before)

    def query(self, **changes: Any) -> str:
        """This query string with ``changes`` (e.g. ``before=...``), for a link."""
        fields = {**dataclasses.asdict(self), **changes}
        pairs = [
            *(("status", s) for s in fields["statuses"]),
            *(("pipeline", p) for p in fields["pipelines"]),
            *(("queue", q) for q in fields["queues"]),
            *((k, fields[k]) for k in ("since", "before") if fields[k]),
        ]
        return urlencode(pairs)

    @property
    def active(self) -> bool:
        return bool(self.statuses or self.pipelines or self.queues or self.since)


@dataclasses.dataclass(frozen=True)
class RunRow:
    run: RunRecord
    age: str
    took: str
    cost: str
    error: str

    @property
    def attempts(self) -> str:
        r = self.run
        return f"{r.attempts}/{r.max_attempts}" if r.max_attempts else str(r.attempts)


def run_rows(
    runs: Sequence[RunRecord], costs: Mapping[str, float | None], now: dt.datetime
) -> list[RunRow]:
    rows = []
    for r in runs:
        end = r.finished_at or (now if r.status in LIVE_STATUSES else r.updated_at)
        rows.append(
            RunRow(
                run=r,
                age=span(_seconds(r.created_at, now)),
                took=span(_seconds(r.created_at, end)),
                cost=usd(costs[r.run_id]) if r.run_id in costs else "–",
                error=error_text(r.error)[:160],
            )
        )
    return rows


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return max((b - a).total_seconds(), 0.0)


def refreshes(statuses: Sequence[RunStatus]) -> bool:
    """Whether a page showing runs in these statuses keeps itself up to date."""
    return any(s in LIVE_STATUSES for s in statuses)


# -- the run page ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UsageLine:
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: float | None


def usage_by_model(records: Sequence[UsageRecord], prices: Mapping[str, Price]) -> list[UsageLine]:
    """Usage records summed per model, each with its cost (None when unpriced)."""
    lines: dict[str, UsageLine] = {}
    for u in records:
        model = u.model or "–"
        cost = record_cost(u, prices)
        old = lines.get(model)
        if old is None:
            lines[model] = UsageLine(
                model, u.requests, u.input_tokens, u.output_tokens, u.cached_tokens, cost
            )
            continue
        lines[model] = UsageLine(
            model,
            old.requests + u.requests,
            old.input_tokens + u.input_tokens,
            old.output_tokens + u.output_tokens,
            old.cached_tokens + u.cached_tokens,
            None if cost is None or old.cost is None else old.cost + cost,
        )
    return sorted(lines.values(), key=lambda line: line.model)


def total_cost(lines: Sequence[UsageLine]) -> float | None:
    return None if any(x.cost is None for x in lines) else sum(x.cost or 0.0 for x in lines)


@dataclasses.dataclass(frozen=True)
class Command:
    what: str
    line: str


@dataclasses.dataclass(frozen=True)
class PendingItem:
    """Something that waits on an operator, with what happened and how to resolve it.

    Every kind of waiting a run can do is listed through :func:`pending_items`, and the run
    page shows them all in one section.
    """

    kind: str
    title: str
    happened: str
    commands: list[Command]
    step_index: int | None = None


@dataclasses.dataclass(frozen=True)
class StepView:
    index: int
    reading: StepReading
    origin: str
    output: Payload | None
    error: Payload | None
    input_parts: Payload | None
    usage: list[UsageLine]
    cost: float | None
    pending: PendingItem | None

    @property
    def step(self) -> Any:
        return self.reading.step

    @property
    def label(self) -> str:
        if self.reading.in_doubt:
            return "in doubt"
        return str(self.reading.step.status).replace("_", " ")

    @property
    def opened(self) -> bool:
        """Shown unfolded: the steps that need a look."""
        return self.pending is not None or self.reading.step.status != StepStatus.COMPLETED


_ENDED_AS = {
    StepStatus.MANUAL_REVIEW: "parked for review",
    StepStatus.FAILED: "failed for good",
    StepStatus.FAILED_RETRYABLE: "failed, to be retried,",
    StepStatus.WAITING: "waiting (the run is parked) since",
}


def origin(r: StepReading) -> str:
    """How the step came to be: which attempt executed it, how many replayed it."""
    if r.in_doubt:
        return f"started in attempt {r.attempt}; its executor is gone"
    if r.step.status == StepStatus.RUNNING:
        return f"running in attempt {r.attempt}"
    if r.step.status in _ENDED_AS:
        return f"{_ENDED_AS[r.step.status]} in attempt {r.attempt}"
    # A fork's copies carry lease token 0: no attempt of this run executed them.
    text = (
        "copied when the run was forked" if r.attempt == 0 else f"executed in attempt {r.attempt}"
    )
    if r.replays:
        text += f", replayed in {r.replays} later attempt{'s' if r.replays > 1 else ''}"
    return text


def _resume_commands(run: RunRecord) -> list[Command]:
    here = Command(
        "resume it in a process that imports the pipeline (replace MODULE:ATTR)",
        command("runs", "resume", run.run_id, "--app", "MODULE:ATTR"),
    )
    if run.queue is None:
        return [here]
    return [
        Command("hand it back to the workers", command("runs", "resume", run.run_id, "--enqueue")),
        here,
    ]


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def step_pending(run: RunRecord, r: StepReading, index: int) -> PendingItem | None:
    """What an operator must do about this step, if anything."""
    s = r.step
    effects = ", ".join(s.side_effects or []) or "an external system"
    if s.status == StepStatus.MANUAL_REVIEW:
        review = ("steps", "review", run.run_id, s.name)
        return PendingItem(
            kind=str(StepStatus.MANUAL_REVIEW),
            title=f"Step {s.name} is parked for review",
            happened=(
                f"{_sentence(error_text(s.error)) or 'It was parked by its replay policy.'} "
                f"The run cannot go on until an operator decides: it may have written to "
                f"{effects}, so it is not retried blindly. Check there, then pick one."
            ),
            commands=[
                Command("execute the step again", command(*review, "--retry")),
                Command(
                    "record what it returned (replace JSON with the value, as JSON)",
                    command(*review, "--output", "JSON"),
                ),
                Command("fail the step and the run", command(*review, "--fail")),
            ],
            step_index=index,
        )
    if r.in_doubt:
        if s.keyed:
            then = (
                f"It is keyed (idempotency key {s.idempotency_key}), so resuming the run "
                f"executes it again with the same key and {effects} deduplicates the write."
            )
        else:
            then = (
                "It is not keyed, so resuming the run parks it for review instead of "
                "writing twice; resolve it then with `steps review`."
            )
        return PendingItem(
            kind="in_doubt",
            title=f"Step {s.name} is in doubt",
            happened=(
                f"The executor of attempt {r.attempt} died while this step was writing to "
                f"{effects}: whether the write happened is unknown. {then}"
            ),
            commands=_resume_commands(run),
            step_index=index,
        )
    return None


def pending_items(run: RunRecord, steps: Sequence[StepView]) -> list[PendingItem]:
    """Everything this run waits on an operator for (the run page's one such section)."""
    return [s.pending for s in steps if s.pending is not None]


def step_views(
    run: RunRecord,
    readings: Sequence[StepReading],
    usage: Sequence[UsageRecord],
    prices: Mapping[str, Price],
) -> list[StepView]:
    names = {r.step.name for r in readings}
    per_step: dict[str, list[UsageRecord]] = {}
    for u in usage:
        per_step.setdefault(_owner(u.step, names), []).append(u)
    views = []
    for index, r in enumerate(readings, 1):
        lines = usage_by_model(per_step.get(r.step.name, []), prices)
        views.append(
            StepView(
                index=index,
                reading=r,
                origin=origin(r),
                output=payload(r.step.output),
                error=payload(r.step.error),
                input_parts=payload(r.step.input_parts),
                usage=lines,
                cost=total_cost(lines),
                pending=step_pending(run, r, index),
            )
        )
    return views


def _owner(step: str | None, names: set[str]) -> str:
    """The recorded step a usage record belongs to: its own, else its innermost recorded
    scope (a model call journaled inside an agent step); '' for usage outside any step."""
    while step:
        if step in names:
            return step
        step = step.rpartition("/")[0]
    return ""


@dataclasses.dataclass(frozen=True)
class RunStatusView:
    """The run's status as the page's header shows it."""

    status: str
    label: str
    note: str
    live: bool


def run_status(run: RunRecord, now: dt.datetime) -> RunStatusView:
    note = ""
    if run.status == RunStatus.RUNNING:
        expires = run.lease_expires_at
        note = (
            f"held by {run.lease_owner}"
            if expires is not None and expires > now
            else "its executor's lease expired: the next invocation or a worker takes it over"
        )
    elif run.status == RunStatus.QUEUED and run.scheduled_at is not None:
        note = "due " + (
            "now" if run.scheduled_at <= now else f"in {span(_seconds(now, run.scheduled_at))}"
        )
    return RunStatusView(
        str(run.status), str(run.status).replace("_", " "), note, run.status in LIVE_STATUSES
    )


@dataclasses.dataclass(frozen=True)
class EventView:
    event: EventRecord
    data: Payload | None


@dataclasses.dataclass(frozen=True)
class StateView:
    state: StateVersion
    value: Payload | None


# -- the usage page --------------------------------------------------------------------------

BUCKETS = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1), "week": dt.timedelta(days=7)}
MAX_BARS = 400


def coarser(bucket: str) -> str | None:
    names = list(BUCKETS)
    i = names.index(bucket)
    return names[i + 1] if i + 1 < len(names) else None


def bucket_count(rows: Sequence[Mapping[str, Any]], bucket: str) -> int:
    if not rows:
        return 0
    first, last = rows[0]["bucket"], rows[-1]["bucket"]
    return int((last - first) / BUCKETS[bucket]) + 1


@dataclasses.dataclass(frozen=True)
class UsageCharts:
    series: list[str]
    tokens: charts.BarChart
    cost: charts.BarChart
    unpriced: list[str]


def usage_charts(rows: Sequence[Mapping[str, Any]], by: str, bucket: str) -> UsageCharts | None:
    """Tokens and cost per bucket, stacked by ``by`` (``model`` or ``pipeline``)."""
    if not rows:
        return None
    step = BUCKETS[bucket]
    first, last = rows[0]["bucket"], rows[-1]["bucket"]
    buckets = [first + i * step for i in range(int((last - first) / step) + 1)]
    totals: dict[str, float] = {}
    tokens: dict[tuple[dt.datetime, str], float] = {}
    cost: dict[tuple[dt.datetime, str], float] = {}
    unpriced: set[str] = set()
    for r in rows:
        name = str(r[by] if r[by] is not None else "–")
        key = (r["bucket"], name)
        tokens[key] = tokens.get(key, 0.0) + r["input_tokens"] + r["output_tokens"]
        cost[key] = cost.get(key, 0.0) + (r["cost_usd"] or 0.0)
        totals[name] = totals.get(name, 0.0) + r["input_tokens"] + r["output_tokens"]
        unpriced.update(str(m) for m in r["unpriced_models"])
    series = sorted(totals, key=lambda n: -totals[n])
    label = (
        (lambda b: b.strftime("%m-%d %H:%M"))
        if bucket == "hour"
        else (lambda b: b.strftime("%Y-%m-%d"))
    )
    return UsageCharts(
        series=series,
        tokens=charts.stacked_bars(buckets, series, tokens, value_label=count, bucket_label=label),
        cost=charts.stacked_bars(buckets, series, cost, value_label=usd, bucket_label=label),
        unpriced=sorted(unpriced),
    )
