"""The executor: the replay contract (R1-R13) for one execution of one run.

It holds the run's lease and every checkpoint prefetched at acquisition, so replaying finished
steps costs no round trip; each newly executed step costs one commit, or two when it declares
side effects (an intent record before it runs makes in-doubt detection possible).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .._codec import checked_json
from .._errors import (
    CheckpointSerializationError,
    LeaseLost,
    PayloadTooLarge,
    PendingApproval,
    RunCancelled,
    RunParked,
    StepFailed,
    StepInputMismatch,
    StepNeedsReview,
    TidebaseError,
)
from .._ids import validate_step_name
from .._store import (
    Acquired,
    ApprovalRecord,
    Event,
    Lease,
    MessageRecord,
    RunRecord,
    StepRecord,
    Store,
    UsageRecord,
    utcnow,
)
from .._vocab import (
    EVENT_OF_RUN_END,
    EVENT_OF_STEP_FAILURE,
    HALTING_STEP_STATUSES,
    RUN_STATUS_OF_STEP,
    DecisionKind,
    EventKind,
    ReplayPolicy,
    RunStatus,
    StepStatus,
)
from .scope import Scope, ToolCall, scope_var, tool_call_var
from .settings import EngineSettings
from .spec import RUN_CONTROL, Decision, Execution, StepSpec, step_replayed

log = logging.getLogger("tidebase_agents")

#: A lease confirmed by the database this recently (seconds) is not checked again at the next
#: step boundary: back-to-back steps skip a read. A cancellation committed in that window can
#: let one more step without side effects run; its checkpoint is refused all the same.
BOUNDARY_REUSE = 0.0005
#: A journal entry to write: its record, its JSON text, its usage and its events.
_Entry = tuple[StepRecord, str, list[UsageRecord], list[Event]]
#: The shortest wait a database call gets, even when the lease is about to run out.
MIN_WAIT = 0.05


def storable_text(text: str, limit: int = 4000) -> str:
    """``text`` cut to ``limit`` characters, with NUL characters and lone surrogates (which
    no database stores) escaped."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\0")


def error_record(exc: BaseException, step: str | None = None) -> dict[str, Any]:
    """How an error is stored: its qualified type and (bounded, storable) message."""
    record: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": storable_text(str(exc)),
    }
    if step is not None:
        record["step"] = step
    return record


def _reason(error: Any) -> str:
    return str(error.get("message", "")) if isinstance(error, dict) else ""


def _changed_parts(old: dict[str, str] | None, new: dict[str, str] | None) -> list[str]:
    if not old or not new:
        return ["input"]
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class Executor:
    """Executes one run under its lease: decides, runs and records each step."""

    def __init__(self, store: Store, settings: EngineSettings, acquired: Acquired) -> None:
        assert acquired.lease is not None
        self.store = store
        self.settings = settings
        self.lease: Lease = acquired.lease
        self.record: RunRecord = acquired.run
        self._steps: dict[str, StepRecord] = dict(acquired.steps)
        self.root = Scope()
        self.loop = asyncio.get_running_loop()
        #: Why this executor may no longer write: its lease was lost, or the run parked.
        self._lost: TidebaseError | None = None
        self._lease_deadline = time.monotonic() + settings.lease_seconds
        #: When the database last confirmed this executor's lease (acquire, a fenced write).
        self._confirmed_at = time.monotonic()
        self._pending: set[asyncio.Task[Any]] = set()
        #: Journal entries kept back until the step they belong to completes (see journal()),
        #: and journal writes in flight.
        self._deferred: dict[str, _Entry] = {}
        self._journal_writes: set[asyncio.Task[Any]] = set()
        self._ended = False
        self._renewing = False
        #: The halting status a step reached (the run settles in it).
        self._outcome: StepStatus | None = None
        self.executed: list[str] = []
        self.replayed: list[str] = []
        self._state_calls = 0
        self._state_value: Any = None
        self._state_loaded = acquired.run.state_version == 0
        self._state_lock = asyncio.Lock()
        self._approvals: list[ApprovalRecord] | None = None

    @property
    def run_id(self) -> str:
        return self.lease.run_id

    # -- checkpoints as this execution knows them -------------------------------------------

    def recorded(self, name: str) -> StepRecord | None:
        """The checkpoint of step ``name`` as this execution knows it."""
        return self._steps.get(name)

    def recorded_names(self, prefix: str) -> list[str]:
        """Names of recorded steps starting with ``prefix``."""
        return [name for name in self._steps if name.startswith(prefix)]

    def _remaining(self) -> float:
        """How long a database call may wait: until the lease could pass to another executor
        (a floor keeps a call that is due at once from failing without trying)."""
        return max(self._lease_deadline - time.monotonic(), MIN_WAIT)

    def check_live(self) -> None:
        """Raise if this executor may no longer write: its lease is lost or past its deadline."""
        if self._lost is not None:
            raise self._lost
        if time.monotonic() > self._lease_deadline:
            raise LeaseLost(
                self.run_id, "the heartbeat could not renew it in time; another executor may own it"
            )

    # -- steps -----------------------------------------------------------------------------

    def lookup(self, spec: StepSpec) -> Decision:
        """Decide from the prefetched checkpoint whether ``spec`` replays, parks or executes.

        Raises :class:`StepInputMismatch` (R2), :class:`StepNeedsReview` (R4) and
        :class:`StepFailed` before anything runs or is written.
        """
        self.check_live()
        validate_step_name(spec.name)
        rec = self._steps.get(spec.name)
        if rec is None:
            return Decision(DecisionKind.EXECUTE)
        if rec.status != StepStatus.FAILED_RETRYABLE and rec.input_hash != spec.input_hash:
            raise StepInputMismatch(
                self.run_id,
                spec.name,
                rec.input_hash,
                spec.input_hash,
                _changed_parts(rec.input_parts, spec.input_parts),
            )
        if rec.status == StepStatus.COMPLETED:
            self.replayed.append(spec.name)
            log.debug("run %s: step %s replayed from its checkpoint", self.run_id, spec.name)
            step_replayed(self.run_id, spec.name)
            if rec.error is not None and spec.raise_error is not None:
                spec.raise_error(rec.error)
            return Decision(DecisionKind.REPLAY, rec)
        if rec.status == StepStatus.MANUAL_REVIEW:
            self._outcome = StepStatus.MANUAL_REVIEW
            log.info("run %s: step %s waits for review; not executed", self.run_id, spec.name)
            raise StepNeedsReview(self.run_id, spec.name, _reason(rec.error))
        if rec.status == StepStatus.FAILED:
            self._outcome = StepStatus.FAILED
            log.info("run %s: step %s failed for good; not executed", self.run_id, spec.name)
            raise StepFailed(self.run_id, spec.name, _reason(rec.error))
        if rec.status == StepStatus.RUNNING and rec.side_effects and not rec.keyed:
            return Decision(DecisionKind.PARK, rec, rec.attempts)
        return Decision(
            DecisionKind.EXECUTE,
            rec,
            rec.attempts + 1,
            in_doubt=rec.status == StepStatus.RUNNING,
        )

    async def execute(self, spec: StepSpec) -> Any:
        """Replay ``spec`` from its checkpoint or execute it and record the outcome."""
        decision = self.lookup(spec)
        if decision.kind == DecisionKind.REPLAY:
            assert decision.record is not None
            return await spec.decode(decision.record.output)
        execution = await self.begin(spec, decision)
        value, error, tries = await self._attempts(spec)
        return await self.conclude(spec, execution, value, error, tries)

    async def begin(self, spec: StepSpec, decision: Decision) -> Execution:
        """Start executing a step: park an unkeyed in-doubt write (R5), or write the intent
        record of a side-effecting step."""
        if decision.kind == DecisionKind.PARK:
            log.warning(
                "run %s: step %s was in doubt (an unkeyed external write when its executor "
                "died); parked for review",
                self.run_id,
                spec.name,
            )
            await self._write(
                spec,
                StepStatus.MANUAL_REVIEW,
                attempts=decision.attempts,
                error={
                    "message": "in doubt: the executor died during an unkeyed external "
                    "write, which may or may not have happened"
                },
                events=[
                    Event(
                        EventKind.STEP_IN_DOUBT,
                        spec.name,
                        {"action": str(StepStatus.MANUAL_REVIEW)},
                    )
                ],
            )
            self._outcome = StepStatus.MANUAL_REVIEW
            raise StepNeedsReview(self.run_id, spec.name, "in doubt after a crash")
        if not spec.side_effects and time.monotonic() - self._confirmed_at > BOUNDARY_REUSE:
            # The step boundary: a run cancelled or taken over since this executor's last
            # write must not run another step (R6, R12). A side-effecting step's intent
            # record below is fenced and checks the same.
            await self._guarded(self.store.check_lease(self.lease, timeout=self._remaining()))
            self._confirmed_at = time.monotonic()
        execution = Execution(decision.attempts, utcnow(), time.perf_counter())
        if decision.in_doubt:
            log.info(
                "run %s: step %s was in doubt (its executor died during it); re-executing "
                "(attempt %d, idempotency key %s)",
                self.run_id,
                spec.name,
                decision.attempts,
                spec.idempotency_key,
            )
        else:
            log.debug(
                "run %s: executing step %s (attempt %d)", self.run_id, spec.name, decision.attempts
            )
        if spec.side_effects:
            # What led to this external call (the model turn that asked for it) is recorded
            # first: a resume then replays that turn instead of asking the model anew.
            await self.flush_journal()
            if not spec.keyed and spec.tool_call is not None:
                spec.tool_call.on_first_read = lambda: self._key_read(spec.name)
            kind = EventKind.STEP_IN_DOUBT if decision.in_doubt else EventKind.STEP_STARTED
            data = (
                {"action": "reexecute", "idempotency_key": spec.idempotency_key}
                if decision.in_doubt
                else None
            )
            await self._write(
                spec,
                StepStatus.RUNNING,
                attempts=decision.attempts,
                started_at=execution.started,
                events=[Event(kind, spec.name, data)],
            )
        return execution

    async def conclude(
        self,
        spec: StepSpec,
        execution: Execution,
        value: Any,
        error: BaseException | None,
        tries: int = 1,
    ) -> Any:
        """Record how an executed step ended; return its value or raise its error (R3)."""
        attempts = execution.attempts + tries - 1
        encoded: Any = None
        text: str | None = None
        if error is None:
            try:
                encoded = spec.encode(value)
                text = self.serialize(f"output of step {spec.name!r}", encoded)
            except CheckpointSerializationError as exc:
                error = exc
        duration = (time.perf_counter() - execution.t0) * 1000
        call = spec.tool_call
        keyed = spec.keyed if call is None else (call.explicit or call.key_read)
        common: dict[str, Any] = dict(
            attempts=attempts, keyed=keyed, started_at=execution.started, duration_ms=duration
        )
        folded_usage, folded_events = self._fold_journal(spec.name)
        await self.journal_landed()  # the completion drops the entries: they land first
        if error is None:
            await self._write(
                spec,
                StepStatus.COMPLETED,
                output=encoded,
                output_json=text,
                usage=[*folded_usage, *(spec.usage(value) if spec.usage else ())],
                events=[
                    *folded_events,
                    Event(EventKind.STEP_COMPLETED, spec.name, {"attempts": attempts}),
                ],
                transient=spec.transient,
                **common,
            )
            self.executed.append(spec.name)
            log.debug(
                "run %s: step %s executed and recorded (%.1f ms)", self.run_id, spec.name, duration
            )
            return value
        recorded = spec.encode_error(error) if spec.encode_error else None
        if recorded is not None:
            # A deterministic outcome (max turns, a guardrail tripwire): it is the answer.
            run_data = getattr(error, "run_data", None)
            await self._write(
                spec,
                StepStatus.COMPLETED,
                error=recorded,
                usage=[
                    *folded_usage,
                    *(spec.usage(run_data) if spec.usage and run_data is not None else ()),
                ],
                events=[
                    *folded_events,
                    Event(EventKind.STEP_COMPLETED, spec.name, {"error": recorded.get("type")}),
                ],
                transient=spec.transient,
                **common,
            )
            self.executed.append(spec.name)
            raise error
        status = self._classify(spec, keyed)
        log.info(
            "run %s: step %s failed (%s: %s); recorded as %s",
            self.run_id,
            spec.name,
            type(error).__name__,
            error,
            status,
        )
        await self._write(
            spec,
            status,
            error=error_record(error),
            usage=folded_usage,
            events=[
                *folded_events,
                Event(EVENT_OF_STEP_FAILURE[status], spec.name, error_record(error)),
            ],
            **common,
        )
        if status in HALTING_STEP_STATUSES:
            self._outcome = status
        raise error

    async def _attempts(self, spec: StepSpec) -> tuple[Any, BaseException | None, int]:
        """Call the step's function with in-process retries; return (value, error, tries)."""
        for attempt in range(spec.retries + 1):
            try:
                return await self._call(spec), None, attempt + 1
            except RUN_CONTROL:
                raise
            except Exception as exc:
                if spec.encode_error is not None and spec.encode_error(exc) is not None:
                    return None, exc, attempt + 1
                if attempt == spec.retries:
                    return None, exc, attempt + 1
                self.check_live()
                delay = min(self.settings.retry_backoff * 2**attempt, 30.0)
                log.info(
                    "step %s failed (%s); retry %d in %.2fs", spec.name, exc, attempt + 1, delay
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def step_scope(self, name: str, tool_call: ToolCall | None = None) -> Iterator[None]:
        """Run code as the body of step ``name``: nested steps are named inside it."""
        scope_token = scope_var.set((scope_var.get() or self.root).child(name))
        call_token = tool_call_var.set(tool_call)
        try:
            yield
        finally:
            tool_call_var.reset(call_token)
            scope_var.reset(scope_token)

    async def _call(self, spec: StepSpec) -> Any:
        with self.step_scope(spec.name, spec.tool_call):
            out = spec.fn()
            if inspect.isawaitable(out):
                out = await out
            return out

    def _key_read(self, step: str) -> None:
        # May run on a sync tool's worker thread.
        self.loop.call_soon_threadsafe(
            lambda: self.track(self.loop.create_task(self._mark_keyed(step)))
        )

    async def _mark_keyed(self, step: str) -> None:
        log.warning(
            "step %s of run %s read idempotency_key() although its tool did not appear to; "
            "recording it as keyed",
            step,
            self.run_id,
        )
        try:
            await self._guarded(self.store.mark_keyed(self.lease, step))
        except Exception as exc:  # the record stays unkeyed: a crash now parks it for review
            log.warning("could not record step %s as keyed: %s", step, exc)

    def _classify(self, spec: StepSpec, keyed: bool) -> StepStatus:
        """Final-failure classification (R3)."""
        if spec.replay == ReplayPolicy.MANUAL or (spec.side_effects and not keyed):
            return StepStatus.MANUAL_REVIEW
        if spec.replay == ReplayPolicy.NEVER:
            return StepStatus.FAILED
        return StepStatus.FAILED_RETRYABLE

    async def _guarded(self, write: Any) -> Any:
        """Await a fenced database call; a refused fence ends this executor's writes."""
        try:
            return await write
        except (LeaseLost, RunCancelled) as exc:
            self._lost = self._lost or exc
            raise

    async def _write(
        self,
        spec: StepSpec,
        status: StepStatus,
        *,
        attempts: int,
        events: Sequence[Event],
        output: Any = None,
        error: Any = None,
        keyed: bool | None = None,
        started_at: Any = None,
        duration_ms: float | None = None,
        usage: Sequence[UsageRecord] = (),
        output_json: str | None = None,
        transient: str | None = None,
    ) -> None:
        record = StepRecord(
            name=spec.name,
            status=status,
            input_hash=spec.input_hash,
            input_parts=spec.input_parts,
            output=output,
            error=error,
            side_effects=spec.side_effects,
            idempotency_key=spec.idempotency_key,
            keyed=spec.keyed if keyed is None else keyed,
            replay=spec.replay,
            attempts=attempts,
            lease_token=self.lease.token,
            started_at=started_at or utcnow(),
            completed_at=utcnow() if status != StepStatus.RUNNING else None,
            duration_ms=duration_ms,
        )
        self.check_live()
        await self._guarded(
            self.store.write_step(
                self.lease,
                record,
                events=events,
                usage=usage,
                output_json=output_json,
                transient=transient,
                input_json=spec.input_json,
                timeout=self._remaining(),
            )
        )
        self._confirmed_at = time.monotonic()
        if transient is not None:
            marker = f"/{transient}"
            for name in self.recorded_names(f"{spec.name}/"):
                if name.rpartition("/")[2].startswith(transient) and marker in name:
                    del self._steps[name]
        self._steps[spec.name] = record

    def serialize(self, what: str, encoded: Any) -> str:
        """The checkpoint's JSON text, checked against the size limit (R13)."""
        text = checked_json(encoded, what)
        size = len(text.encode("utf-8"))
        limit = self.settings.max_payload_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"{what} is {size} bytes as JSON, over the limit of {limit} "
                f"(Tidebase(max_payload_bytes=...))"
            )
        return text

    async def record_step(
        self,
        spec: StepSpec,
        status: StepStatus,
        *,
        events: Sequence[Event],
        output: Any = None,
        error: Any = None,
    ) -> None:
        """Write ``spec``'s checkpoint as it stands (a wait's start or its end)."""
        if status == StepStatus.COMPLETED:
            self.executed.append(spec.name)
        await self._write(spec, status, attempts=1, events=events, output=output, error=error)

    # -- waits (W1) ------------------------------------------------------------------------

    async def approvals(self) -> list[ApprovalRecord]:
        """The run's tool calls that waited for approval, with their decisions (one read per
        execution, when an agent step stopped on approvals is met)."""
        if self._approvals is None:
            self._approvals = await self.store.get_approvals(self.run_id)
        return self._approvals

    async def take_message(self, step: StepRecord, topic: str) -> MessageRecord | None:
        """Complete wait step ``step`` with the next message on ``topic``, if one was sent."""
        self.check_live()
        message: MessageRecord | None = await self._guarded(
            self.store.take_message(self.lease, step, topic)
        )
        self._confirmed_at = time.monotonic()
        if message is not None:
            self._steps[step.name] = dataclasses.replace(
                step,
                status=StepStatus.COMPLETED,
                output={"message": message.id, "payload": message.payload},
            )
            self.executed.append(step.name)
        return message

    # -- journal entries -------------------------------------------------------------------

    def _journal_record(
        self, name: str, input_hash: str, input_parts: dict[str, str], output: Any
    ) -> tuple[StepRecord, str]:
        now = utcnow()
        record = StepRecord(
            name=name,
            status=StepStatus.COMPLETED,
            input_hash=input_hash,
            input_parts=input_parts,
            output=output,
            lease_token=self.lease.token,
            started_at=now,
            completed_at=now,
        )
        return record, self.serialize(f"journal entry {name!r}", output)

    async def journal(
        self,
        name: str,
        input_hash: str,
        input_parts: dict[str, str],
        output: Any,
        *,
        usage: Sequence[UsageRecord] = (),
        events: Sequence[Event] = (),
        defer: bool = False,
    ) -> None:
        """Record a journal entry of the step running in this task (a model turn).

        The write is sent before this returns and lands behind it: the caller (the SDK
        reading the answer) goes on meanwhile, and awaits :meth:`journal_landed` before
        anything the entry led to happens (a tool call). Only one entry is in flight at a time.

        ``defer`` keeps it in memory instead: the step is about to complete (a final answer),
        and its completion will carry the entry's usage and events in its own write, so the
        entry costs no round trip. A deferred entry is written all the same when anything else
        happens first: a side effect, or another entry of the same step.
        """
        record, text = self._journal_record(name, input_hash, input_parts, output)
        await self.flush_journal()
        if defer:
            self._deferred[name] = (record, text, list(usage), list(events))
            return
        self._write_behind((record, text, list(usage), list(events)))
        await asyncio.sleep(0)  # let the write reach the server before the caller goes on

    async def _write_journal(
        self,
        record: StepRecord,
        text: str,
        usage: Sequence[UsageRecord],
        events: Sequence[Event],
    ) -> None:
        self.check_live()
        await self._guarded(
            self.store.write_step(
                self.lease,
                record,
                events=events,
                usage=usage,
                output_json=text,
                timeout=self._remaining(),
            )
        )
        self._confirmed_at = time.monotonic()
        self._steps[record.name] = record

    async def flush_journal(self) -> None:
        """Write the deferred journal entries (before a side effect, say), and wait until
        every journal write in flight has landed."""
        while self._deferred:
            _, entry = self._deferred.popitem()
            self._write_behind(entry)
        await self.journal_landed()

    def _write_behind(self, entry: _Entry) -> None:
        task = self.track(self.loop.create_task(self._write_journal(*entry)))
        self._journal_writes.add(task)
        task.add_done_callback(self._journal_write_done)

    def _journal_write_done(self, task: asyncio.Task[Any]) -> None:
        # A failed write stays until journal_landed reports it: it may fail before anyone waits.
        if task.cancelled() or task.exception() is None:
            self._journal_writes.discard(task)

    async def journal_landed(self) -> None:
        """Wait until every journal write in flight has landed; raise the first one's error
        (each failed write is reported once)."""
        if not self._journal_writes:
            return
        # asyncio.wait, unlike gather, does not cancel the writes if this task is cancelled.
        done, _ = await asyncio.wait(list(self._journal_writes))
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        self._journal_writes.difference_update(failed)
        if failed:
            raise failed[0].exception()  # type: ignore[misc]

    def _fold_journal(self, step: str) -> tuple[list[UsageRecord], list[Event]]:
        """Take the deferred entries of ``step`` out: their usage and events go with its own
        write (their records would be dropped by it at once)."""
        usage: list[UsageRecord] = []
        events: list[Event] = []
        for name in [n for n in self._deferred if n.startswith(f"{step}/")]:
            _, _, entry_usage, entry_events = self._deferred.pop(name)
            usage.extend(entry_usage)
            events.extend(entry_events)
        return usage, events

    async def discard(self, names: Sequence[str], event: Event) -> None:
        """Drop checkpoints (a journaled answer that led to a deterministic failure)."""
        await self.flush_journal()
        await self._guarded(
            self.store.delete_steps(self.lease, names, event=event, timeout=self._remaining())
        )
        for name in names:
            self._steps.pop(name, None)

    # -- run state and usage ---------------------------------------------------------------

    async def append_state(self, doc: Any) -> int:
        """Append ``doc`` as the next state version; a replayed call writes nothing (R10)."""
        async with self._state_lock:
            self._state_calls += 1
            version = self._state_calls
            if version <= self.record.state_version:
                self._state_value, self._state_loaded = None, False
                return version
            self.check_live()
            self.serialize(f"state version {version}", doc)
            await self._guarded(
                self.store.append_state(self.lease, version, doc, timeout=self._remaining())
            )
            self.record = dataclasses.replace(self.record, state_version=version)
            self._state_value, self._state_loaded = doc, True
            return version

    async def state(self) -> Any:
        """The latest state value of this run (None before any state was set)."""
        if not self._state_loaded:
            versions = await self.store.get_state(self.run_id)
            self._state_value = versions[-1].value if versions else None
            self._state_loaded = True
        return self._state_value

    async def record_usage(self, usage: UsageRecord) -> None:
        self.check_live()
        await self._guarded(self.store.record_usage(self.lease, [usage], timeout=self._remaining()))

    # -- lifecycle -------------------------------------------------------------------------

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a background checkpoint write alive until the run finishes."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for background checkpoint writes (streamed runs) to land."""
        while self._pending:
            _, pending = await asyncio.wait(list(self._pending), timeout=timeout)
            if pending:
                return

    async def heartbeat(self) -> None:
        """Renew the lease every third of its length until :meth:`stop_heartbeat`."""
        seconds = self.settings.lease_seconds
        while not self._ended:
            await asyncio.sleep(self.settings.heartbeat_interval)
            self._renewing = True
            try:
                await self.store.heartbeat(self.lease, seconds, timeout=self._remaining())
            except (LeaseLost, RunCancelled) as exc:
                self._lost = self._lost or exc  # a park released the lease: it says why
                return
            except Exception as exc:  # a transient database error: keep trying until expiry
                log.warning("heartbeat for run %s failed: %s", self.run_id, exc)
            else:
                self._lease_deadline = time.monotonic() + seconds
            finally:
                self._renewing = False

    async def stop_heartbeat(self, heartbeat: asyncio.Task[None]) -> None:
        """Cancel the heartbeat while it sleeps; while it renews, let the renewal finish.

        A database call cancelled midway makes the driver tear its connection down, and
        aiosqlite's teardown can then wait forever on its already stopped thread, hanging the
        process's ``asyncio.run``.
        """
        self._ended = True
        if self._renewing:
            # asyncio.wait, unlike awaiting the task, leaves it running if we are cancelled.
            await asyncio.wait([heartbeat])
        else:
            heartbeat.cancel()

    async def park(
        self,
        error: RunParked,
        *,
        approvals: Sequence[PendingApproval] = (),
        topic: str | None = None,
        step: StepRecord | None = None,
    ) -> NoReturn:
        """Park the run as ``waiting`` (W1): release the lease and raise ``error``. Anything
        this execution still tries afterwards raises ``error`` again, and nothing is written."""
        self.check_live()
        await self.flush_journal()
        data: dict[str, Any] = {"reason": type(error).__name__}
        if error.wake_at is not None:
            data["wake_at"] = error.wake_at.isoformat()
        if topic is not None:
            data["topic"] = topic
        if approvals:
            data["approvals"] = [p.call_id for p in approvals]
        await self._guarded(
            self.store.park(
                self.lease,
                wake_at=error.wake_at,
                event=Event(EventKind.RUN_WAITING, data=data),
                approvals=approvals,
                topic=topic,
                step=step,
            )
        )
        log.info("run %s: %s", self.run_id, error)
        self._lost = error
        raise error

    async def settle(self, exc: BaseException) -> None:
        """Record how an unsuccessful execution ended and release the lease."""
        if isinstance(exc, (LeaseLost, RunCancelled)) or self._lost is not None:
            return
        if isinstance(exc, StepNeedsReview):
            status = RunStatus.MANUAL_REVIEW
        elif isinstance(exc, StepFailed):
            status = RunStatus.FAILED
        elif self._outcome is not None:
            status = RUN_STATUS_OF_STEP[self._outcome]
        else:
            status = RunStatus.FAILED_RETRYABLE
        log.info("run %s: ended %s (%s: %s)", self.run_id, status, type(exc).__name__, exc)
        with contextlib.suppress(LeaseLost, RunCancelled):
            await self.store.finish(
                self.lease,
                status,
                error=error_record(exc),
                event=Event(EVENT_OF_RUN_END[status], data=error_record(exc)),
                timeout=self._remaining(),
            )

    async def complete(self, output: Any) -> None:
        """Record the run's result and release the lease."""
        await self._guarded(
            self.store.finish(
                self.lease,
                RunStatus.COMPLETED,
                output=output,
                event=Event(
                    EventKind.RUN_COMPLETED,
                    data={"executed": len(self.executed), "replayed": len(self.replayed)},
                ),
                timeout=self._remaining(),
            )
        )
