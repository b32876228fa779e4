"""``@checkpointed_pipeline``: a pipeline function whose every invocation is a durable run."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from . import _codec
from ._engine import PipelineOptions, reset_pipeline_options, set_pipeline_options
from ._errors import ConfigurationError, RunNotFound
from ._hashing import sha256_hex
from ._ids import validate_run_id
from ._store import DEFAULT_QUEUE, ApprovalRecord, RunRecord, StepsReset
from ._tidebase import Tidebase, _sdk_installed
from ._vocab import ApprovalMode, parse

if TYPE_CHECKING:
    from ._sdk.context import ContextCodec

P = ParamSpec("P")
R = TypeVar("R")

_registry: dict[str, CheckpointedPipeline[Any, Any]] = {}


def registered_pipelines() -> dict[str, CheckpointedPipeline[Any, Any]]:
    """Pipelines registered by name in this process (what a worker can execute)."""
    return dict(_registry)


def get_pipeline(name: str) -> CheckpointedPipeline[Any, Any]:
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise ConfigurationError(
            f"no pipeline named {name!r} is registered in this process (registered: {known}); "
            f"import the module that defines it"
        ) from None


class CheckpointedPipeline(Generic[P, R]):
    """A registered, checkpointed pipeline. Call it like the original function for a new run;
    ``pipeline.with_run_id(run_id)(...)`` creates or resumes a specific run (so does
    ``pipeline(..., run_id=...)``, which type checkers cannot see)."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        name: str,
        *,
        tide: Tidebase | None = None,
        database_url: str | None = None,
        lease_seconds: float | None = None,
        context_codec: ContextCodec | None = None,
        recover: bool = True,
        retention: dt.timedelta | None = None,
        approvals: ApprovalMode | str = ApprovalMode.PARK,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@checkpointed_pipeline needs an async function, got {fn!r}")
        self._sig = inspect.signature(fn)
        if "run_id" in self._sig.parameters:
            raise TypeError(
                f"{fn.__qualname__} declares a parameter named 'run_id', which "
                f"@checkpointed_pipeline reserves for the run id; rename the parameter"
            )
        if tide is not None and (database_url is not None or lease_seconds is not None):
            raise TypeError("pass either tide= or database_url=/lease_seconds=, not both")
        if context_codec is not None and not (
            callable(getattr(context_codec, "dump", None))
            and callable(getattr(context_codec, "restore", None))
        ):
            raise ConfigurationError(
                f"context_codec of pipeline {name!r} needs dump(context) and "
                f"restore(context, data) methods, got {context_codec!r}"
            )
        if retention is not None and (
            not isinstance(retention, dt.timedelta) or retention <= dt.timedelta(0)
        ):
            raise ConfigurationError(
                f"retention of pipeline {name!r} must be a positive timedelta, got {retention!r}"
            )
        self.fn = fn
        #: How long ended runs are kept; workers serving the pipeline prune older ones.
        self.retention = retention
        _codec.register_annotations(fn)
        self.name = name
        #: Whether workers serving this pipeline finish its direct-call runs whose process died.
        self.recover = recover
        self.options = PipelineOptions(
            context_codec=context_codec, approvals=parse(ApprovalMode, approvals, "approvals")
        )
        if tide is None:
            tide = Tidebase(database_url, lease_seconds=lease_seconds)
        self.tide = tide
        functools.update_wrapper(self, fn)
        _registry[name] = self
        _sdk_installed()

    def _record_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str]:
        try:
            bound = self._sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None
        data = {
            "args": _codec.encode(list(bound.args), what=f"arguments of pipeline {self.name!r}"),
            "kwargs": _codec.encode(bound.kwargs, what=f"arguments of pipeline {self.name!r}"),
        }
        return data, sha256_hex(data, what=f"arguments of pipeline {self.name!r}")

    async def _execute(
        self,
        run_id: str | None,
        data: Any,
        input_hash: str | None,
        *,
        create: bool = True,
        owner: str | None = None,
        claim_token: int | None = None,
    ) -> R:
        async def body(_run: Any) -> R:
            token = set_pipeline_options(self.options)
            try:
                return await self.fn(*_codec.decode(data["args"]), **_codec.decode(data["kwargs"]))
            finally:
                reset_pipeline_options(token)

        result: R = await self.tide._execute(
            self.name,
            run_id,
            data,
            input_hash,
            body,
            create=create,
            owner=owner,
            claim_token=claim_token,
        )
        return result

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        run_id = kwargs.pop("run_id", None)
        data, input_hash = self._record_args(args, kwargs)
        return await self._execute(run_id, data, input_hash)  # type: ignore[arg-type]

    def with_run_id(self, run_id: str) -> Callable[P, Coroutine[Any, Any, R]]:
        """The pipeline bound to run ``run_id``: calling it creates or resumes that run.

        ``await research.with_run_id("run-42")("durable agents")`` is
        ``await research("durable agents", run_id="run-42")`` with the pipeline's own
        parameter and return types.
        """
        run_id = validate_run_id(run_id)

        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            data, input_hash = self._record_args(args, kwargs)
            return await self._execute(run_id, data, input_hash)

        functools.update_wrapper(call, self.fn)
        return call

    async def _own_run(self, run_id: str) -> RunRecord:
        run = await self.tide.get_run(run_id)
        if run.pipeline != self.name:
            raise RunNotFound(run_id)
        return run

    async def resume(self, run_id: str) -> R:
        """Re-invoke run ``run_id`` with the arguments it was recorded with."""
        run = await self._own_run(run_id)
        return await self._execute(run_id, run.input, run.input_hash, create=False)

    async def fork(
        self, run_id: str, *, from_step: str | None = None, new_run_id: str | None = None
    ) -> str:
        """Start a new run of this pipeline that re-runs run ``run_id`` from ``from_step`` on;
        return its id (see :meth:`Tidebase.fork`). ``await pipeline.resume(new_id)`` runs it."""
        await self._own_run(run_id)
        return await self.tide.fork(run_id, from_step=from_step, new_run_id=new_run_id)

    async def reset_step(self, run_id: str, step: str) -> StepsReset:
        """Discard ``step`` of run ``run_id`` and every checkpoint after it (see
        :meth:`Tidebase.reset_step`); ``await pipeline.resume(run_id)`` re-runs them."""
        await self._own_run(run_id)
        return await self.tide.reset_step(run_id, step)

    async def approve(self, run_id: str, call_id: str, *, always: bool = False) -> ApprovalRecord:
        """Approve a tool call run ``run_id`` waits on (:meth:`Tidebase.approve`)."""
        await self._own_run(run_id)
        return await self.tide.approve(run_id, call_id, always=always)

    async def reject(
        self, run_id: str, call_id: str, *, message: str | None = None
    ) -> ApprovalRecord:
        """Reject a tool call run ``run_id`` waits on (:meth:`Tidebase.reject`)."""
        await self._own_run(run_id)
        return await self.tide.reject(run_id, call_id, message=message)

    async def run_claimed(self, run_id: str, *, owner: str, claim_token: int) -> R:
        """Execute a run a worker claimed from the queue under ``claim_token``."""
        run = await self.tide.get_run(run_id)
        return await self._execute(
            run_id, run.input, run.input_hash, create=False, owner=owner, claim_token=claim_token
        )

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Record a queued run with these arguments for a worker to execute; return its run
        id (P1). :meth:`enqueue_with` sets the queue, dedupe key and the other options.

        The options are also taken as keywords here (``enqueue(..., queue="gpu")``) when the
        pipeline has no parameter of that name; type checkers only see ``enqueue_with``.
        """
        options: dict[str, Any] = {
            name: kwargs.pop(name)
            for name in _ENQUEUE_OPTIONS
            if name in kwargs and name not in self._sig.parameters
        }
        return await self.enqueue_with(**options)(*args, **kwargs)

    def enqueue_with(
        self,
        *,
        run_id: str | None = None,
        queue: str = DEFAULT_QUEUE,
        dedupe_key: str | None = None,
        priority: int = 0,
        delay: float | dt.timedelta | None = None,
        max_attempts: int | None = None,
        deadline: dt.datetime | dt.timedelta | None = None,
    ) -> Callable[P, Coroutine[Any, Any, str]]:
        """:meth:`enqueue` with options: calling the result with the pipeline's arguments
        records the queued run and returns its id.

        At most one active run exists per ``(queue, dedupe_key)``: enqueueing again while one
        is active returns the active run's id. ``delay`` postpones the first attempt,
        ``deadline`` cancels the run if it has not finished by then, ``max_attempts`` bounds
        how often workers start it (default 5).
        """

        async def call(*args: P.args, **kwargs: P.kwargs) -> str:
            data, input_hash = self._record_args(args, kwargs)
            return await self.tide._enqueue(
                self.name,
                data,
                input_hash,
                run_id=run_id,
                queue=queue,
                dedupe_key=dedupe_key,
                priority=priority,
                delay=delay,
                max_attempts=max_attempts,
                deadline=deadline,
            )

        return call


_ENQUEUE_OPTIONS = tuple(
    name
    for name in inspect.signature(CheckpointedPipeline.enqueue_with).parameters
    if name != "self"
)


@overload
def checkpointed_pipeline(name: Callable[P, Awaitable[R]], /) -> CheckpointedPipeline[P, R]: ...


@overload
def checkpointed_pipeline(
    name: str | None = None,
    /,
    *,
    database_url: str | None = None,
    tide: Tidebase | None = None,
    lease_seconds: float | None = None,
    context_codec: ContextCodec | None = None,
    recover: bool = True,
    retention: dt.timedelta | None = None,
    approvals: ApprovalMode | str = ApprovalMode.PARK,
) -> Callable[[Callable[P, Awaitable[R]]], CheckpointedPipeline[P, R]]: ...


def checkpointed_pipeline(
    name: str | Callable[..., Any] | None = None,
    /,
    *,
    database_url: str | None = None,
    tide: Tidebase | None = None,
    lease_seconds: float | None = None,
    context_codec: ContextCodec | None = None,
    recover: bool = True,
    retention: dt.timedelta | None = None,
    approvals: ApprovalMode | str = ApprovalMode.PARK,
) -> Any:
    """Make an async pipeline function durable.

    Inside it, every ``Runner.run`` / ``run_sync`` / ``run_streamed`` and every
    ``@durable_tool`` call is a checkpoint. Usable bare (the name is ``module:qualname``) or
    with a name; ``database_url`` or ``tide`` pick the database (default
    ``$TIDEBASE_DATABASE_URL``, else embedded SQLite). Agent checkpoints hold the run context
    as each agent run left it (pydantic models, dataclasses and dicts of JSON values on their
    own); ``context_codec`` (``dump(context) -> JSON`` and ``restore(context, data)``, in place)
    checkpoints any other context.

    A run whose executor died (its process killed, its machine gone) is finished by a worker
    serving the pipeline, enqueued or started by a direct call, as soon as the death is
    detectable (P4); ``recover=False`` leaves direct-call runs to their caller to re-invoke.
    ``retention`` keeps ended runs that long: workers serving the pipeline prune older ones
    (``Tidebase.prune``) every ``retention_interval``.
    An agent run that stops on tool calls needing approval parks the run (``approvals="park"``,
    W1): the call raises :class:`ApprovalRequired`; once each call is decided
    (:meth:`approve` / :meth:`reject`), invoking the run again continues the agent run.
    ``approvals="return"`` hands the interrupted result to the code instead, which drives the
    SDK's ``RunState`` itself.
    """
    if callable(name):
        fn = name
        return CheckpointedPipeline(fn, f"{fn.__module__}:{fn.__qualname__}")

    def decorate(fn: Callable[P, Awaitable[R]]) -> CheckpointedPipeline[P, R]:
        return CheckpointedPipeline(
            fn,
            name or f"{fn.__module__}:{fn.__qualname__}",
            tide=tide,
            database_url=database_url,
            lease_seconds=lease_seconds,
            context_codec=context_codec,
            recover=recover,
            retention=retention,
            approvals=approvals,
        )

    return decorate
