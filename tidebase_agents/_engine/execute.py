"""One execution of a run: acquire it, run the body under its lease, record how it ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import _codec
from .._errors import PayloadTooLarge
from .._store import NewRun, Store
from .executor import Executor
from .run import Run, run_var
from .scope import scope_var
from .settings import EngineSettings
from .spec import RunInfo, StopRun, run_scope

log = logging.getLogger("tidebase_agents")


def check_input_size(input_data: Any, limit: int, pipeline: str) -> None:
    """Refuse pipeline arguments that cannot be stored, before anything is written (R13)."""
    size = len(_codec.checked_json(input_data, f"input of pipeline {pipeline!r}").encode("utf-8"))
    if size > limit:
        raise PayloadTooLarge(
            f"input of pipeline {pipeline!r} is {size} bytes as JSON, over the limit of {limit} "
            f"(Tidebase(max_payload_bytes=...))"
        )


async def execute_run(
    store: Store,
    settings: EngineSettings,
    new: NewRun,
    body: Callable[[Run], Awaitable[Any]],
    *,
    create: bool = True,
    claim_token: int | None = None,
    fresh_id: bool = False,
) -> Any:
    """Acquire the run, execute ``body`` under its lease, and record how it ended.

    A completed run returns its recorded result without calling ``body`` (R7). ``claim_token``
    lets a worker execute a run it claimed from the queue.
    """
    check_input_size(new.input, settings.max_payload_bytes, new.pipeline)
    acquired = await store.acquire(new, create=create, claim_token=claim_token, fresh_id=fresh_id)
    info = RunInfo(new.pipeline, new.run_id, acquired.run.attempts, acquired.lease is None)
    if acquired.lease is None:
        log.debug("run %s had completed: its recorded result is returned", new.run_id)
        with run_scope(info):
            return _codec.decode(acquired.run.output, what=f"result of run {new.run_id!r}")
    if acquired.steps:
        log.info(
            "run %s of %s: attempt %d, %d recorded steps to replay",
            new.run_id,
            new.pipeline,
            info.attempt,
            len(acquired.steps),
        )
    else:
        log.debug("run %s of %s: attempt %d", new.run_id, new.pipeline, info.attempt)
    with run_scope(info):
        return await _execute(settings, new, body, Executor(store, settings, acquired))


async def _execute(
    settings: EngineSettings, new: NewRun, body: Callable[[Run], Awaitable[Any]], ex: Executor
) -> Any:
    run = Run(ex)
    run_token = run_var.set(run)
    scope_token = scope_var.set(ex.root)
    heartbeat = asyncio.create_task(ex.heartbeat())
    what = f"result of pipeline {new.pipeline!r}"
    try:
        try:
            result = await body(run)
            await ex.drain()
            encoded = _codec.encode(result, what=what)
            ex.serialize(what, encoded)
            ex.check_live()
        except BaseException as exc:
            error = exc.error if isinstance(exc, StopRun) else exc
            await asyncio.shield(ex.drain(timeout=settings.lease_seconds))
            try:
                await asyncio.shield(ex.settle(error))
            except Exception as settle_error:
                # The caller hears of the first failure; the failed settle is noted beside it.
                log.warning("run %s: could not record its end: %s", new.run_id, settle_error)
                if hasattr(error, "add_note"):
                    error.add_note(
                        f"tidebase-agents could not record the run's end: {settle_error}"
                    )
            if error is exc:
                raise
            raise error from None
        await ex.complete(encoded)
        log.debug(
            "run %s completed: %d steps executed, %d replayed",
            new.run_id,
            len(ex.executed),
            len(ex.replayed),
        )
        return result
    finally:
        await ex.stop_heartbeat(heartbeat)
        scope_var.reset(scope_token)
        run_var.reset(run_token)
