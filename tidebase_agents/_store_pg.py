"""PostgreSQL single-round-trip writes.

Each fenced write of an executing run (a step, a state version, usage, the run's end) is one
statement: a data-modifying CTE that bumps the run's event counter only while the caller's
lease holds, and inserts the step, events and usage rows from that same row, executed in
autocommit. It does what :class:`~tidebase_agents._store.Store`'s portable transaction does
(fence, write, gap-free events) in one round trip instead of five.

These statements go out on a few long-lived driver connections (:class:`WriterPool`): a pool
checkout through SQLAlchemy costs several times the client work of the statement itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from ._models import EventRow, RunRow, StateRow, StepRow, UsageRow

RUNS = RunRow.__tablename__
STEPS = StepRow.__tablename__
EVENTS = EventRow.__tablename__
STATE = StateRow.__tablename__
USAGE = UsageRow.__tablename__


def jsonb(value: Any) -> str | None:
    """A JSONB parameter (the asyncpg codec SQLAlchemy installs takes JSON text)."""
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _fence(extra: str = "") -> str:
    # $1 run_id, $2 lease token, $3 number of events, $4 now
    return (
        f"fence AS (UPDATE {RUNS} SET event_seq = event_seq + $3, updated_at = $4{extra} "
        f"WHERE run_id = $1 AND lease_token = $2 AND status = 'running' RETURNING event_seq)"
    )


def _events(param: int) -> str:
    return (
        f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, step, data, created_at) "
        f"SELECT $1, fence.event_seq - $3 + e.ord, e.kind, e.step, e.data, $4 "
        f"FROM fence, jsonb_to_recordset(${param}::jsonb) "
        f"AS e(ord int, kind text, step text, data jsonb))"
    )


# The fields of ``_store.Usage``, in order.
_USAGE_COLS = [
    "dedupe_key",
    "step",
    "kind",
    "provider",
    "model",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
]
_USAGE_TYPES = (
    "dedupe_key text, step text, kind text, provider text, model text, requests int, "
    "input_tokens bigint, output_tokens bigint, cached_tokens bigint, reasoning_tokens bigint, "
    "total_tokens bigint, cost_usd float8"
)


def _usage(param: int) -> str:
    cols = ", ".join(_USAGE_COLS)
    picked = ", ".join(f"u.{c}" for c in _USAGE_COLS)
    return (
        f"us AS (INSERT INTO {USAGE} (run_id, {cols}, created_at) "
        f"SELECT $1, {picked}, $4 FROM fence, jsonb_to_recordset(${param}::jsonb) "
        f"AS u({_USAGE_TYPES}) ON CONFLICT (run_id, dedupe_key) DO NOTHING)"
    )


_STEP_COLS = [
    "name",
    "status",
    "input_hash",
    "input_parts",
    "output",
    "error",
    "side_effects",
    "idempotency_key",
    "keyed",
    "replay",
    "attempts",
    "started_at",
    "completed_at",
    "duration_ms",
]
_STEP_JSON = {"input_parts", "output", "error", "side_effects"}

WRITE_STEP = (
    f"WITH {_fence()}, "
    f"step AS (INSERT INTO {STEPS} (run_id, lease_token, {', '.join(_STEP_COLS)}) "
    f"SELECT $1, $2, "
    + ", ".join(
        f"${i}::jsonb" if c in _STEP_JSON else f"${i}" for i, c in enumerate(_STEP_COLS, start=5)
    )
    + " FROM fence ON CONFLICT (run_id, name) DO UPDATE SET "
    + ", ".join(
        f"{c} = EXCLUDED.{c}"
        for c in ["lease_token", *_STEP_COLS]
        if c not in ("name", "started_at")
    )
    + f"), {_events(19)}, {_usage(20)} SELECT event_seq FROM fence"
)

_FINISH_SETS = (
    ", status = $5, output = $6::jsonb, error = $7::jsonb, lease_owner = NULL, "
    "lease_expires_at = NULL, finished_at = $8"
)
FINISH = f"WITH {_fence(_FINISH_SETS)}, {_events(9)} SELECT event_seq FROM fence"

APPEND_STATE = (
    f"WITH {_fence(', state_version = $5')}, "
    f"st AS (INSERT INTO {STATE} (run_id, version, value, created_at) "
    f"SELECT $1, $5, $6::jsonb, $4 FROM fence), "
    f"{_events(7)} SELECT event_seq FROM fence"
)

RECORD_USAGE = f"WITH {_fence()}, {_usage(5)} SELECT event_seq FROM fence"

CREATE_RUN = (
    f"WITH ins AS (INSERT INTO {RUNS} (run_id, pipeline, status, input, input_hash, attempts, "
    f"lease_owner, lease_token, lease_expires_at, event_seq, created_at, updated_at) "
    f"VALUES ($1, $2, 'running', $3::jsonb, $4, 1, $5, 1, $6, 1, $7, $7) "
    f"ON CONFLICT (run_id) DO NOTHING RETURNING run_id), "
    f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, data, created_at) "
    f"SELECT run_id, 1, 'run_started', $8::jsonb, $7 FROM ins) "
    f"SELECT run_id FROM ins"
)

# Take the lease of an existing run that may be (re)started: queued, retryable, parked, or
# running under an expired lease. Anything else (a live lease, an ended run, another pipeline
# or other arguments) matches no row and is sorted out by the portable transaction.
TAKEOVER_RUN = (
    f"WITH o AS (SELECT status AS old_status, lease_owner AS old_owner FROM {RUNS} "
    f"WHERE run_id = $1), "
    f"upd AS (UPDATE {RUNS} r SET status = 'running', lease_owner = $3, "
    f"lease_token = r.lease_token + 1, lease_expires_at = $4, attempts = r.attempts + 1, "
    f"event_seq = r.event_seq + 1, updated_at = $5, input = COALESCE(r.input, $6::jsonb), "
    f"input_hash = COALESCE(r.input_hash, $7) FROM o "
    f"WHERE r.run_id = $1 AND r.pipeline = $2 "
    f"AND ($7::text IS NULL OR r.input_hash IS NULL OR r.input_hash = $7) "
    f"AND (r.status IN ('queued', 'failed_retryable', 'manual_review') "
    f"OR (r.status = 'running' AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= $5))) "
    f"RETURNING r.*, o.old_status, o.old_owner), "
    f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, data, created_at) "
    f"SELECT run_id, event_seq, CASE WHEN old_status = 'running' THEN 'lease_taken_over' "
    f"ELSE 'run_resumed' END, jsonb_build_object('owner', $3::text, 'from_status', old_status, "
    f"'previous_owner', old_owner, 'token', lease_token), $5 FROM upd) "
    f"SELECT * FROM upd"
)


def events_param(events: Sequence[Any]) -> str:
    return json.dumps(
        [
            {"ord": i, "kind": e.kind, "step": e.step, "data": e.data}
            for i, e in enumerate(events, 1)
        ],
        separators=(",", ":"),
    )


def usage_param(usage: Sequence[Any]) -> str:
    return json.dumps([shallow_fields(u) for u in usage], separators=(",", ":"))


def shallow_fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, without ``dataclasses.asdict``'s deep copy of payloads."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def step_params(step: Any, now: dt.datetime, output_json: str | None) -> list[Any]:
    values = shallow_fields(step)
    values["started_at"] = values["started_at"] or now
    params = [
        jsonb(values[c]) if c in _STEP_JSON and c != "output" else values[c] for c in _STEP_COLS
    ]
    params[_STEP_COLS.index("output")] = (
        output_json if output_json is not None else jsonb(step.output)
    )
    return params


class WriterPool:
    """A few long-lived asyncpg connections for the single-statement writes."""

    def __init__(self, dsn: str, size: int = 4) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            except BaseException:
                # Interrupted mid-statement (cancelled, connection lost): don't reuse it.
                conn.terminate()
                raise
            self._idle.append(conn)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn)
        # JSON parameters are passed as text, as the statements above expect.
        await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog")
        return conn

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
