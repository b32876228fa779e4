"""The ``Tidebase`` facade: the composition root that hands the engine a store and settings.

Everything above it (the decorators, the worker, the CLI) goes through it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

from . import _codec, _ids
from ._config import (
    redact,
    resolve_database_url,
    resolve_schema,
    resolve_synchronous,
    setting,
    url_of_engine,
)
from ._engine import EngineSettings, Run, execute_run
from ._errors import ConfigurationError
from ._hashing import sha256_hex
from ._ids import new_run_id, process_owner, validate_run_id, validate_step_name
from ._pricing import load_prices, parse_group_by, usage_report
from ._store import (
    DEFAULT_QUEUE,
    RUN_COUNT_KEYS,
    ApprovalRecord,
    EventRecord,
    MessageRecord,
    NewRun,
    QueuedRun,
    RunCursor,
    RunPage,
    RunRecord,
    StateVersion,
    StepRecord,
    StepsReset,
    Store,
    UsageRecord,
    get_store,
    utcnow,
)
from ._store.queue import DEFAULT_MAX_ATTEMPTS
from ._store.retention import PRUNE_BATCH, PruneFilter
from ._vocab import (
    PRUNABLE_RUN_STATUSES,
    ApprovalDecision,
    ReviewAction,
    RunStatus,
    SQLiteSynchronous,
    parse,
)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 (the input of a pipeline function)


def _sdk_installed() -> None:
    # Load the Agents SDK integration when an application defines its pipelines or starts a
    # run, before any lease is held: a first import inside a run would stall its heartbeat.
    from ._sdk import install

    install()


def _seconds(value: float | dt.timedelta | None, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value or 0)
    if seconds < 0:
        raise ConfigurationError(f"{what} must not be negative")
    return seconds


def _deadline(value: dt.datetime | dt.timedelta | None, now: dt.datetime) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        return now + value
    if value.tzinfo is None:
        raise ConfigurationError("deadline must be a timezone-aware datetime or a timedelta")
    return value


def _check_name(value: str | None, what: str, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ConfigurationError(f"{what} must be a string of 1 to 255 characters, got {value!r}")


class Tidebase:
    """Durable runs and steps in your own database (alias: ``AsyncTidebase``).

    ``database_url`` defaults to ``$TIDEBASE_DATABASE_URL``, else an embedded SQLite file
    ``./tidebase.db`` created and migrated on first use. ``engine`` is an application's
    SQLAlchemy ``Engine`` or ``AsyncEngine`` to take the URL and credentials from: the library
    opens its own connections (asyncpg on PostgreSQL) and never uses, changes or disposes the
    engine. On PostgreSQL the tables live in ``schema`` (default ``$TIDEBASE_SCHEMA``, else
    ``tidebase``). Settings left unset come from ``$TIDEBASE_LEASE_SECONDS``,
    ``$TIDEBASE_HEARTBEAT_SECONDS``, ``$TIDEBASE_RETRY_BACKOFF`` and
    ``$TIDEBASE_MAX_PAYLOAD_BYTES``, else their defaults (30 s, a third of the lease, 0.2 s,
    16 MiB). ``sqlite_synchronous`` (default ``$TIDEBASE_SQLITE_SYNCHRONOUS``, else ``NORMAL``)
    is how an embedded database commits: ``NORMAL`` survives a crash of the process, ``FULL``
    also a loss of power, at a disk flush per commit.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        engine: Any = None,
        schema: str | None = None,
        lease_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
        retry_backoff: float | None = None,
        max_payload_bytes: int | None = None,
        sqlite_synchronous: SQLiteSynchronous | str | None = None,
        owner: str | None = None,
    ) -> None:
        if engine is not None:
            if database_url is not None:
                raise ConfigurationError("pass either database_url= or engine=, not both")
            database_url = url_of_engine(engine)
        lease = setting(lease_seconds, "TIDEBASE_LEASE_SECONDS", "float", 30.0)
        heartbeat = setting(heartbeat_seconds, "TIDEBASE_HEARTBEAT_SECONDS", "float", None)
        backoff = setting(retry_backoff, "TIDEBASE_RETRY_BACKOFF", "float", 0.2)
        payload = setting(max_payload_bytes, "TIDEBASE_MAX_PAYLOAD_BYTES", "int", 16 * 1024 * 1024)
        if lease <= 0:
            raise ConfigurationError("lease_seconds must be positive")
        if heartbeat is not None and not 0 < heartbeat < lease:
            raise ConfigurationError("heartbeat_seconds must be positive and below lease_seconds")
        if payload <= 0 or backoff < 0:
            raise ConfigurationError("max_payload_bytes must be positive, retry_backoff >= 0")
        if schema is not None:
            resolve_schema(schema)  # a bad name fails here, not at the first run
        self.database_url = database_url
        self._schema = schema
        # Resolved here, so a bad value fails at construction, not at the first run.
        self._sqlite_synchronous = resolve_synchronous(sqlite_synchronous)
        self.settings = EngineSettings(
            lease_seconds=float(lease),
            retry_backoff=float(backoff),
            max_payload_bytes=int(payload),
            heartbeat_seconds=None if heartbeat is None else float(heartbeat),
        )
        self._owner = owner

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    @property
    def schema(self) -> str:
        """The PostgreSQL schema of the library's tables (SQLite has none and ignores it)."""
        return resolve_schema(self._schema)

    @property
    def owner(self) -> str:
        """Who this process's executions are recorded as holding their runs (per process)."""
        return self._owner or process_owner()

    @property
    def store(self) -> Store:
        """The store for this database on the running event loop."""
        return get_store(
            self.database_url, self._schema, sqlite_synchronous=self._sqlite_synchronous
        )

    def describe(self) -> str:
        """Which database this is, without its password (and, on PostgreSQL, the schema)."""
        url = resolve_database_url(self.database_url)
        return redact(url) + (f" (schema {self.schema})" if url.startswith("postgresql") else "")

    async def _open(self) -> Store:
        store = self.store
        await store.open()
        return store

    # -- runs ------------------------------------------------------------------------------

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[[Run, I], Awaitable[T]],
        *,
        run_id: str | None = None,
        input: I,
    ) -> T: ...

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[[Run, None], Awaitable[T]],
        *,
        run_id: str | None = None,
    ) -> T: ...

    async def run(
        self,
        name: str,
        fn: Callable[[Run, Any], Awaitable[Any]],
        *,
        run_id: str | None = None,
        input: Any = None,
    ) -> Any:
        """Start or resume the run ``run_id`` of pipeline ``name``, calling ``fn(run, input)``;
        return what ``fn`` returns.

        A completed run returns its recorded result without calling ``fn`` (R7).
        """
        _codec.register_annotations(fn)
        data = _codec.encode(input, what="pipeline input")
        return await self._execute(
            name,
            run_id,
            data,
            sha256_hex(data, what="pipeline input"),
            lambda run: fn(run, input),
        )

    async def _execute(
        self,
        pipeline: str,
        run_id: str | None,
        input_data: Any,
        input_hash: str | None,
        body: Callable[[Run], Awaitable[Any]],
        *,
        create: bool = True,
        owner: str | None = None,
        claim_token: int | None = None,
    ) -> Any:
        """Acquire the run, execute ``body`` under its lease, and record how it ended.

        ``owner`` and ``claim_token`` let a worker execute a run it claimed from the queue.
        """
        if not isinstance(pipeline, str) or not pipeline:
            raise ConfigurationError("pipeline name must be a non-empty string")
        fresh_id = run_id is None
        run_id = validate_run_id(new_run_id() if run_id is None else run_id)
        _sdk_installed()
        store = await self._open()
        new = NewRun(
            run_id=run_id,
            pipeline=pipeline,
            owner=owner or self.owner,
            lease_seconds=self.settings.lease_seconds,
            input=input_data,
            input_hash=input_hash,
        )
        return await execute_run(
            store,
            self.settings,
            new,
            body,
            create=create,
            claim_token=claim_token,
            fresh_id=fresh_id,
        )

    async def _enqueue(
        self,
        pipeline: str,
        input_data: Any,
        input_hash: str | None,
        *,
        run_id: str | None = None,
        queue: str = DEFAULT_QUEUE,
        dedupe_key: str | None = None,
        priority: int = 0,
        delay: float | dt.timedelta | None = None,
        max_attempts: int | None = None,
        deadline: dt.datetime | dt.timedelta | None = None,
    ) -> str:
        run_id = validate_run_id(run_id) if run_id is not None else new_run_id()
        _check_name(queue, "queue", required=True)
        _check_name(dedupe_key, "dedupe_key", required=False)
        if max_attempts is not None and max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        now = utcnow()
        store = await self._open()
        return await store.enqueue(
            QueuedRun(
                run_id=run_id,
                pipeline=pipeline,
                input=input_data,
                input_hash=input_hash,
                queue=queue,
                dedupe_key=dedupe_key,
                priority=priority,
                scheduled_at=now + dt.timedelta(seconds=_seconds(delay, "delay")),
                max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
                deadline=_deadline(deadline, now),
            )
        )

    async def requeue(self, run_id: str, *, queue: str | None = None) -> RunStatus:
        """Put an unfinished run back on its queue (or ``queue``), due now, for the workers."""
        _check_name(queue, "queue", required=False)
        return await (await self._open()).requeue(validate_run_id(run_id), queue=queue)

    async def cancel(self, run_id: str, reason: str | None = None) -> RunStatus:
        """Cancel a run; its executor stops at its next step boundary (R12). Returns the run's
        status afterwards (``cancelled``, or how it had already ended)."""
        return await (await self._open()).cancel(validate_run_id(run_id), reason)

    async def review_step(
        self, run_id: str, step: str, action: ReviewAction | str, output: Any = None
    ) -> StepRecord:
        """Resolve a ``manual_review`` step: ``retry`` it, supply its ``output``, or ``fail`` it."""
        act = parse(ReviewAction, action, "review action")
        encoded = (
            _codec.encode(output, what="reviewed output") if act == ReviewAction.OUTPUT else None
        )
        return await (await self._open()).review_step(validate_run_id(run_id), step, act, encoded)

    async def fork(
        self, run_id: str, *, from_step: str | None = None, new_run_id: str | None = None
    ) -> str:
        """Start a new run that re-runs run ``run_id`` from step ``from_step`` on (P5).

        The new run (id ``new_run_id``, else a generated one; returned) has the recorded
        arguments of ``run_id``, a copy of each checkpoint recorded before ``from_step`` and
        the state versions appended before it; invoking it (``pipeline.resume(new_id)``)
        replays those and executes ``from_step`` and everything after it. Without
        ``from_step`` it copies every checkpoint up to the first outermost one that did not
        complete (all of a completed run). A run from a queue is forked onto that queue, for
        the workers; any other waits as ``failed_retryable`` until it is invoked. Usage is not
        copied (the fork did not spend it). The lineage is the first event of the new run
        (``run_forked``) and an event of ``run_id`` (``run_fork_created``).

        Raises ``RunLocked`` while ``run_id`` executes, ``RunNotFound`` / ``StepNotFound``
        for an unknown run or step, ``RunConflict`` if ``new_run_id`` exists.
        """
        source = validate_run_id(run_id)
        target = _ids.new_run_id() if new_run_id is None else validate_run_id(new_run_id)
        step = None if from_step is None else validate_step_name(from_step)
        await (await self._open()).fork(source, target, step)
        return target

    async def reset_step(self, run_id: str, step: str) -> StepsReset:
        """Discard step ``step`` of run ``run_id`` and every checkpoint recorded after it, so
        its next invocation executes them again (a changed prompt re-runs on purpose; P5).

        State versions appended from that step on are dropped. Usage those steps recorded
        stays in the ledger (it was spent) but is marked ``lost``, and the re-run records
        its own. The run becomes invocable again (``failed_retryable``; a queued run stays
        queued). Raises ``RunLocked`` while the run executes, ``RunCancelled`` for a
        cancelled run (fork it instead), ``RunNotFound`` / ``StepNotFound``.
        """
        return await (await self._open()).reset_step(
            validate_run_id(run_id), validate_step_name(step)
        )

    async def prune(
        self,
        older_than: dt.timedelta | dt.datetime,
        *,
        statuses: RunStatus | str | Sequence[RunStatus | str] = (),
        pipeline: str | Sequence[str] = (),
        dry_run: bool = False,
        batch: int = PRUNE_BATCH,
    ) -> int:
        """Delete ended runs (completed, failed, cancelled; ``statuses`` narrows them) that
        finished more than ``older_than`` ago (or before that datetime), with their steps,
        events, state and usage records; return how many runs were deleted (``dry_run``: how
        many would be). Their usage stays in :meth:`usage` totals as daily rollups.

        Deletes ``batch`` runs per transaction; queued, running, parked and waiting runs are
        never touched.
        """
        return await self._prune(
            _prune_filter(older_than, statuses, _many(pipeline)), dry_run=dry_run, batch=batch
        )

    async def _prune(self, which: PruneFilter, *, dry_run: bool, batch: int) -> int:
        if not 0 < batch <= 10_000:
            raise ConfigurationError(f"batch must be between 1 and 10000, got {batch!r}")
        store = await self._open()
        return await (store.count_prunable(which) if dry_run else store.prune(which, batch=batch))

    # -- waits (W1) ------------------------------------------------------------------------

    async def approve(self, run_id: str, call_id: str, *, always: bool = False) -> ApprovalRecord:
        """Approve tool call ``call_id`` a waiting run stopped on (``always``: and later calls
        of that tool by that agent in the same run). Recorded once; a run with every call
        decided continues when invoked again (a worker does so at once for a queued run).
        ``DecisionConflict`` if it was rejected already."""
        return await self._decide(run_id, call_id, ApprovalDecision.APPROVE, always, None)

    async def reject(
        self, run_id: str, call_id: str, *, message: str | None = None
    ) -> ApprovalRecord:
        """Reject tool call ``call_id``: it never executes, and the model is told ``message``
        (else the SDK's default rejection text). ``DecisionConflict`` if it was approved."""
        if message is not None and not isinstance(message, str):
            raise ConfigurationError(f"message must be a string, got {message!r}")
        return await self._decide(run_id, call_id, ApprovalDecision.REJECT, False, message)

    async def _decide(
        self,
        run_id: str,
        call_id: str,
        decision: ApprovalDecision,
        always: bool,
        message: str | None,
    ) -> ApprovalRecord:
        if not isinstance(call_id, str) or not call_id:
            raise ConfigurationError(f"call id must be a non-empty string, got {call_id!r}")
        return await (await self._open()).decide(
            validate_run_id(run_id), call_id, decision, always=bool(always), message=message
        )

    async def send(self, run_id: str, topic: str, payload: Any = None) -> int:
        """Send ``payload`` (JSON-able) to run ``run_id`` on ``topic``: the first
        ``wait_for(topic)`` of the run that has not taken a message gets it, exactly once,
        whether it is waiting already or starts later. Returns the message's id."""
        _check_name(topic, "topic", required=True)
        encoded = _codec.encode(payload, what=f"message on topic {topic!r}")
        _codec.checked_json(encoded, f"message on topic {topic!r}")
        return await (await self._open()).send_message(validate_run_id(run_id), topic, encoded)

    async def approvals(self, run_id: str) -> list[ApprovalRecord]:
        """The run's tool calls that waited for approval, with their decisions, oldest first."""
        return await (await self._open()).get_approvals(validate_run_id(run_id))

    async def messages(self, run_id: str) -> list[MessageRecord]:
        """The messages sent to the run, oldest first, with the wait step that took each."""
        return await (await self._open()).get_messages(validate_run_id(run_id))

    # -- reads -----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        """The run as stored (``RunNotFound`` if there is none)."""
        return await (await self._open()).get_run(validate_run_id(run_id))

    async def list_runs(
        self,
        *,
        status: RunStatus | str | Sequence[RunStatus | str] = (),
        pipeline: str | Sequence[str] = (),
        queue: str | Sequence[str] = (),
        since: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs newest first; each filter takes one value or several (any of them matches)."""
        statuses = [parse(RunStatus, s, "status") for s in _many(status)]
        return await (await self._open()).list_runs(
            statuses=statuses,
            pipelines=_many(pipeline),
            queues=_many(queue),
            since=since,
            limit=limit,
        )

    async def runs_page(
        self,
        *,
        status: RunStatus | str | Sequence[RunStatus | str] = (),
        pipeline: str | Sequence[str] = (),
        queue: str | Sequence[str] = (),
        since: dt.datetime | None = None,
        before: RunCursor | None = None,
        limit: int = 50,
    ) -> RunPage:
        """A page of runs, newest first, filtered like :meth:`list_runs`; pass a page's
        ``next`` as ``before`` for the page after it. As fast deep in the list as at its top."""
        if not 0 < limit <= 1000:
            raise ConfigurationError(f"limit must be between 1 and 1000, got {limit!r}")
        statuses = [parse(RunStatus, s, "status") for s in _many(status)]
        return await (await self._open()).runs_page(
            statuses=statuses,
            pipelines=_many(pipeline),
            queues=_many(queue),
            since=since,
            before=before,
            limit=limit,
        )

    async def run_counts(
        self,
        by: str = "status",
        *,
        status: RunStatus | str | Sequence[RunStatus | str] = (),
        pipeline: str | Sequence[str] = (),
        queue: str | Sequence[str] = (),
        since: dt.datetime | None = None,
        cap: int | None = None,
    ) -> dict[str | None, int]:
        """How many runs match the filters, per ``status``, ``pipeline`` or ``queue``.

        ``cap`` (counts by status only) stops each count past ``cap``: a count of ``cap + 1``
        means "more than ``cap``", and the read costs the same at any table size.
        """
        if by not in RUN_COUNT_KEYS:
            raise ConfigurationError(f"by must be one of {', '.join(RUN_COUNT_KEYS)}, got {by!r}")
        if cap is not None and (by != "status" or cap < 1):
            raise ConfigurationError("cap takes a positive count, and only counts by status")
        statuses = [parse(RunStatus, s, "status") for s in _many(status)]
        return await (await self._open()).count_runs(
            by,
            statuses=statuses,
            pipelines=_many(pipeline),
            queues=_many(queue),
            since=since,
            cap=cap,
        )

    async def run_costs(
        self, run_ids: Sequence[str], *, prices: str | os.PathLike[str] | None = None
    ) -> dict[str, float | None]:
        """What each of ``run_ids`` cost in USD (None: a model without a price); runs that
        recorded no usage are left out. One query for the whole page of runs."""
        if not run_ids:
            return {}
        table = load_prices(prices)
        totals = await (await self._open()).usage_totals(["run"], run_ids=run_ids)
        return {r["run"]: r["cost_usd"] for r in usage_report(totals, ["run"], table)}

    async def usage_over_time(
        self,
        bucket: dt.timedelta,
        by: str | Sequence[str] = ("pipeline", "model"),
        *,
        pipeline: str | None = None,
        since: dt.datetime | None = None,
        prices: str | os.PathLike[str] | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`usage` per time bucket of length ``bucket`` (whole seconds, counted from the
        epoch in UTC): each row also holds ``bucket``, the bucket's start, oldest first."""
        seconds = int(bucket.total_seconds())
        if seconds < 1 or seconds != bucket.total_seconds():
            raise ConfigurationError(f"bucket must be a whole number of seconds, got {bucket}")
        keys = parse_group_by(by)
        table = load_prices(prices)
        totals = await (await self._open()).usage_totals(
            keys, pipeline=pipeline, since=since, bucket_seconds=seconds
        )
        rows = usage_report(totals, ["bucket", *keys], table)
        for row in rows:
            row["bucket"] = dt.datetime.fromtimestamp(int(row["bucket"]), dt.timezone.utc)
        rows.sort(key=lambda r: r["bucket"])
        return rows

    async def steps(self, run_id: str) -> list[StepRecord]:
        """Every step checkpoint of a run, in the order they were first written."""
        return list((await (await self._open()).load_steps(validate_run_id(run_id))).values())

    async def events(self, run_id: str) -> list[EventRecord]:
        """A run's event log, oldest first (R11)."""
        return await (await self._open()).get_events(validate_run_id(run_id))

    async def state_versions(self, run_id: str) -> list[StateVersion]:
        """Every state version of a run, oldest first (R10)."""
        return await (await self._open()).get_state(validate_run_id(run_id))

    async def usage_records(self, run_id: str) -> list[UsageRecord]:
        """A run's usage ledger rows (R9)."""
        return await (await self._open()).get_usage(validate_run_id(run_id))

    async def usage(
        self,
        by: str | Sequence[str] = ("pipeline", "model"),
        *,
        run_id: str | None = None,
        pipeline: str | None = None,
        since: dt.datetime | None = None,
        prices: str | os.PathLike[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Token totals and cost grouped by any of ``run``, ``pipeline`` and ``model`` (R9).

        Each row holds the group's keys, ``requests`` and ``input``/``output``/``cached``/
        ``total`` tokens, ``records`` and ``cost_usd`` (None when a model has no price;
        ``prices`` is a JSON price table overriding the built-in one).
        """
        keys = parse_group_by(by)
        table = load_prices(prices)
        totals = await (await self._open()).usage_totals(
            keys, pipeline=pipeline, run_id=run_id, since=since
        )
        return usage_report(totals, keys, table)

    # -- database --------------------------------------------------------------------------

    async def migrate(self, *, stamp: str | None = None) -> tuple[str | None, str | None]:
        """Run the packaged migrations; return the revisions before and after.

        ``stamp`` records that revision as applied without running anything, for tables that
        were created another way (the error of a plain migrate says when).
        """
        store = self.store
        before = await store.schema_revision()
        if stamp is None:
            await store.migrate()
        else:
            await store.migrate(stamp, stamp=True)
        return before, await store.schema_revision()

    async def migration_sql(self) -> str:
        """The DDL :meth:`migrate` would run (PostgreSQL), from the database's revision when
        it can be read, else from an empty database; nothing is applied."""
        return await self.store.migration_sql()

    async def close(self) -> None:
        """Let database calls in flight finish, then release this database's connections."""
        await self.store.close()


def _prune_filter(
    older_than: dt.timedelta | dt.datetime,
    statuses: RunStatus | str | Sequence[RunStatus | str],
    pipelines: Sequence[str],
) -> PruneFilter:
    """The runs a prune deletes, validated: a non-negative age or an aware datetime, and
    statuses that are ended ones."""
    if isinstance(older_than, dt.timedelta):
        if older_than < dt.timedelta(0):
            raise ConfigurationError("older_than must not be negative")
        before = utcnow() - older_than
    elif isinstance(older_than, dt.datetime) and older_than.tzinfo is not None:
        before = older_than
    else:
        raise ConfigurationError(
            f"older_than must be a timedelta or a timezone-aware datetime, got {older_than!r}"
        )
    picked = frozenset(parse(RunStatus, s, "status") for s in _many(statuses))
    refused = sorted(str(s) for s in picked - PRUNABLE_RUN_STATUSES)
    if refused:
        allowed = ", ".join(sorted(str(s) for s in PRUNABLE_RUN_STATUSES))
        raise ConfigurationError(
            f"only ended runs ({allowed}) can be pruned, not {', '.join(refused)}"
        )
    for name in pipelines:
        _check_name(name, "pipeline", required=True)
    return PruneFilter(before, picked or PRUNABLE_RUN_STATUSES, tuple(pipelines))


def _many(value: Any) -> list[Any]:
    if value is None or value == ():
        return []
    return [value] if isinstance(value, str) else list(value)


AsyncTidebase = Tidebase
