"""What the store hands out and takes in: plain frozen records, no database types."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from .._vocab import EventKind, HolderDeath, ReplayPolicy, RunStatus, StepStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run as stored: its status, recorded arguments and result, lease and queue fields."""

    run_id: str
    pipeline: str
    status: RunStatus
    input: Any
    input_hash: str | None
    output: Any
    error: Any
    attempts: int
    lease_owner: str | None
    lease_token: int
    lease_expires_at: dt.datetime | None
    event_seq: int
    state_version: int
    queue: str | None
    dedupe_key: str | None
    priority: int
    scheduled_at: dt.datetime | None
    max_attempts: int | None
    deadline: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    #: The holder's process identity (:mod:`.holders`) and, on PostgreSQL, the key of the
    #: advisory lock its database session holds: how a dead holder is told from a live one.
    lease_process: str | None = None
    lease_session: int | None = None


@dataclasses.dataclass(frozen=True)
class DeadHolder:
    """A running run's holder found dead: its lease token, and how it was found dead."""

    token: int
    how: HolderDeath


@dataclasses.dataclass(frozen=True, order=True)
class RunCursor:
    """Where a page of runs ends, in their order: newest ``created_at`` first, then ``run_id``."""

    created_at: dt.datetime
    run_id: str


@dataclasses.dataclass(frozen=True)
class RunPage:
    """A page of runs, newest first; ``next`` is where the following page starts (None at the
    end)."""

    runs: list[RunRecord]
    next: RunCursor | None


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """A step's checkpoint as stored (also what a step write sends).

    ``lease_token`` is the fencing token of the execution that wrote it, which tells which
    attempt of the run executed the step. ``input`` is what the step was called with, for
    people to read (bounded; replay decides by ``input_hash``).
    """

    name: str
    status: StepStatus
    input_hash: str
    input_parts: dict[str, str] | None = None
    output: Any = None
    error: Any = None
    side_effects: list[str] | None = None
    idempotency_key: str | None = None
    keyed: bool = False
    replay: ReplayPolicy = ReplayPolicy.AUTO
    attempts: int = 1
    lease_token: int = 0
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    duration_ms: float | None = None
    input: Any = None


@dataclasses.dataclass(frozen=True)
class StepsReset:
    """What resetting a run at ``step`` did (P5): the checkpoints it discarded (in recording
    order), how many state versions it dropped and usage records it set aside as ``lost``,
    and the run's status afterwards."""

    run_id: str
    step: str
    discarded: list[str]
    state_versions_discarded: int
    usage_superseded: int
    status: RunStatus


@dataclasses.dataclass(frozen=True)
class EventRecord:
    """One entry of a run's append-only event log (R11)."""

    run_id: str
    seq: int
    kind: str
    step: str | None
    data: Any
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class UsageRecord:
    """Tokens spent, recorded once: ``dedupe_key`` makes re-recording it a no-op (R9)."""

    dedupe_key: str
    step: str | None = None
    kind: str = "llm"
    provider: str | None = None
    model: str | None = None
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None
    #: Spent on work a later attempt did again instead of reusing it (billed, not used).
    lost: bool = False


@dataclasses.dataclass(frozen=True)
class StateVersion:
    """One version of a run's state (R10)."""

    version: int
    value: Any
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Event:
    """An event to append with a write."""

    kind: EventKind
    step: str | None = None
    data: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Lease:
    """What an executor holds: the run and its fencing token."""

    run_id: str
    token: int
    owner: str


@dataclasses.dataclass(frozen=True)
class Acquired:
    """What acquiring a run gives: a completed run, or a lease plus every checkpoint."""

    run: RunRecord
    lease: Lease | None
    steps: dict[str, StepRecord]


@dataclasses.dataclass(frozen=True)
class NewRun:
    """A run to create (or resume) under a lease: what the caller knows about it."""

    run_id: str
    pipeline: str
    owner: str
    lease_seconds: float
    input: Any = None
    input_hash: str | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
    """A run a worker claimed: execute it with the worker's owner and ``token`` as its lease."""

    run_id: str
    pipeline: str
    queue: str | None
    token: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class QueuedRun:
    """A run to record on a queue (P1)."""

    run_id: str
    pipeline: str
    input: Any
    input_hash: str | None
    queue: str
    dedupe_key: str | None
    priority: int
    scheduled_at: dt.datetime
    max_attempts: int
    deadline: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class ApprovalRecord:
    """A tool call an agent step stopped on, and its decision once a person made one."""

    run_id: str
    step: str
    call_id: str
    agent: str
    tool: str
    arguments: str | None
    decision: str | None
    always: bool
    message: str | None
    created_at: dt.datetime
    decided_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class MessageRecord:
    """A message sent to a run on a topic; ``consumed_by`` names the wait step that took it."""

    id: int
    run_id: str
    topic: str
    payload: Any
    created_at: dt.datetime
    consumed_by: str | None
    consumed_at: dt.datetime | None


@dataclasses.dataclass
class ReconcileReport:
    """What one reconciler pass did; ``elected`` is False when another reconciler acted."""

    elected: bool
    requeued: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    cancelled: list[str] = dataclasses.field(default_factory=list)


def fields_of(record: Any) -> dict[str, Any]:
    """A record's fields as a dict, without ``dataclasses.asdict``'s deep copy of payloads."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def run_from_mapping(m: Any) -> RunRecord:
    """A :class:`RunRecord` from a row mapping holding (at least) every run column."""
    values = {name: m[name] for name in RUN_FIELDS}
    values["status"] = RunStatus(values["status"])
    return RunRecord(**values)


def step_from_mapping(m: Any) -> StepRecord:
    """A :class:`StepRecord` from a row mapping holding every step column."""
    values = {name: m[name] for name in STEP_FIELDS}
    values["status"] = StepStatus(values["status"])
    values["replay"] = ReplayPolicy(values["replay"])
    return StepRecord(**values)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))
STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepRecord))
USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
