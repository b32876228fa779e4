"""Scenarios run in real child processes, plus the value types tests checkpoint.

A child runs ``python -c "import child_support, sys; child_support.main(sys.argv[1:])" SCENARIO
JSON_KWARGS`` and prints one JSON line ``{"outcome": ..., ...}`` as its last line of stdout:
``"ok"`` or the name of the ``TidebaseError`` it ended with. Crash scenarios end by
``os._exit`` or are SIGKILLed by the test and print nothing.

Side effects that must be counted across processes are appended to a log file, one line per
execution (``os.write`` on an ``O_APPEND`` descriptor: it survives ``os._exit`` and SIGKILL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agentkit_common import log_line
from agentkit_common import read_lines as read_lines
from pydantic import BaseModel

from tidebase_agents import RunLocked, Tidebase, TidebaseError, register_types

TESTS_DIR = Path(__file__).parent
CHILD_CODE = "import child_support, sys; child_support.main(sys.argv[1:])"


# -- value types checkpointed by the tests (importable by name in every process) -------------


class Point(BaseModel):
    x: int
    y: int
    tags: list[str] = []


@dataclasses.dataclass
class Box:
    label: str
    sizes: tuple[int, ...]
    when: dt.datetime


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


# Their steps return them from lambdas, which carry no annotations to register them by.
register_types(Point, Box, Color)


# -- small shared helpers ----------------------------------------------------------------------


def wait_file_sync(path: str | Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


async def wait_file(path: str | Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.01)


async def retry_locked(call: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    """Invoke ``call`` until the run's lease is free (a dead executor's lease expires)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- starting children from an async test --------------------------------------------------------
#
# Plain subprocess.Popen polled from the event loop (no asyncio child watcher, whose reaping
# races are not what these tests are about); output goes to temporary files, never to a pipe
# that could fill up while the test is busy elsewhere.


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS_DIR)}


@dataclasses.dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"child printed no report (rc={self.returncode}):\n{self.stderr}"
        return json.loads(lines[-1])  # type: ignore[no-any-return]

    @property
    def outcome(self) -> str:
        return str(self.report["outcome"])


class Child:
    """A running child process."""

    def __init__(self, scenario: str, kwargs: dict[str, Any]) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (read after the child exits)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, scenario, json.dumps(kwargs)],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def result(self) -> ChildResult:
        assert self.popen.returncode is not None
        self._out.seek(0)
        self._err.seek(0)
        return ChildResult(
            self.popen.returncode,
            self._out.read().decode(errors="replace"),
            self._err.read().decode(errors="replace"),
        )


async def start(scenario: str, **kwargs: Any) -> Child:
    """Start a child process running ``scenario(**kwargs)``."""
    return Child(scenario, kwargs)


async def finish(child: Child, timeout: float = 90.0) -> ChildResult:
    """Wait for the child to exit (killing it, with its stacks dumped, after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while child.returncode is None:
        if time.monotonic() > deadline:
            child.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.5)
            child.kill()
            child.popen.wait()
            raise TimeoutError(f"child did not exit in {timeout} s:\n{child.result().stderr}")
        await asyncio.sleep(0.01)
    return child.result()


async def run_scenario(scenario: str, **kwargs: Any) -> ChildResult:
    return await finish(await start(scenario, **kwargs))


async def wait_file_or_exit(path: str | Path, child: Child, timeout: float = 60.0) -> None:
    """Wait for ``path``; fail early with the child's stderr if the child exits first."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if child.returncode is not None:
            res = child.result()
            raise AssertionError(
                f"child exited (rc={res.returncode}) before {path} appeared:\n{res.stderr}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.01)


# -- scenarios -----------------------------------------------------------------------------------


async def crash_between(url: str, run_id: str, log: str, phase: str) -> dict[str, Any]:
    """Three steps; phase "crash" dies (os._exit) after step s2 completed, before s3."""
    tide = Tidebase(url, lease_seconds=1)

    def s1() -> Point:
        log_line(log, "s1")
        return Point(x=1, y=2, tags=["a"])

    def s2() -> Box:
        log_line(log, "s2")
        return Box("b", (1, 2), dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc))

    def s3() -> dict[str, Any]:
        log_line(log, "s3")
        return {"raw": b"\x00\xff", "colors": {Color.RED, Color.BLUE}}

    async def pipeline(run: Any, inp: Any) -> Any:
        p = await run.step("s1", s1, input=inp)
        b = await run.step("s2", s2, input={"p": p})
        if phase == "crash":
            os._exit(17)
        c = await run.step("s3", s3, input={"b": b})
        return {"p": p, "b": b, "c": c}

    try:
        result = await retry_locked(
            lambda: tide.run("crash-between", pipeline, run_id=run_id, input={"topic": "t"})
        )
        return {
            "types": [
                type(result["p"]).__qualname__,
                type(result["b"]).__qualname__,
                type(result["b"].sizes).__qualname__,
                type(result["b"].when).__qualname__,
                type(result["c"]["raw"]).__qualname__,
                type(result["c"]["colors"]).__qualname__,
            ],
            "p": result["p"].model_dump(),
            "when": result["b"].when.isoformat(),
        }
    finally:
        await tide.close()


async def crash_effect(url: str, run_id: str, log: str, dir: str, keyed: bool, phase: str) -> Any:
    """A side-effecting step ("charge"); phase "crash" blocks inside it after the effect fired
    (the test SIGKILLs the process there)."""
    tide = Tidebase(url, lease_seconds=1)
    key = f"charge-key-{run_id}" if keyed else None

    def prepare() -> str:
        log_line(log, "prepare")
        return "ready"

    def charge() -> dict[str, Any]:
        log_line(log, f"charge key={key}")  # the external write happened
        if phase == "crash":
            Path(dir, "inside").touch()
            time.sleep(300)  # killed here
        return {"charged": True}

    def notify() -> str:
        log_line(log, "notify")
        return "sent"

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("prepare", prepare)
        res = await run.step(
            "charge",
            charge,
            input={"amount": 5},
            side_effects=["payments"],
            idempotency_key=key,
        )
        await run.step("notify", notify)
        return res

    try:
        return {
            "result": await retry_locked(lambda: tide.run("crash-effect", pipeline, run_id=run_id))
        }
    finally:
        await tide.close()


async def lease_race(url: str, run_id: str, dir: str) -> dict[str, Any]:
    """Start together with a sibling (the "go" file); whoever gets the lease holds it until the
    test creates the "release" file."""
    tide = Tidebase(url)
    Path(dir, f"ready-{os.getpid()}").touch()
    wait_file_sync(Path(dir, "go"))

    async def body(run: Any, inp: Any) -> int:
        log_line(Path(dir, "entered"), str(os.getpid()))
        await run.step("work", os.getpid)
        await wait_file(Path(dir, "release"))
        return os.getpid()

    try:
        return {"result": await tide.run("race", body, run_id=run_id), "pid": os.getpid()}
    finally:
        await tide.close()


async def zombie(url: str, run_id: str, dir: str, log: str) -> dict[str, Any]:
    """Executor A (3 s lease) blocks its event loop inside step "slow" until the test has taken
    the run over and completed it ("b-done"); then it tries to go on.

    The block starts well before the first heartbeat (lease/3 = 1 s after the run starts), so
    no heartbeat transaction is left open holding a lock while the loop is blocked."""
    tide = Tidebase(url, lease_seconds=3)

    def first() -> str:
        log_line(log, "first-A")
        return "A-first"

    def slow() -> str:
        Path(dir, "in-slow").touch()
        while not Path(dir, "b-done").exists():
            time.sleep(0.02)  # blocks the loop: no heartbeat, the lease expires
        log_line(log, "slow-A")
        return "A-slow"

    def after() -> str:
        log_line(log, "after-A")
        return "A-after"

    async def body(run: Any, inp: Any) -> str:
        await run.step("first", first)
        await run.step("slow", slow)
        await run.step("after", after)
        return "A"

    try:
        return {"result": await tide.run("zombie", body, run_id=run_id)}
    finally:
        await tide.close()


async def cancel_target(url: str, run_id: str, dir: str, log: str) -> dict[str, Any]:
    """Step "two" waits (asynchronously) for "release"; the test cancels the run meanwhile."""
    tide = Tidebase(url)

    def one() -> int:
        log_line(log, "one")
        return 1

    async def two() -> int:
        log_line(log, "two-start")
        Path(dir, "in-two").touch()
        await wait_file(Path(dir, "release"))
        log_line(log, "two-end")
        return 2

    def three() -> int:
        log_line(log, "three")
        return 3

    async def body(run: Any, inp: Any) -> str:
        await run.step("one", one)
        await run.step("two", two)
        await run.step("three", three)
        return "done"

    try:
        return {"result": await tide.run("cancel", body, run_id=run_id)}
    finally:
        await tide.close()


async def event_writer(url: str, run_id: str, dir: str, steps: int, shared: str) -> Any:
    """Write events to our own run with ``steps`` concurrent steps (half with side effects) and
    a concurrent state_set; then cancel the ``shared`` run executing in a sibling process."""
    tide = Tidebase(url)
    Path(dir, f"ready-{os.getpid()}").touch()
    wait_file_sync(Path(dir, "go"))

    async def body(run: Any, inp: Any) -> int:
        async def work(i: int) -> int:
            await asyncio.sleep(0)
            return i

        calls = [
            run.step(f"w{i}", lambda i=i: work(i), side_effects=["x"] if i % 2 else None)
            for i in range(steps)
        ]
        out = await asyncio.gather(*calls, run.state_set({"writer": os.getpid()}))
        return len(out)

    try:
        result = await tide.run("events", body, run_id=run_id)
        await wait_file(Path(dir, "shared-started"))
        status = await tide.cancel(shared, reason=f"by {os.getpid()}")
        return {"result": result, "cancel": status}
    finally:
        await tide.close()


async def shared_executor(url: str, run_id: str, dir: str) -> Any:
    """Execute the shared run in batches of concurrent steps until it is cancelled."""
    tide = Tidebase(url)
    Path(dir, f"ready-{os.getpid()}").touch()
    wait_file_sync(Path(dir, "go"))

    async def body(run: Any, inp: Any) -> str:
        deadline = time.monotonic() + 60
        batch = 0
        while time.monotonic() < deadline:
            await asyncio.gather(
                *(
                    run.step(f"b{batch}-{i}", lambda: 1, side_effects=["x"] if i % 3 else None)
                    for i in range(8)
                )
            )
            if batch == 0:
                Path(dir, "shared-started").touch()
            batch += 1
        return "never cancelled"

    try:
        return {"result": await tide.run("shared", body, run_id=run_id)}
    finally:
        await tide.close()


async def derived_key(url: str, run_id: str, step: str) -> dict[str, Any]:
    """Run one unkeyed side-effecting step and report the idempotency key recorded for it."""
    tide = Tidebase(url)

    async def body(run: Any, inp: Any) -> str:
        return await run.step(step, lambda: "ok", side_effects=["mail"])  # type: ignore[no-any-return]

    try:
        await tide.run("keys", body, run_id=run_id)
        recs = {s.name: s for s in await tide.steps(run_id)}
        return {"key": recs[step].idempotency_key, "keyed": recs[step].keyed}
    finally:
        await tide.close()


async def close_under_load(url: str, iterations: int) -> dict[str, Any]:
    """Each iteration, in an event loop of its own, runs a pipeline of 60 concurrent steps
    under a lease so short that heartbeats contend with step writes and the run often ends
    with writes still in flight, then closes the Tidebase and lets ``asyncio.run`` end."""

    async def one(i: int) -> str:
        tide = Tidebase(url, lease_seconds=0.1)

        async def body(run: Any, inp: Any) -> int:
            async def work(k: int) -> int:
                await asyncio.sleep(0.02)
                return k

            return sum(
                await asyncio.gather(*(run.step(f"s{k}", lambda k=k: work(k)) for k in range(60)))
            )

        try:
            await tide.run("loaded", body, run_id=f"r{i}")
            return "ok"
        except TidebaseError as exc:
            return type(exc).__name__
        finally:
            await tide.close()

    def loops() -> list[str]:
        return [asyncio.run(one(i)) for i in range(iterations)]

    return {"outcomes": await asyncio.to_thread(loops)}


SCENARIOS: dict[str, Callable[..., Awaitable[Any]]] = {
    "crash_between": crash_between,
    "crash_effect": crash_effect,
    "lease_race": lease_race,
    "zombie": zombie,
    "cancel_target": cancel_target,
    "event_writer": event_writer,
    "shared_executor": shared_executor,
    "derived_key": derived_key,
    "close_under_load": close_under_load,
}


def main(argv: list[str]) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps a hung child's stacks
    scenario, kwargs = argv[0], json.loads(argv[1])
    try:
        extra = asyncio.run(SCENARIOS[scenario](**kwargs))
        report: dict[str, Any] = {"outcome": "ok", **(extra or {})}
    except TidebaseError as exc:
        report = {"outcome": type(exc).__name__, "message": str(exc)}
    print(json.dumps(report, default=repr), flush=True)
