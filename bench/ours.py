"""Every assumption the harness makes about tidebase-agents' API, in one place.

If the library's API moves, adapt the small functions here; the configurations call nothing else
of the library. The API it relies on:

- ``from tidebase_agents import checkpointed_pipeline, durable_tool, Tidebase, RunLocked``
- ``@checkpointed_pipeline(name, database_url=URL)`` on an async function; each plain call
  (no ``run_id=``) is a new run.
- ``@function_tool`` over a bare ``@durable_tool``.
- ``Tidebase(database_url=URL, lease_seconds=S)``; ``await tide.run(name, fn, run_id=..., input=...)``
  with ``fn(run, input)``; ``await run.step(name, fn, input=..., side_effects=[...])`` where ``fn``
  takes no arguments and returns a value.
- ``tide.store.statements`` counts the statements the library sent; ``tide.store.engine`` is its
  ``AsyncEngine`` (commits and a statement sample are taken on its ``sync_engine``);
  ``tide.close()`` / ``tide.aclose()`` if present, else the engine is disposed.
- ``tidebase-agents migrate`` migrates the database named by ``TIDEBASE_DATABASE_URL``; if that
  fails, ``await Tidebase(database_url=URL).migrate()`` is tried.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import workload

PIPELINE_NAME = "bench-research"
# The keyword of Tidebase(...) that sets the lease length (used by the resume benchmark).
LEASE_KWARG = "lease_seconds"
SIDE_EFFECTS: Sequence[str] = ("bench-sink",)

Pipeline = Callable[[str, str], Awaitable[str]]


def make_pipeline(database_url: str) -> Pipeline:
    """The research pipeline under ``@checkpointed_pipeline`` with a ``@durable_tool`` lookup."""
    from agents import Runner, function_tool

    from tidebase_agents import checkpointed_pipeline, durable_tool

    @function_tool
    @durable_tool
    async def lookup(topic: str) -> str:
        return await workload.lookup_impl(topic)

    @checkpointed_pipeline(PIPELINE_NAME, database_url=database_url)
    async def research(topic: str, uid: str) -> str:
        return await workload.research(topic, uid, run=Runner.run, lookup_tool=lookup)

    pipeline: Pipeline = research
    return pipeline


def group_commits(pipeline: Any) -> dict[str, int]:
    """How many batches of more than one step write the pipeline's store sent, and the writes
    they carried (PostgreSQL's group commit; empty where the store has none)."""
    from tidebase_agents._store import sql

    group = getattr(pipeline.tide.store, "_grouped", {}).get(sql.WRITE_STEP)
    if group is None:
        return {}
    return {"group_batches": group.batches, "group_batched_writes": group.batched_writes}


def make_tidebase(database_url: str, *, lease_seconds: float | None = None) -> Any:
    from tidebase_agents import Tidebase

    options: dict[str, Any] = {}
    if lease_seconds is not None:
        options[LEASE_KWARG] = lease_seconds
    return Tidebase(database_url=database_url, **options)


def library_store(tide: Any) -> Any:
    """The library's store; ``.statements`` counts every statement it sent, ``.engine`` is its
    SQLAlchemy ``AsyncEngine``."""
    return tide.store


def library_engine(tide: Any) -> Any:
    """The library's SQLAlchemy ``AsyncEngine`` (the statement counter attaches to it)."""
    return tide.store.engine


def run_locked_error() -> type[BaseException]:
    from tidebase_agents import RunLocked

    return RunLocked


async def close_tidebase(tide: Any) -> None:
    for name in ("aclose", "close"):
        closer = getattr(tide, name, None)
        if callable(closer):
            result = closer()
            if inspect.isawaitable(result):
                await result
            return
    await library_engine(tide).dispose()


def migrate_command() -> list[str]:
    """The command that migrates ``TIDEBASE_DATABASE_URL`` (run by the orchestrator once)."""
    script = Path(sys.executable).parent / "tidebase-agents"
    if script.exists():
        return [str(script), "migrate"]
    return [
        sys.executable,
        "-c",
        "import sys; from tidebase_agents._cli import main; sys.argv[0] = 'tidebase-agents'; "
        "sys.exit(main())",
        "migrate",
    ]


async def migrate_api(database_url: str) -> None:
    """Fallback when the CLI fails: the runtime's own ``migrate()``."""
    tide = make_tidebase(database_url)
    try:
        await tide.migrate()
    finally:
        await close_tidebase(tide)


def migrate_env(database_url: str) -> dict[str, str]:
    return {**os.environ, "TIDEBASE_DATABASE_URL": database_url}
