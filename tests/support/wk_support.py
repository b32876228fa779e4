"""Helpers for the queue, worker and CLI tests: real child processes, polling, log checks."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tidebase_agents import Tidebase
from tidebase_agents._store import Store

T = TypeVar("T")
TESTS_DIR = Path(__file__).parent
_SCRIPT = Path(sys.executable).parent / "tidebase-agents"
#: The installed console script, as users run it.
CLI: list[str] = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tidebase_agents._cli"]
)


def child_env(url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a child process: tests/ importable, wide tables, no tracing."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "COLUMNS": "250",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("TIDEBASE_DATABASE_URL", None)
    if url is not None:
        env["TIDEBASE_DATABASE_URL"] = url
    return env


def cli(
    *args: str, url: str | None = None, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run the ``tidebase-agents`` console script (``--database-url url`` when given)."""
    argv = [*CLI, *(["--database-url", url] if url else []), *args]
    return subprocess.run(
        argv, env=env or child_env(), capture_output=True, text=True, timeout=timeout
    )


def cli_many(
    commands: Sequence[Sequence[str]], *, url: str, timeout: float = 90
) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI commands at once (they only read), in order of ``commands``."""
    procs = [
        subprocess.Popen(
            [*CLI, "--database-url", url, *cmd],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = []
    for cmd, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess([*CLI, *cmd], proc.returncode, stdout, stderr))
    return results


def start_worker(url: str, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """Start ``tidebase-agents worker --app wk_app:tide`` with its log in ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen(
            [*CLI, "--database-url", url, "worker", "--app", "wk_app:tide", *args],
            env=child_env(**env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


async def wait_for(
    check: Callable[[], Awaitable[T] | T], what: str, *, timeout: float = 60, interval: float = 0.1
) -> T:
    """Poll ``check`` (sync or async) until it returns something truthy; fail naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def assert_gap_free(store: Store, run_id: str) -> list[str]:
    """Assert the run's event log is 1..n with the counter at n; return the event kinds."""
    events = await store.get_events(run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), events
    assert (await store.get_run(run_id)).event_seq == len(events)
    return [e.kind for e in events]


def asyncpg_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def enqueue(
    store: Store, pipeline: str, data: Any, input_hash: str | None, **options: Any
) -> str:
    """Record a queued run of ``pipeline`` directly (no pipeline object needed)."""
    return await Tidebase(store.url)._enqueue(pipeline, data, input_hash, **options)
