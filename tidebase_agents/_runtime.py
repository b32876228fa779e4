"""Runs and steps: the replay contract (R1-R13) on top of the store.

A :class:`Run` is the context a pipeline executes in. It holds the run's lease and every
checkpoint prefetched at acquisition, so replaying finished steps costs no round trip; each
newly executed step costs one commit, or two when it declares side effects (an intent record
before it runs makes in-doubt detection possible).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import inspect
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn

from . import _codec
from ._context import Scope, StopRun, ToolCall, _run, _scope, _tool_call
from ._errors import (
    CheckpointSerializationError,
    ConfigurationError,
    LeaseLost,
    PayloadTooLarge,
    RunCancelled,
    StepFailed,
    StepInputMismatch,
    StepNeedsReview,
    TidebaseError,
)
from ._hashing import canonical, sha256_hex
from ._store import (
    Acquired,
    Event,
    Lease,
    RunRecord,
    StepRecord,
    Store,
    Usage,
    dump_json,
    get_store,
    utcnow,
)

log = logging.getLogger("tidebase_agents")

REPLAY_POLICIES = ("auto", "manual", "never")
_RUN_ID = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a usable run id, else raise :class:`ConfigurationError`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(
            f"invalid run id {run_id!r}: use 1 to 255 characters without whitespace or "
            f"control characters"
        )
    return run_id


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex}"


def derive_idempotency_key(run_id: str, step_name: str) -> str:
    """The idempotency key of a step: a function of run id and step name only (I4)."""
    digest = hashlib.sha256(f"{run_id}\x00{step_name}".encode()).hexdigest()
    return f"tb-{digest[:40]}"


def _error_record(exc: BaseException, step: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:4000],
    }
    if step is not None:
        record["step"] = step
    return record


# Errors that steer the run rather than report a failure of the step's own work.
RUN_CONTROL = (LeaseLost, RunCancelled, StepNeedsReview, StepInputMismatch, StepFailed)
#: A lease confirmed by the database this recently (seconds) is not checked again at the next
#: step boundary: back-to-back steps skip a read. A cancellation committed in that window can
#: let one more step without side effects run; its checkpoint is refused all the same.
BOUNDARY_REUSE = 0.0005
#: Step statuses after which the run cannot go on past the step.
HALTING = ("manual_review", "failed")


async def _identity_decode(data: Any) -> Any:
    return _codec.decode(data)


@dataclasses.dataclass
class StepSpec:
    """Everything the executor needs to run or replay one step."""

    name: str
    fn: Callable[[], Any]
    input_hash: str
    input_parts: dict[str, str] | None = None
    side_effects: list[str] | None = None
    idempotency_key: str | None = None
    keyed: bool = False
    replay: str = "auto"
    retries: int = 0
    encode: Callable[[Any], Any] = _codec.encode
    decode: Callable[[Any], Awaitable[Any]] = _identity_decode
    #: Deterministic failures recorded as the step's outcome (replayed as the same error).
    encode_error: Callable[[BaseException], dict[str, Any] | None] | None = None
    raise_error: Callable[[dict[str, Any]], NoReturn] | None = None
    usage: Callable[[Any], Sequence[Usage]] | None = None
    tool_call: ToolCall | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a step given its checkpoint: ``replay``, ``park`` or ``execute``."""

    kind: str
    record: StepRecord | None = None
    attempts: int = 1
    in_doubt: bool = False


@dataclasses.dataclass(frozen=True)
class Execution:
    attempts: int
    started: Any
    t0: float


class Run:
    """The context a pipeline executes in (``current_run()``)."""

    def __init__(self, tide: Tidebase, store: Store, acquired: Acquired) -> None:
        assert acquired.lease is not None
        self._tide = tide
        self._store = store
        self._lease: Lease = acquired.lease
        self._record: RunRecord = acquired.run
        self._steps: dict[str, StepRecord] = dict(acquired.steps)
        self._root = Scope()
        self._state_calls = 0
        self._state_value: Any = None
        self._state_loaded = acquired.run.state_version == 0
        self._lost: TidebaseError | None = None
        self._state_lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self._lease_deadline = time.monotonic() + tide.lease_seconds
        #: When the database last confirmed this executor's lease (acquire, a fenced write).
        self._confirmed_at = time.monotonic()
        self._pending: set[asyncio.Task[Any]] = set()
        self._ended = False
        self._renewing = False
        self._outcome: str | None = None
        self.executed: list[str] = []
        self.replayed: list[str] = []

    # -- public face -----------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._lease.run_id

    @property
    def pipeline(self) -> str:
        return self._record.pipeline

    @property
    def attempt(self) -> int:
        """How many times this run has been executed, this execution included."""
        return self._record.attempts

    async def step(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        input: Any = None,
        side_effects: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
        replay: str = "auto",
    ) -> Any:
        """Run ``fn`` as the checkpointed step ``name``, or return its recorded output (R1).

        ``fn`` takes no arguments and returns a value or an awaitable. ``input`` is what the
        step's answer depends on; a recorded step invoked with a different input raises
        :class:`StepInputMismatch` (R2). ``side_effects`` names the external systems the step
        writes to; with no ``idempotency_key`` such a step is parked for manual review rather
        than blindly re-run when it fails or is left in doubt by a crash (R3, R5).
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"step name must be a non-empty string, got {name!r}")
        if replay not in REPLAY_POLICIES:
            raise ConfigurationError(f"replay must be one of {REPLAY_POLICIES}, got {replay!r}")
        if retries < 0:
            raise ConfigurationError("retries must be >= 0")
        scope = _scope.get() or self._root
        full = f"{scope.prefix}{name}"
        if full in scope.claimed:
            raise ConfigurationError(
                f"step name {full!r} is used twice in run {self.run_id!r}; step names must be "
                f"unique within a run (include what varies, e.g. f'fetch:{{url}}')"
            )
        scope.claimed.add(full)
        effects = list(side_effects) if side_effects else None
        spec = StepSpec(
            name=full,
            fn=fn,
            input_hash=sha256_hex(input, what=f"input of step {full!r}"),
            side_effects=effects,
            idempotency_key=idempotency_key or derive_idempotency_key(self.run_id, full),
            keyed=idempotency_key is not None,
            replay=replay,
            retries=retries,
            encode=lambda value: self._encode_step_output(value, full),
            decode=self._decode_step_output(full, fn),
        )
        return await self.execute(spec)

    async def state_set(self, value: Any) -> int:
        """Append a new version of the run's state; a replayed call writes nothing (R10)."""
        doc = canonical(value, what="run state")
        async with self._state_lock:
            return await self._append_state(doc)

    async def state_patch(self, patch: dict[str, Any]) -> int:
        """Apply a JSON merge patch (RFC 7386) to the latest state as a new version."""
        if not isinstance(patch, dict):
            raise ConfigurationError("state_patch takes a JSON object (a merge patch)")
        doc = canonical(patch, what="state patch")
        async with self._state_lock:
            return await self._append_state(_merge_patch(await self.state(), doc))

    async def _append_state(self, doc: Any) -> int:
        # Under the state lock: versions are allocated and written in one order.
        self._state_calls += 1
        version = self._state_calls
        if version <= self._record.state_version:
            self._state_value, self._state_loaded = None, False
            return version
        self._check_live()
        self._serialize(f"state version {version}", doc)
        await self._store.append_state(self._lease, version, doc)
        self._record = dataclasses.replace(self._record, state_version=version)
        self._state_value, self._state_loaded = doc, True
        return version

    async def state(self) -> Any:
        """The latest state value of this run (None before any ``state_set``)."""
        if not self._state_loaded:
            versions = await self._store.get_state(self.run_id)
            self._state_value = versions[-1][1] if versions else None
            self._state_loaded = True
        return self._state_value

    async def usage_record(
        self,
        *,
        kind: str = "llm",
        provider: str | None = None,
        model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        requests: int = 1,
        cost_usd: float | None = None,
    ) -> None:
        """Record token usage; deduplicated by the call's position in the run (R9)."""
        scope = _scope.get() or self._root
        n = scope.next_ordinal("\x00usage")
        self._check_live()
        await self._store.record_usage(
            self._lease,
            [
                Usage(
                    dedupe_key=f"{scope.prefix}usage#{n}",
                    step=scope.prefix.rstrip("/") or None,
                    kind=kind,
                    provider=provider,
                    model=model,
                    requests=requests,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    cached_tokens=cached_tokens,
                    reasoning_tokens=reasoning_tokens,
                    total_tokens=input_tokens + output_tokens,
                    cost_usd=cost_usd,
                )
            ],
        )

    # -- the executor ----------------------------------------------------------------------

    @property
    def root_scope(self) -> Scope:
        return self._root

    def recorded(self, name: str) -> StepRecord | None:
        """The checkpoint of step ``name`` as this execution knows it."""
        return self._steps.get(name)

    def recorded_names(self, prefix: str) -> list[str]:
        """Names of recorded steps starting with ``prefix``."""
        return [name for name in self._steps if name.startswith(prefix)]

    def _check_live(self) -> None:
        if self._lost is not None:
            raise self._lost
        if time.monotonic() > self._lease_deadline:
            # The heartbeat could not renew in time: another executor may own the run now.
            raise LeaseLost(self.run_id)

    def lookup(self, spec: StepSpec) -> Decision:
        """Decide from the prefetched checkpoint whether ``spec`` replays, parks or executes.

        Raises :class:`StepInputMismatch` (R2), :class:`StepNeedsReview` (R4) and
        :class:`StepFailed` before anything runs or is written.
        """
        self._check_live()
        rec = self._steps.get(spec.name)
        if rec is None:
            return Decision("execute")
        if rec.status != "failed_retryable" and rec.input_hash != spec.input_hash:
            raise StepInputMismatch(
                self.run_id,
                spec.name,
                rec.input_hash,
                spec.input_hash,
                _changed_parts(rec.input_parts, spec.input_parts),
            )
        if rec.status == "completed":
            self.replayed.append(spec.name)
            if rec.error is not None and spec.raise_error is not None:
                spec.raise_error(rec.error)
            return Decision("replay", rec)
        if rec.status == "manual_review":
            self._outcome = "manual_review"
            raise StepNeedsReview(self.run_id, spec.name, _reason(rec.error))
        if rec.status == "failed":
            self._outcome = "failed"
            raise StepFailed(self.run_id, spec.name, _reason(rec.error))
        if rec.status == "running" and rec.side_effects and not rec.keyed:
            return Decision("park", rec, rec.attempts)
        return Decision("execute", rec, rec.attempts + 1, in_doubt=rec.status == "running")

    async def execute(self, spec: StepSpec) -> Any:
        """Replay ``spec`` from its checkpoint or execute it and record the outcome."""
        decision = self.lookup(spec)
        if decision.kind == "replay":
            assert decision.record is not None
            return await spec.decode(decision.record.output)
        execution = await self.begin(spec, decision)
        value, error, tries = await self._attempts(spec)
        return await self.conclude(spec, execution, value, error, tries)

    async def begin(self, spec: StepSpec, decision: Decision) -> Execution:
        """Start executing a step: park an unkeyed in-doubt write (R5), or write the intent
        record of a side-effecting step."""
        if decision.kind == "park":
            await self._write(
                spec,
                "manual_review",
                attempts=decision.attempts,
                error={
                    "message": "in doubt: the executor died during an unkeyed external "
                    "write, which may or may not have happened"
                },
                events=[Event("step_in_doubt", spec.name, {"action": "manual_review"})],
            )
            self._outcome = "manual_review"
            raise StepNeedsReview(self.run_id, spec.name, "in doubt after a crash")
        if not spec.side_effects and time.monotonic() - self._confirmed_at > BOUNDARY_REUSE:
            # The step boundary: a run cancelled or taken over since this executor's last
            # write must not run another step (R6, R12). A side-effecting step's intent
            # record below is fenced and checks the same.
            await self._store.check_lease(self._lease)
            self._confirmed_at = time.monotonic()
        execution = Execution(decision.attempts, utcnow(), time.perf_counter())
        if spec.side_effects:
            kind = "step_in_doubt" if decision.in_doubt else "step_started"
            data = (
                {"action": "reexecute", "idempotency_key": spec.idempotency_key}
                if decision.in_doubt
                else None
            )
            await self._write(
                spec,
                "running",
                attempts=decision.attempts,
                started_at=execution.started,
                events=[Event(kind, spec.name, data)],
            )
        elif decision.in_doubt:
            log.info("re-executing in-doubt step %s of run %s", spec.name, self.run_id)
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
                text = self._serialize(f"output of step {spec.name!r}", encoded)
            except CheckpointSerializationError as exc:
                error = exc
        duration = (time.perf_counter() - execution.t0) * 1000
        call = spec.tool_call
        keyed = spec.keyed if call is None else (call.explicit or call.key_read)
        common: dict[str, Any] = dict(
            attempts=attempts, keyed=keyed, started_at=execution.started, duration_ms=duration
        )
        if error is None:
            await self._write(
                spec,
                "completed",
                output=encoded,
                output_json=text,
                usage=spec.usage(value) if spec.usage else (),
                events=[Event("step_completed", spec.name, {"attempts": attempts})],
                **common,
            )
            self.executed.append(spec.name)
            return value
        recorded = spec.encode_error(error) if spec.encode_error else None
        if recorded is not None:
            # A deterministic outcome (max turns, a guardrail tripwire): it is the answer.
            run_data = getattr(error, "run_data", None)
            await self._write(
                spec,
                "completed",
                error=recorded,
                usage=spec.usage(run_data) if spec.usage and run_data is not None else (),
                events=[Event("step_completed", spec.name, {"error": recorded.get("type")})],
                **common,
            )
            self.executed.append(spec.name)
            raise error
        status = self._classify(spec, keyed)
        await self._write(
            spec,
            status,
            error=_error_record(error),
            events=[Event(f"step_{status}", spec.name, _error_record(error))],
            **common,
        )
        if status in HALTING:
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
                self._check_live()
                delay = min(self._tide.retry_backoff * 2**attempt, 30.0)
                log.info(
                    "step %s failed (%s); retry %d in %.2fs", spec.name, exc, attempt + 1, delay
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def step_scope(self, name: str, tool_call: ToolCall | None = None) -> Iterator[None]:
        """Run code as the body of step ``name``: nested steps are named inside it."""
        scope_token = _scope.set((_scope.get() or self._root).child(name))
        call_token = _tool_call.set(tool_call)
        try:
            yield
        finally:
            _tool_call.reset(call_token)
            _scope.reset(scope_token)

    async def _call(self, spec: StepSpec) -> Any:
        with self.step_scope(spec.name, spec.tool_call):
            out = spec.fn()
            if inspect.isawaitable(out):
                out = await out
            return out

    def _classify(self, spec: StepSpec, keyed: bool) -> str:
        """Final-failure classification (R3)."""
        if spec.replay == "manual" or (spec.side_effects and not keyed):
            return "manual_review"
        if spec.replay == "never":
            return "failed"
        return "failed_retryable"

    async def _write(
        self,
        spec: StepSpec,
        status: str,
        *,
        attempts: int,
        events: Sequence[Event],
        output: Any = None,
        error: Any = None,
        keyed: bool | None = None,
        started_at: Any = None,
        duration_ms: float | None = None,
        usage: Sequence[Usage] = (),
        output_json: str | None = None,
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
            lease_token=self._lease.token,
            started_at=started_at or utcnow(),
            completed_at=utcnow() if status != "running" else None,
            duration_ms=duration_ms,
        )
        self._check_live()
        try:
            await self._store.write_step(
                self._lease, record, events=events, usage=usage, output_json=output_json
            )
        except (LeaseLost, RunCancelled) as exc:
            self._lost = exc
            raise
        self._confirmed_at = time.monotonic()
        self._steps[spec.name] = record

    def _serialize(self, what: str, encoded: Any) -> str:
        """The checkpoint's JSON text, checked against the size limit (R13)."""
        try:
            text = dump_json(encoded)
        except ValueError as exc:
            raise CheckpointSerializationError(f"{what} cannot be stored as JSON: {exc}") from None
        size = len(text.encode("utf-8"))
        if size > self._tide.max_payload_bytes:
            raise PayloadTooLarge(
                f"{what} is {size} bytes as JSON, over the limit of "
                f"{self._tide.max_payload_bytes} (Tidebase(max_payload_bytes=...))"
            )
        return text

    def _encode_step_output(self, value: Any, name: str) -> Any:
        from agents.result import RunResultBase

        if isinstance(value, RunResultBase):
            # The agent step inside holds the real checkpoint; replay re-enters the step
            # function so Runner.run hands back a result bound to this process's live agents.
            return {"$t": "agents.run_result"}
        return _codec.encode(value, what=f"output of step {name!r}")

    def _decode_step_output(
        self, name: str, fn: Callable[[], Any]
    ) -> Callable[[Any], Awaitable[Any]]:
        async def decode(data: Any) -> Any:
            if isinstance(data, dict) and data.get("$t") == "agents.run_result":
                # Re-enter the step as it first ran: its agent steps replay by name.
                with self.step_scope(name):
                    out = fn()
                    return await out if inspect.isawaitable(out) else out
            return _codec.decode(data)

        return decode

    # -- lifecycle -------------------------------------------------------------------------

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a background checkpoint write alive until the run finishes."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _drain(self, timeout: float | None = None) -> None:
        """Wait for background checkpoint writes (streamed runs) to land."""
        while self._pending:
            _, pending = await asyncio.wait(list(self._pending), timeout=timeout)
            if pending:
                return

    async def _heartbeat(self) -> None:
        """Renew the lease every third of its length until ``_stop_heartbeat``."""
        seconds = self._tide.lease_seconds
        while not self._ended:
            await asyncio.sleep(seconds / 3)
            self._renewing = True
            try:
                await self._store.heartbeat(self._lease, seconds)
            except (LeaseLost, RunCancelled) as exc:
                self._lost = exc
                return
            except Exception as exc:  # a transient database error: keep trying until expiry
                log.warning("heartbeat for run %s failed: %s", self.run_id, exc)
            else:
                self._lease_deadline = time.monotonic() + seconds
            finally:
                self._renewing = False

    async def _stop_heartbeat(self, heartbeat: asyncio.Task[None]) -> None:
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

    async def _settle(self, exc: BaseException) -> None:
        """Record how the execution ended and release the lease."""
        if isinstance(exc, (LeaseLost, RunCancelled)) or self._lost is not None:
            return
        if isinstance(exc, StepNeedsReview):
            status = "manual_review"
        elif isinstance(exc, StepFailed) or self._outcome == "failed":
            status = "failed"
        elif self._outcome == "manual_review":
            status = "manual_review"
        else:
            status = "failed_retryable"
        kind = {"manual_review": "run_parked", "failed": "run_failed"}.get(
            status, "run_interrupted"
        )
        with contextlib.suppress(LeaseLost, RunCancelled):
            await self._store.finish(
                self._lease,
                status,
                error=_error_record(exc),
                event=Event(kind, data=_error_record(exc)),
            )


def _check_input_size(input_data: Any, limit: int, pipeline: str) -> None:
    try:
        size = len(dump_json(input_data).encode("utf-8"))
    except ValueError as exc:
        raise CheckpointSerializationError(f"input of pipeline {pipeline!r}: {exc}") from None
    if size > limit:
        raise PayloadTooLarge(
            f"input of pipeline {pipeline!r} is {size} bytes as JSON, over the limit of {limit} "
            f"(Tidebase(max_payload_bytes=...))"
        )


def _reason(error: Any) -> str:
    return str(error.get("message", "")) if isinstance(error, dict) else ""


def _changed_parts(old: dict[str, str] | None, new: dict[str, str] | None) -> list[str]:
    if not old or not new:
        return ["input"]
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


class Tidebase:
    """Durable runs and steps in your own database (alias: ``AsyncTidebase``).

    ``database_url`` defaults to ``$TIDEBASE_DATABASE_URL``, else an embedded SQLite file
    ``./tidebase.db`` created and migrated on first use.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        lease_seconds: float = 30.0,
        retry_backoff: float = 0.2,
        max_payload_bytes: int = 16 * 1024 * 1024,
        owner: str | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ConfigurationError("lease_seconds must be positive")
        self.database_url = database_url
        self.lease_seconds = float(lease_seconds)
        self.retry_backoff = float(retry_backoff)
        self.max_payload_bytes = int(max_payload_bytes)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        from ._integration import ensure_installed

        # Load the Agents SDK integration now, when the application defines its pipelines,
        # rather than inside a first run, where the import would stall leases and heartbeats.
        ensure_installed()

    @property
    def store(self) -> Store:
        """The store for this database on the running event loop."""
        return get_store(self.database_url)

    async def _open_store(self) -> Store:
        store = self.store
        await store.open()
        return store

    async def run(
        self,
        name: str,
        fn: Callable[[Run, Any], Awaitable[Any]],
        *,
        run_id: str | None = None,
        input: Any = None,
    ) -> Any:
        """Start or resume the run ``run_id`` of pipeline ``name``, calling ``fn(run, input)``.

        A completed run returns its recorded result without calling ``fn`` (R7).
        """
        data = _codec.encode(input, what="pipeline input")
        return await self.execute_run(
            name,
            run_id,
            data,
            sha256_hex(data, what="pipeline input"),
            lambda run: fn(run, input),
        )

    async def execute_run(
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
        from ._integration import ensure_installed

        ensure_installed()
        store = await self._open_store()
        _check_input_size(input_data, self.max_payload_bytes, pipeline)
        acquired = await store.acquire(
            run_id,
            pipeline,
            owner=owner or self.owner,
            lease_seconds=self.lease_seconds,
            input=input_data,
            input_hash=input_hash,
            create=create,
            claim_token=claim_token,
            fresh_id=fresh_id,
        )
        if acquired.lease is None:
            return _codec.decode(acquired.run.output)
        run = Run(self, store, acquired)
        run_token = _run.set(run)
        scope_token = _scope.set(run._root)
        heartbeat = asyncio.create_task(run._heartbeat())
        try:
            try:
                result = await body(run)
                await run._drain()
                encoded = _codec.encode(result, what=f"result of pipeline {pipeline!r}")
                run._serialize(f"result of pipeline {pipeline!r}", encoded)
                run._check_live()
            except BaseException as exc:
                error = exc.error if isinstance(exc, StopRun) else exc
                await asyncio.shield(run._drain(timeout=self.lease_seconds))
                await asyncio.shield(run._settle(error))
                if error is exc:
                    raise
                raise error from None
            try:
                await store.finish(
                    run._lease,
                    "completed",
                    output=encoded,
                    event=Event(
                        "run_completed",
                        data={"executed": len(run.executed), "replayed": len(run.replayed)},
                    ),
                )
            except (LeaseLost, RunCancelled) as exc:
                run._lost = exc
                raise
            return result
        finally:
            await run._stop_heartbeat(heartbeat)
            _scope.reset(scope_token)
            _run.reset(run_token)

    async def cancel(self, run_id: str, reason: str | None = None) -> str:
        """Cancel a run; its executor stops at its next step boundary (R12)."""
        store = await self._open_store()
        return await store.cancel(validate_run_id(run_id), reason)

    async def get_run(self, run_id: str) -> RunRecord:
        return await (await self._open_store()).get_run(run_id)

    async def steps(self, run_id: str) -> list[StepRecord]:
        return list((await (await self._open_store()).load_steps(run_id)).values())

    async def review_step(
        self, run_id: str, step: str, action: str, output: Any = None
    ) -> StepRecord:
        """Resolve a ``manual_review`` step: ``retry`` it, supply its ``output``, or ``fail`` it."""
        encoded = _codec.encode(output, what="reviewed output") if action == "output" else None
        return await (await self._open_store()).review_step(run_id, step, action, encoded)

    async def usage(
        self,
        by: Sequence[str] = ("pipeline", "model"),
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
        from ._pricing import load_prices, parse_group_by, usage_report

        keys = parse_group_by(",".join(by))
        return await usage_report(
            await self._open_store(),
            keys,
            load_prices(prices),
            pipeline=pipeline,
            run_id=run_id,
            since=since,
        )

    async def migrate(self) -> None:
        """Run the packaged migrations against this database."""
        await self.store.migrate()

    async def close(self) -> None:
        """Dispose this database's engine on the running loop."""
        await self.store.close()


AsyncTidebase = Tidebase
