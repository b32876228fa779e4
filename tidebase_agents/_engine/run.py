"""The run context a pipeline executes in: what ``current_run()`` returns, and nothing more."""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

from .. import _codec
from .._errors import ConfigurationError, TidebaseError
from .._hashing import canonical, canonical_json, sha256_text
from .._ids import derive_idempotency_key, validate_step_name
from .._store import UsageRecord
from .._vocab import ReplayPolicy, parse
from . import waits as _waits
from .executor import Executor
from .scope import scope_var, tool_call_var
from .spec import StepSpec, is_reentrant

#: How a reentrant step output is stored (see ``spec.register_reentrant_output``); the first
#: release wrote the second spelling.
_REENTRANT = {"$t": "reentrant"}
_REENTRANT_TAGS = ("reentrant", "agents.run_result")

T = TypeVar("T")


class NotInRun(TidebaseError):
    """Raised by :func:`current_run` / :func:`idempotency_key` outside their context."""


class Run:
    """The context a pipeline executes in (``current_run()``): its id, steps, state and usage."""

    __slots__ = ("_executor",)

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    @property
    def run_id(self) -> str:
        return self._executor.run_id

    @property
    def pipeline(self) -> str:
        return self._executor.record.pipeline

    @property
    def attempt(self) -> int:
        """How many times this run has been executed, this execution included."""
        return self._executor.record.attempts

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]],
        *,
        input: Any = None,
        side_effects: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
        replay: ReplayPolicy | str = ReplayPolicy.AUTO,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[[], T],
        *,
        input: Any = None,
        side_effects: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
        replay: ReplayPolicy | str = ReplayPolicy.AUTO,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        input: Any = None,
        side_effects: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
        replay: ReplayPolicy | str = ReplayPolicy.AUTO,
    ) -> Any:
        """Run ``fn`` as the checkpointed step ``name``, or return its recorded output (R1).

        ``fn`` takes no arguments and returns a value or an awaitable; the step returns the
        value (awaited). ``input`` is what the
        step's answer depends on; a recorded step invoked with a different input raises
        :class:`StepInputMismatch` (R2). ``side_effects`` names the external systems the step
        writes to; with no ``idempotency_key`` such a step is parked for manual review rather
        than blindly re-run when it fails or is left in doubt by a crash (R3, R5).
        """
        ex = self._executor
        validate_step_name(name)
        policy = parse(ReplayPolicy, replay, "replay")
        if retries < 0:
            raise ConfigurationError("retries must be >= 0")
        scope = scope_var.get() or ex.root
        full = validate_step_name(f"{scope.prefix}{name}")
        if full in scope.claimed:
            raise ConfigurationError(
                f"step name {full!r} is used twice in run {self.run_id!r}; step names must be "
                f"unique within a run (include what varies, e.g. f'fetch:{{url}}')"
            )
        scope.claimed.add(full)
        _codec.register_annotations(fn)

        def encode(value: Any) -> Any:
            if is_reentrant(value):
                return dict(_REENTRANT)
            return _codec.encode(value, what=f"output of step {full!r}")

        async def decode(data: Any) -> Any:
            if isinstance(data, dict) and len(data) == 1 and data.get("$t") in _REENTRANT_TAGS:
                # Re-enter the step as it first ran: its nested steps replay by name and hand
                # back results bound to this process's live objects.
                with ex.step_scope(full):
                    out = fn()
                    return await out if inspect.isawaitable(out) else out
            return _codec.decode(data, what=f"output of step {full!r}")

        input_text = canonical_json(input, what=f"input of step {full!r}")
        spec = StepSpec(
            name=full,
            fn=fn,
            input_hash=sha256_text(input_text, what=f"input of step {full!r}"),
            input_json=None if input is None else _codec.bounded_json(input_text),
            side_effects=list(side_effects) if side_effects else None,
            idempotency_key=idempotency_key or derive_idempotency_key(self.run_id, full),
            keyed=idempotency_key is not None,
            replay=policy,
            retries=retries,
            encode=encode,
            decode=decode,
        )
        return await ex.execute(spec)

    async def wait_for(self, topic: str, *, timeout: float | None = None) -> Any:
        """Wait for the payload of a message sent to this run on ``topic``
        (``Tidebase.send`` / ``tidebase-agents runs send``), delivered exactly once whether it
        was sent before or after the wait started.

        Until it comes the run parks (W1): the call raises :class:`RunWaiting` to whoever
        invoked the run, which holds nothing meanwhile; invoking it again after the message
        was sent (a worker does so at once for a queued run) replays to here and returns the
        payload. After ``timeout`` seconds from the first wait without a message it raises
        :class:`WaitTimeout`, which the pipeline may catch.
        """
        _check_seconds("timeout", timeout)
        validate_step_name(topic)
        name = self._wait_name(f"wait:{topic}")
        return await _waits.wait_for(self._executor, name, topic, timeout)

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the run parks (:class:`RunWaiting`, holding nothing) until
        ``seconds`` after the sleep first started, when a worker resumes a queued run, or an
        invocation after that time goes on."""
        _check_seconds("seconds", seconds)
        await _waits.sleep(self._executor, self._wait_name("sleep"), float(seconds))

    def _wait_name(self, base: str) -> str:
        ex = self._executor
        scope = scope_var.get() or ex.root
        name = validate_step_name(f"{scope.prefix}{base}#{scope.next_ordinal(base)}")
        scope.claimed.add(name)
        return name

    async def state_set(self, value: Any) -> int:
        """Append a new version of the run's state; a replayed call writes nothing (R10)."""
        return await self._executor.append_state(canonical(value, what="run state"))

    async def state_patch(self, patch: dict[str, Any]) -> int:
        """Apply a JSON merge patch (RFC 7386) to the latest state as a new version."""
        if not isinstance(patch, dict):
            raise ConfigurationError("state_patch takes a JSON object (a merge patch)")
        doc = canonical(patch, what="state patch")
        ex = self._executor
        return await ex.append_state(_merge_patch(await ex.state(), doc))

    async def state(self) -> Any:
        """The latest state value of this run (None before any ``state_set``)."""
        return await self._executor.state()

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
        counts = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_tokens": cached_tokens,
            "reasoning_tokens": reasoning_tokens,
            "requests": requests,
        }
        for field, value in counts.items():
            if type(value) is not int or value < 0:
                raise ConfigurationError(
                    f"usage_record: {field} must be a non-negative int, got {value!r}"
                )
        if cost_usd is not None and (
            type(cost_usd) not in (int, float) or not math.isfinite(cost_usd) or cost_usd < 0
        ):
            raise ConfigurationError(
                f"usage_record: cost_usd must be a non-negative finite number, got {cost_usd!r}"
            )
        if not isinstance(kind, str) or not kind:
            raise ConfigurationError(f"usage_record: kind must be a non-empty string, got {kind!r}")
        for field, text, limit in (
            ("kind", kind, 32),
            ("provider", provider, 64),
            ("model", model, 255),
        ):
            if text is not None and (not isinstance(text, str) or len(text) > limit):
                raise ConfigurationError(
                    f"usage_record: {field} must be a string of at most {limit} characters"
                )
            if text is not None:
                validate_step_name(text)
        ex = self._executor
        scope = scope_var.get() or ex.root
        n = scope.next_ordinal("\x00usage")
        await ex.record_usage(
            UsageRecord(
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
                cost_usd=None if cost_usd is None else float(cost_usd),
            )
        )


def _check_seconds(what: str, value: float | None) -> None:
    if value is not None and (
        type(value) not in (int, float) or not math.isfinite(value) or value < 0
    ):
        raise ConfigurationError(f"{what} must be a non-negative number of seconds, got {value!r}")


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


run_var: contextvars.ContextVar[Run | None] = contextvars.ContextVar("tidebase_run", default=None)


def active_executor() -> Executor | None:
    """The executor of the run executing in this task, or None outside a pipeline."""
    run = run_var.get()
    return None if run is None else run._executor


def current_run() -> Run:
    """The run context of the pipeline executing in this task.

    Raises :class:`NotInRun` outside a ``@checkpointed_pipeline`` or ``Tidebase.run``.
    """
    run = run_var.get()
    if run is None:
        raise NotInRun(
            "current_run() was called outside a pipeline; call it from code running inside a "
            "@checkpointed_pipeline function or a Tidebase.run(...) pipeline"
        )
    return run


def idempotency_key() -> str:
    """The idempotency key derived for the durable tool call executing in this task (I4).

    Stable across attempts and processes: pass it to the external API so a re-executed call is
    deduplicated there. Raises :class:`NotInRun` outside a durable tool call in a pipeline.
    """
    call = tool_call_var.get()
    if call is None:
        raise NotInRun(
            "idempotency_key() was called outside a durable tool call; call it from the body of "
            "a @durable_tool running inside a pipeline"
        )
    if not call.key_read:
        call.key_read = True
        if call.on_first_read is not None:
            call.on_first_read()
    return call.key
