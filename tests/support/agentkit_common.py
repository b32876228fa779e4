"""Shared helpers for the agent pipeline tests: scripted models, an "external API" stub that
dedupes by idempotency key, child-process plumbing and RunResult comparison.

Importable in child processes (``run_child`` puts ``tests/`` on ``PYTHONPATH``). A child runs
``agentkit_common.child_main([MODULE:FUNCTION, JSON_KWARGS])``; the async scenario's dict is
printed as the last stdout line (``{"outcome": "ok", ...}`` or the exception type's name). Crash
scenarios end in ``os._exit(CRASH_CODE)`` and print nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
os.environ.pop("OPENAI_API_KEY", None)

from agents import set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from tidebase_agents import RunLocked, Tidebase, checkpointed_pipeline

set_tracing_disabled(True)

CRASH_CODE = 17
CHILD_CODE = "import agentkit_common, sys; agentkit_common.child_main(sys.argv[1:])"


# -- scripted models ------------------------------------------------------------------------------


def usage(inp: int = 10, out: int = 5) -> Usage:
    return Usage(requests=1, input_tokens=inp, output_tokens=out, total_tokens=inp + out)


def short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def message(text: str, *, inp: int = 10, out: int = 5) -> ModelStep:
    """An assistant message with a deterministic item id (so reruns produce equal items)."""
    return ModelStep(
        output=[assistant_message(text, item_id=f"msg-{short_hash(text)}")],
        usage=usage(inp, out),
    )


def tool_calls(*calls: tuple[str, dict[str, Any]], inp: int = 12, out: int = 3) -> ModelStep:
    """One model response with one or more function calls (call ids derived from the calls)."""
    return ModelStep(
        output=[
            function_call(name, args, call_id=f"call-{name}-{short_hash(args)}")
            for name, args in calls
        ],
        usage=usage(inp, out),
    )


def policy_model(respond: Callable[[Any], Any], *, steps: int = 200) -> ScriptedModel:
    """A ScriptedModel whose every answer is computed from the call (an "infinite" script), so a
    re-executed run gets the answers a real, deterministic model would give. ``.calls`` counts."""
    return ScriptedModel([ModelStep.respond(respond) for _ in range(steps)])


def input_items(call: Any) -> list[Any]:
    return [{"role": "user", "content": call.input}] if isinstance(call.input, str) else call.input


def _current_turn(call: Any) -> list[Any]:
    """Input items from the last user message on (earlier ones are session history)."""
    items = input_items(call)
    last_user = max(
        (
            i
            for i, item in enumerate(items)
            if isinstance(item, dict) and item.get("role") == "user"
        ),
        default=0,
    )
    return list(items[last_user:])


def user_text(call: Any) -> str:
    """The (last) user message of the model call's input."""
    item = _current_turn(call)[0] if input_items(call) else {}
    content = item.get("content", "") if isinstance(item, dict) else ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def tool_outputs(call: Any) -> list[str]:
    """Outputs of the function calls answered since the last user message."""
    return [
        str(item.get("output"))
        for item in _current_turn(call)
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


def answers(text: Callable[[str], str]) -> ScriptedModel:
    """A model that answers ``text(user input)`` in one turn."""
    return policy_model(lambda call: message(text(user_text(call))))


# -- files that survive os._exit ------------------------------------------------------------------


def log_line(path: str | Path, line: str) -> None:
    """Append one line to ``path`` durably enough for os._exit right after."""
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


class ExternalApi:
    """A ticketing "external API" backed by files: every call is logged in ``attempts``; a write
    with an idempotency key that was already written returns the earlier ticket instead of
    writing again (as a real API deduplicating by key would)."""

    def __init__(self, directory: str | Path) -> None:
        self.attempts = Path(directory, "api-attempts.log")
        self.writes = Path(directory, "api-writes.log")

    def create(self, title: str, key: str | None) -> str:
        log_line(self.attempts, json.dumps({"title": title, "key": key, "pid": os.getpid()}))
        for line in read_lines(self.writes):
            row = json.loads(line)
            if key is not None and row["key"] == key:
                return str(row["ticket"])
        ticket = f"T-{len(read_lines(self.writes)) + 1}"
        log_line(self.writes, json.dumps({"title": title, "key": key, "ticket": ticket}))
        return ticket

    def attempt_rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in read_lines(self.attempts)]

    def write_rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in read_lines(self.writes)]


def crash() -> None:
    """Die like a killed process: no cleanup, no finally blocks, no lease release."""
    os._exit(CRASH_CODE)


# -- database URLs --------------------------------------------------------------------------------


def async_url(url: str) -> str:
    """The SQLAlchemy async spelling of a test database URL (for SQLAlchemySession)."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    return url


async def until_unlocked(call: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """Invoke ``call`` until the run's lease is free (a crashed executor's lease expires)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
async def close_engines(request: pytest.FixtureRequest) -> Any:
    """Dispose the test database's engine on the test's event loop afterwards (import this
    fixture into a test module to use it)."""
    yield
    url = getattr(request.node, "funcargs", {}).get("db_url")
    if url is not None:
        await Tidebase(url).close()


# -- RunResult comparison -------------------------------------------------------------------------


def result_summary(result: Any) -> dict[str, Any]:
    """What user code reads from a RunResult, in comparable form."""
    return {
        "final_output": result.final_output,
        "final_output_type": type(result.final_output),
        "input_list": result.to_input_list(),
        "last_agent": result.last_agent,
        "item_types": [type(item).__name__ for item in result.new_items],
        "item_agents": [item.agent for item in result.new_items],
        "usage": dataclasses.asdict(result.context_wrapper.usage),
    }


def assert_same_result(replayed: Any, original: Any) -> None:
    """R1: a replayed RunResult reads exactly like the original one, bound to live agents."""
    got, want = result_summary(replayed), result_summary(original)
    assert got["final_output_type"] is want["final_output_type"]
    assert got["final_output"] == want["final_output"]
    assert got["input_list"] == want["input_list"]
    assert got["last_agent"] is want["last_agent"]
    assert got["item_types"] == want["item_types"]
    assert all(a is b for a, b in zip(got["item_agents"], want["item_agents"], strict=True))
    assert got["usage"] == want["usage"]
    assert replayed is not original


def total_calls(models: Sequence[ScriptedModel]) -> int:
    return sum(len(m.calls) for m in models)


class Interrupted(Exception):
    """Raised by a pipeline body to end an attempt early (a failure after some steps finished)."""


async def roundtrip(
    url: str, run: Callable[[], Awaitable[Any]], models: Sequence[ScriptedModel]
) -> tuple[Any, Any, str]:
    """Execute ``run()`` (one agent run, returning its result) inside a pipeline whose first
    attempt fails right after it; re-invoke the run so the agent step replays from its checkpoint.

    Returns ``(original result, replayed result, run id)``. Fails if any of ``models`` is called
    during the replay.
    """
    captured: list[Any] = []
    run_id = f"roundtrip-{uuid.uuid4().hex[:12]}"

    @checkpointed_pipeline("agentkit-roundtrip", database_url=url)
    async def pipeline() -> str:
        captured.append(await run())
        if len(captured) == 1:
            raise Interrupted
        return "done"

    with pytest.raises(Interrupted):
        await pipeline(run_id=run_id)
    before = total_calls(models)
    assert await pipeline(run_id=run_id) == "done"
    assert total_calls(models) == before, "a model was called while replaying"
    assert len(captured) == 2
    return captured[0], captured[1], run_id


# -- child processes ------------------------------------------------------------------------------


def child_main(argv: list[str]) -> None:
    target, kwargs = argv[0], json.loads(argv[1])
    module_name, _, function = target.partition(":")
    scenario = getattr(importlib.import_module(module_name), function)
    try:
        report: dict[str, Any] = {"outcome": "ok", **(asyncio.run(scenario(**kwargs)) or {})}
    except Exception as exc:
        report = {"outcome": type(exc).__name__, "message": str(exc)}
    print(json.dumps(report, default=repr), flush=True)


def report_of(proc: Any) -> dict[str, Any]:
    """The JSON report a child printed last (fails with its stderr if there is none)."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"child printed no report (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def assert_crashed(proc: Any) -> None:
    assert proc.returncode == CRASH_CODE, (
        f"child was expected to crash (rc={CRASH_CODE}), got rc={proc.returncode}\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
