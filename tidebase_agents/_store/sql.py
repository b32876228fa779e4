"""Named SQL statements, each with a line saying what it does.

The PostgreSQL statements are the executing run's writes, each one round trip: a data-modifying
CTE ``fence`` bumps the run's event counter only while the caller's lease holds (and hands out
the event numbers), and the rows of the write are inserted from that same row. Parameters are
asyncpg's ``$n``; ``$1`` is always the run id, ``$2`` the lease token, ``$3`` the number of
events the write appends and ``$4`` the time of the write.
"""

from __future__ import annotations

from .._vocab import RESTARTABLE_RUN_STATUSES, EventKind, RunStatus, StepStatus, sql_list
from .records import STEP_FIELDS, USAGE_FIELDS
from .tables import (
    ApprovalRow,
    EventRow,
    MessageRow,
    RunRow,
    StateRow,
    StepRow,
    UsageDailyRow,
    UsageRow,
)

RUNS = RunRow.__tablename__
STEPS = StepRow.__tablename__
EVENTS = EventRow.__tablename__
STATE = StateRow.__tablename__
USAGE = UsageRow.__tablename__
USAGE_DAILY = UsageDailyRow.__tablename__
APPROVALS = ApprovalRow.__tablename__
MESSAGES = MessageRow.__tablename__


def takeover_rule(now: str, dead_token: str) -> str:
    """The one rule for who may take a run over: it is restartable (queued, retryable,
    parked), or running under a lease that expired by ``now``, or under the token
    ``dead_token`` of a holder found dead (placeholders; a NULL token matches nothing)."""
    return (
        f"(status IN {sql_list(RESTARTABLE_RUN_STATUSES)} OR (status = '{RunStatus.RUNNING}' "
        f"AND (lease_expires_at IS NULL OR lease_expires_at <= {now} "
        f"OR lease_token = {dead_token})))"
    )


def same_input(input_hash: str) -> str:
    """The run was recorded with these arguments, or without any."""
    return f"({input_hash} IS NULL OR input_hash IS NULL OR input_hash = {input_hash})"


def _fence(extra: str = "") -> str:
    return (
        f"fence AS (UPDATE {RUNS} SET event_seq = event_seq + $3, updated_at = $4{extra} "
        f"WHERE run_id = $1 AND lease_token = $2 AND status = '{RunStatus.RUNNING}' "
        f"RETURNING event_seq)"
    )


def _events(param: int) -> str:
    # The events of a write: a JSON array of {ord, kind, step, data}, numbered after the fence.
    return (
        f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, step, data, created_at) "
        f"SELECT $1, fence.event_seq - $3 + e.ord, e.kind, e.step, e.data, $4 "
        f"FROM fence, jsonb_to_recordset(${param}::jsonb) "
        f"AS e(ord int, kind text, step text, data jsonb))"
    )


_USAGE_TYPES = {
    "lost": "boolean",
    "dedupe_key": "text",
    "step": "text",
    "kind": "text",
    "provider": "text",
    "model": "text",
    "requests": "int",
    "input_tokens": "bigint",
    "output_tokens": "bigint",
    "cached_tokens": "bigint",
    "reasoning_tokens": "bigint",
    "total_tokens": "bigint",
    "cost_usd": "float8",
}


def _usage(param: int) -> str:
    # Usage records: a JSON array of UsageRecord fields; an existing dedupe key is skipped (R9).
    cols = ", ".join(USAGE_FIELDS)
    picked = ", ".join(f"u.{c}" for c in USAGE_FIELDS)
    types = ", ".join(f"{c} {_USAGE_TYPES[c]}" for c in USAGE_FIELDS)
    return (
        f"us AS (INSERT INTO {USAGE} (run_id, {cols}, created_at) "
        f"SELECT $1, {picked}, $4 FROM fence, jsonb_to_recordset(${param}::jsonb) "
        f"AS u({types}) ON CONFLICT (run_id, dedupe_key) DO NOTHING)"
    )


#: Step columns a step write sends, in parameter order after the four fence parameters.
STEP_WRITE_COLUMNS = [c for c in STEP_FIELDS if c != "lease_token"]
STEP_JSON_COLUMNS = frozenset({"input_parts", "output", "error", "side_effects", "input"})
_STEP_PARAMS = ", ".join(
    f"${i}::jsonb" if c in STEP_JSON_COLUMNS else f"${i}"
    for i, c in enumerate(STEP_WRITE_COLUMNS, start=5)
)
_STEP_UPDATES = ", ".join(
    f"{c} = EXCLUDED.{c}"
    for c in ["lease_token", *STEP_WRITE_COLUMNS]
    if c not in ("name", "started_at")
)
_AFTER_STEP = 5 + len(STEP_WRITE_COLUMNS)


def _write_step(result: str) -> str:
    return (
        f"WITH {_fence()}, "
        f"step AS (INSERT INTO {STEPS} (run_id, lease_token, {', '.join(STEP_WRITE_COLUMNS)}) "
        f"SELECT $1, $2, {_STEP_PARAMS} FROM fence "
        f"ON CONFLICT (run_id, name) DO UPDATE SET {_STEP_UPDATES}), "
        f"{_events(_AFTER_STEP)}, {_usage(_AFTER_STEP + 1)}, "
        f"lost AS (UPDATE {USAGE} u SET lost = true FROM fence, "
        f"jsonb_to_recordset(${_AFTER_STEP + 1}::jsonb) AS n(dedupe_key text, step text) "
        f"WHERE u.run_id = $1 AND u.step = n.step AND u.dedupe_key <> n.dedupe_key), "
        f"drop_nested AS (DELETE FROM {STEPS} d USING fence WHERE ${_AFTER_STEP + 2}::text IS NOT "
        f"NULL AND d.run_id = $1 AND d.name LIKE ${_AFTER_STEP + 2} ESCAPE '\\' "
        f"AND d.name LIKE ${_AFTER_STEP + 3} ESCAPE '\\') "
        f"{result}"
    )


#: Write a step (insert, or update its earlier record) with its events and usage; usage an
#: earlier execution recorded for the same steps is marked lost (billed, superseded). With a
#: LIKE pattern in the last parameter, also drop the step's transient nested checkpoints.
WRITE_STEP = _write_step("SELECT event_seq FROM fence")
#: WRITE_STEP as one write of a batch: it fails (division by zero) unless its fence held, so a
#: batch holding a stale lease lands nothing.
WRITE_STEP_CHECKED = _write_step("SELECT 1 / count(*) FROM fence")

#: Delete the steps named in $5 (a text array), with the write's events ($6).
DELETE_STEPS = (
    f"WITH {_fence()}, del AS (DELETE FROM {STEPS} d USING fence WHERE d.run_id = $1 "
    f"AND d.name = ANY($5::text[])), {_events(6)} SELECT event_seq FROM fence"
)


def like_escaped(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (backslash is the escape character)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def transient_patterns(step: str, marker: str) -> tuple[str, str]:
    """LIKE patterns that together match ``step``'s nested checkpoints with a name segment
    starting with ``marker``: below the step, and a segment that starts so."""
    return f"{like_escaped(step)}/%", f"%/{like_escaped(marker)}%"


#: End an execution: set the run's status, output and error, release the lease, log the end.
_FINISH_SETS = (
    ", status = $5, output = $6::jsonb, error = $7::jsonb, lease_owner = NULL, "
    "lease_expires_at = NULL, finished_at = $8"
)
FINISH = f"WITH {_fence(_FINISH_SETS)}, {_events(9)} SELECT event_seq FROM fence"

#: Append a state version ($5) with its value ($6) and event ($7).
APPEND_STATE = (
    f"WITH {_fence(', state_version = $5')}, "
    f"st AS (INSERT INTO {STATE} (run_id, version, value, created_at) "
    f"SELECT $1, $5, $6::jsonb, $4 FROM fence), "
    f"{_events(7)} SELECT event_seq FROM fence"
)

#: Record usage ($5) under the lease.
RECORD_USAGE = f"WITH {_fence()}, {_usage(5)} SELECT event_seq FROM fence"

#: Extend the lease ($5 the new expiry) while it holds.
EXTEND_LEASE = f"WITH {_fence(', lease_expires_at = $5')} SELECT event_seq FROM fence"

#: Run $1 as stored.
GET_RUN = f"SELECT * FROM {RUNS} WHERE run_id = $1"

#: Read the fence's inputs: is the run still running under this token?
LEASE_STATE = f"SELECT status, lease_token FROM {RUNS} WHERE run_id = $1"

#: Create a run ($1, pipeline $2) under its first lease (owner $5, expiry $6, now $7, holder
#: process $9 and session $10) with its arguments ($3, hash $4) and its first event ($8);
#: nothing if the id exists.
CREATE_RUN = (
    f"WITH ins AS (INSERT INTO {RUNS} (run_id, pipeline, status, input, input_hash, attempts, "
    f"lease_owner, lease_token, lease_expires_at, lease_process, lease_session, event_seq, "
    f"created_at, updated_at) "
    f"VALUES ($1, $2, '{RunStatus.RUNNING}', $3::jsonb, $4, 1, $5, 1, $6, $9, $10, 1, $7, $7) "
    f"ON CONFLICT (run_id) DO NOTHING RETURNING *), "
    f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, data, created_at) "
    f"SELECT run_id, 1, '{EventKind.RUN_STARTED}', $8::jsonb, $7 FROM ins) "
    f"SELECT * FROM ins"
)

#: Take the lease of run $1 of pipeline $2 for owner $3 until $4 (now $5; arguments $6, hash
#: $7; holder process $9 and session $10) if the takeover rule allows it (its holder under
#: token $8 was found dead, how: $11), logging a resume or a takeover; no row otherwise.
TAKE_OVER = (
    f"WITH o AS (SELECT status AS old_status, lease_owner AS old_owner FROM {RUNS} "
    f"WHERE run_id = $1), "
    f"upd AS (UPDATE {RUNS} r SET status = '{RunStatus.RUNNING}', lease_owner = $3, "
    f"lease_token = r.lease_token + 1, lease_expires_at = $4, lease_process = $9, "
    f"lease_session = $10, attempts = r.attempts + 1, "
    f"event_seq = r.event_seq + 1, updated_at = $5, input = COALESCE(r.input, $6::jsonb), "
    f"input_hash = COALESCE(r.input_hash, $7) FROM o "
    f"WHERE r.run_id = $1 AND r.pipeline = $2 AND {same_input('$7::text')} "
    f"AND {takeover_rule('$5', '$8::bigint')} "
    f"RETURNING r.*, o.old_status, o.old_owner), "
    f"ev AS (INSERT INTO {EVENTS} (run_id, seq, kind, data, created_at) "
    f"SELECT run_id, event_seq, CASE WHEN old_status = '{RunStatus.RUNNING}' "
    f"THEN '{EventKind.LEASE_TAKEN_OVER}' ELSE '{EventKind.RUN_RESUMED}' END, "
    f"jsonb_build_object('owner', $3::text, 'from_status', old_status, "
    f"'previous_owner', old_owner, 'token', lease_token, 'holder_dead', $11::text), $5 "
    f"FROM upd) "
    f"SELECT * FROM upd"
)

#: Which of the advisory lock keys $1 (a bigint array) no session holds: each is taken and
#: given back at once on this connection (OFFSET 0 keeps the two calls in that order).
SESSIONS_GONE = (
    "SELECT coalesce(array_agg(k), '{}') AS gone FROM (SELECT k FROM unnest($1::bigint[]) "
    "AS k WHERE pg_try_advisory_lock(k) OFFSET 0) AS f WHERE pg_advisory_unlock(k)"
)

#: Take the lease of run :run_id (SQLite; the caller logs the event in the same transaction).
SQLITE_TAKE_OVER = (
    f"UPDATE {RUNS} SET status = '{RunStatus.RUNNING}', lease_owner = :owner, "
    f"lease_token = lease_token + 1, lease_expires_at = :expires, lease_process = :process, "
    f"lease_session = NULL, attempts = attempts + 1, "
    f"event_seq = event_seq + 1, updated_at = :now, input = COALESCE(input, :input), "
    f"input_hash = COALESCE(input_hash, :input_hash) "
    f"WHERE run_id = :run_id AND pipeline = :pipeline AND {same_input(':input_hash')} "
    f"AND {takeover_rule(':now', ':dead_token')} RETURNING *"
)

_ROLLUP_SUMS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "records",
    "lost_tokens",
    "recorded_cost",
    "unpriced_input",
    "unpriced_output",
    "unpriced_cached",
)
_ROLLED = ", ".join(f"{c} = d.{c} + EXCLUDED.{c}" for c in _ROLLUP_SUMS)

#: One retention batch, one statement: pick up to $4 runs in statuses $1 that ended before $2
#: (of pipelines $3, all if empty), skipping locked rows; add their usage to the daily rollups
#: (``retention.epoch_day``'s UTC days) and delete them with every row recorded for them.
PRUNE_BATCH = (
    f"WITH picked AS (SELECT run_id, pipeline FROM {RUNS} WHERE status = ANY($1::text[]) "
    f"AND finished_at < $2 AND (cardinality($3::text[]) = 0 OR pipeline = ANY($3::text[])) "
    f"ORDER BY finished_at LIMIT $4 FOR UPDATE SKIP LOCKED), "
    f"rolled AS (INSERT INTO {USAGE_DAILY} AS d (day, pipeline, model, "
    f"{', '.join(_ROLLUP_SUMS)}) "
    f"SELECT (floor(extract(epoch FROM u.created_at) / 86400) * 86400)::bigint, p.pipeline, "
    f"coalesce(u.model, ''), sum(u.requests), sum(u.input_tokens), sum(u.output_tokens), "
    f"sum(u.cached_tokens), sum(u.reasoning_tokens), sum(u.total_tokens), count(*), "
    f"sum(CASE WHEN u.lost THEN u.total_tokens ELSE 0 END), coalesce(sum(u.cost_usd), 0), "
    f"sum(CASE WHEN u.cost_usd IS NULL THEN u.input_tokens ELSE 0 END), "
    f"sum(CASE WHEN u.cost_usd IS NULL THEN u.output_tokens ELSE 0 END), "
    f"sum(CASE WHEN u.cost_usd IS NULL THEN u.cached_tokens ELSE 0 END) "
    f"FROM {USAGE} u JOIN picked p ON p.run_id = u.run_id GROUP BY 1, 2, 3 "
    f"ON CONFLICT (day, pipeline, model) DO UPDATE SET {_ROLLED}), "
    + ", ".join(
        f"d_{t} AS (DELETE FROM {t} x USING picked p WHERE x.run_id = p.run_id)"
        for t in (USAGE, STEPS, EVENTS, STATE, APPROVALS, MESSAGES)
    )
    + f", gone AS (DELETE FROM {RUNS} r USING picked p WHERE r.run_id = p.run_id RETURNING 1) "
    f"SELECT count(*) AS n FROM gone"
)


# -- SQLite: the executing run's writes as plain statements, run in one transaction each -----
# (sqlite_writer.SQLiteWriter). Named parameters; datetimes are text, JSON columns JSON text.


def sqlite_fence(extra: str = "") -> str:
    """Bump the run's event counter by :n (setting ``extra`` too) while the lease :token holds
    run :run_id; returns the last sequence number handed out, or no row."""
    return (
        f"UPDATE {RUNS} SET event_seq = event_seq + :n, updated_at = :now{extra} "
        f"WHERE run_id = :run_id AND lease_token = :token AND status = '{RunStatus.RUNNING}' "
        f"RETURNING event_seq"
    )


SQLITE_FENCE = sqlite_fence()
#: End an execution: status, output, error, finished_at; the lease released.
SQLITE_FINISH = sqlite_fence(
    ", status = :status, output = :output, error = :error, lease_owner = NULL, "
    "lease_expires_at = NULL, finished_at = :finished_at"
)
SQLITE_APPEND_STATE_FENCE = sqlite_fence(", state_version = :version")
SQLITE_EXTEND_LEASE = sqlite_fence(", lease_expires_at = :expires")
SQLITE_LEASE_STATE = f"SELECT status, lease_token FROM {RUNS} WHERE run_id = ?"

#: Insert a step, or update its earlier record (every column but the key and started_at).
SQLITE_WRITE_STEP = (
    f"INSERT INTO {STEPS} (run_id, {', '.join(STEP_FIELDS)}) "
    f"VALUES (:run_id, {', '.join(':' + c for c in STEP_FIELDS)}) "
    f"ON CONFLICT (run_id, name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in STEP_FIELDS if c not in ("name", "started_at"))
)
SQLITE_INSERT_EVENT = (
    f"INSERT INTO {EVENTS} (run_id, seq, kind, step, data, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
#: Mark usage an earlier execution recorded for a step lost (superseded by this record).
SQLITE_USAGE_LOST = f"UPDATE {USAGE} SET lost = 1 WHERE run_id = ? AND step = ? AND dedupe_key != ?"
#: Record usage; a dedupe key already recorded is skipped (R9).
SQLITE_INSERT_USAGE = (
    f"INSERT INTO {USAGE} (run_id, {', '.join(USAGE_FIELDS)}, created_at) "
    f"VALUES (?, {', '.join('?' for _ in USAGE_FIELDS)}, ?) "
    f"ON CONFLICT (run_id, dedupe_key) DO NOTHING"
)
#: Drop a step's transient nested checkpoints (two LIKE patterns, see transient_patterns).
SQLITE_DROP_NESTED = (
    f"DELETE FROM {STEPS} WHERE run_id = ? AND name LIKE ? ESCAPE '\\' AND name LIKE ? ESCAPE '\\'"
)
SQLITE_MARK_KEYED = (
    f"UPDATE {STEPS} SET keyed = 1 WHERE run_id = ? AND name = ? "
    f"AND status = '{StepStatus.RUNNING}'"
)
SQLITE_INSERT_STATE = (
    f"INSERT INTO {STATE} (run_id, version, value, created_at) VALUES (?, ?, ?, ?)"
)
#: Create a run under its first lease; nothing if the id exists.
SQLITE_CREATE_RUN = (
    f"INSERT INTO {RUNS} (run_id, pipeline, status, input, input_hash, attempts, lease_owner, "
    f"lease_token, lease_expires_at, lease_process, event_seq, created_at, updated_at) "
    f"VALUES (:run_id, :pipeline, '{RunStatus.RUNNING}', :input, :input_hash, 1, :owner, 1, "
    f":expires, :process, 1, :now, :now) ON CONFLICT (run_id) DO NOTHING RETURNING *"
)
SQLITE_OLD_HOLDER = f"SELECT status, lease_owner FROM {RUNS} WHERE run_id = ?"
