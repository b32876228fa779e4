"""How a run reads to an operator, shared by the CLI and the run inspector: time filters, which
attempt executed each step and how often it was replayed, in-doubt steps, step nesting."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

from ._errors import ConfigurationError
from ._store import EventRecord, RunRecord, StepRecord
from ._store.rows import lease_is_live
from ._vocab import EventKind, StepStatus

_SINCE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

#: The events that start an attempt: an executor took the run's lease.
ACQUISITIONS = (
    EventKind.RUN_STARTED,
    EventKind.RUN_RESUMED,
    EventKind.LEASE_TAKEN_OVER,
    EventKind.RUN_CLAIMED,
)


def parse_since(value: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``30m``, ``2h``, ``7d`` before ``now``, or an ISO-8601 timestamp (UTC without offset)."""
    if not value:
        return None
    m = _SINCE.match(value)
    if m:
        now = now or dt.datetime.now(dt.timezone.utc)
        return now - dt.timedelta(**{_UNITS[m[2]]: int(m[1])})
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"{value!r} is neither a duration (30m, 2h, 7d) nor an ISO timestamp"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def error_text(error: Any) -> str:
    """A stored error record (a dict with a type or failure class and a message) as one line,
    the type without its module."""
    if isinstance(error, dict):
        head = error.get("failure_class") or str(error.get("type", "")).rpartition(".")[2]
        message = str(error.get("message", ""))
        return f"{head}: {message}" if head and message else head or message
    return "" if error is None else str(error)


def attempts(events: Sequence[EventRecord]) -> tuple[dict[int, int], dict[int, int]]:
    """(lease token -> attempt number, event seq -> the attempt that wrote it), counted from
    the events of each acquisition."""
    by_token: dict[int, int] = {}
    by_seq: dict[int, int] = {}
    n = 0
    for e in events:
        if e.kind in ACQUISITIONS:
            n += 1
            data = e.data if isinstance(e.data, dict) else {}
            by_token[int(data.get("token", 1 if e.kind == EventKind.RUN_STARTED else n))] = n
        by_seq[e.seq] = max(n, 1)
    return by_token, by_seq


@dataclasses.dataclass(frozen=True)
class StepReading:
    """One step as an operator reads it.

    ``attempt`` executed it (wrote its checkpoint); ``replays`` later attempts returned its
    recorded output instead. ``in_doubt``: a step left ``running`` by an executor that is gone,
    so whether its effect happened is unknown (R5). ``depth`` counts the recorded steps it is
    nested in (names are ``/``-separated scopes); ``parent`` is the innermost one.
    """

    step: StepRecord
    attempt: int
    replays: int
    in_doubt: bool
    depth: int
    parent: str | None


def read_steps(
    run: RunRecord,
    steps: Sequence[StepRecord],
    events: Sequence[EventRecord],
    now: dt.datetime,
) -> list[StepReading]:
    """The run's steps in tree order: each after its parent, siblings by start time."""
    by_token, _ = attempts(events)
    live = lease_is_live(run, now)
    names = {s.name for s in steps}
    order = {s.name: i for i, s in enumerate(steps)}

    def ancestors(name: str) -> list[str]:
        parts = name.split("/")
        prefixes = ("/".join(parts[:i]) for i in range(1, len(parts)))
        return [p for p in prefixes if p in names]

    readings: dict[str, StepReading] = {}
    for s in steps:
        attempt = by_token.get(s.lease_token, s.lease_token)
        outer = ancestors(s.name)
        readings[s.name] = StepReading(
            step=s,
            attempt=attempt,
            replays=max(run.attempts - attempt, 0) if s.status == StepStatus.COMPLETED else 0,
            in_doubt=s.status == StepStatus.RUNNING
            and not (live and s.lease_token == run.lease_token),
            depth=len(outer),
            parent=outer[-1] if outer else None,
        )

    def started(name: str) -> tuple[dt.datetime, int]:
        step = readings[name].step
        return (step.started_at or run.created_at, order[name])

    def path(name: str) -> list[tuple[dt.datetime, int]]:
        return [started(a) for a in ancestors(name)] + [started(name)]

    return [readings[name] for name in sorted(readings, key=path)]
