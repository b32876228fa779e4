"""Pipelines and child-process scenarios of the recovery tests (P3, P4).

A child runs ``python -c "import recovery_app, sys; recovery_app.main(sys.argv[1:])" SCENARIO
JSON_KWARGS`` and prints one JSON line ``{"outcome": ...}`` as its last line. Its database is
``TIDEBASE_DATABASE_URL``; ``TIDEBASE_HOST_ID`` (when the test sets it) makes it another machine.

Executions are appended to a log file (``os.write`` on an ``O_APPEND`` descriptor, which
survives SIGKILL), one line each: ``<what> <run id> [<idempotency key>]``. A step told to hang
writes a marker file ``<markers>/<what>-<run id>`` first, then waits for a ``go`` file (or
forever).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tidebase_agents import (
    Tidebase,
    TidebaseError,
    checkpointed_pipeline,
    current_run,
)

tide = Tidebase(lease_seconds=float(os.environ.get("RC_LEASE", "60")))
#: What this process's steps do besides their work (set by the scenario; not a pipeline
#: argument, so every process invokes a run with the same recorded arguments): ``log``,
#: ``markers``, ``hang`` (run id -> steps that hang), ``go``, ``report``.
PLAN: dict[str, Any] = {}


def log(path: str, *words: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(words) + "\n").encode())
    finally:
        os.close(fd)


def lines(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


async def hang_here(what: str, run_id: str) -> None:
    """Hang if the plan says this step of this run hangs: write its marker, wait for ``go``."""
    plan = PLAN
    if what not in plan.get("hang", {}).get(run_id, []):
        return
    Path(plan["markers"], f"{what}-{run_id}").write_text(str(os.getpid()))
    go = plan.get("go")
    while go is None or not Path(go).exists():
        await asyncio.sleep(0.02)


@checkpointed_pipeline("rc-order", tide=tide)
async def order(n: int) -> str:
    """think (pure), charge (an external write with an idempotency key), notify (an unkeyed
    external write)."""
    plan = PLAN
    run = current_run()
    rid = run.run_id

    async def think() -> int:
        await hang_here("think", rid)
        log(plan["log"], "think", rid)
        return n * 2

    key = f"charge-{rid}"

    async def charge() -> str:
        log(plan["log"], "charge", rid, key)
        await hang_here("charge", rid)
        return key

    async def notify() -> str:
        log(plan["log"], "notify", rid)
        await hang_here("notify", rid)
        return "sent"

    doubled = await run.step("think", think, input=n)
    await run.step("charge", charge, side_effects=["payments"], idempotency_key=f"charge-{rid}")
    await run.step("notify", notify, side_effects=["mail"])
    return f"order {n}: {doubled}"


@checkpointed_pipeline("rc-keep", tide=tide, recover=False)
async def keep() -> str:
    """A pipeline that opted out of orphan adoption: one step that may hang."""
    plan = PLAN
    run = current_run()

    async def work() -> str:
        await hang_here("work", run.run_id)
        log(plan["log"], "work", run.run_id)
        return "done"

    return await run.step("work", work)


@checkpointed_pipeline("rc-writes", tide=tide)
async def writes() -> dict[str, str]:
    """Step ``s1`` (may hang), then every kind of write; each one's outcome is reported."""
    plan = PLAN
    run = current_run()
    outcomes: dict[str, str] = {}

    async def s1() -> str:
        await hang_here("s1", run.run_id)
        log(plan["log"], "s1", run.run_id)
        return "one"

    async def attempt(name: str, write: Any) -> None:
        try:
            await write()
            outcomes[name] = "ok"
        except TidebaseError as exc:
            outcomes[name] = type(exc).__name__

    await attempt("s1", lambda: run.step("s1", s1))
    await attempt("state", lambda: run.state_set({"after": "s1"}))
    await attempt("usage", lambda: run.usage_record(model="m", input_tokens=1))
    await attempt("s2", lambda: run.step("s2", lambda: log(plan["log"], "s2", run.run_id)))
    if plan.get("report"):
        Path(plan["report"]).write_text(json.dumps(outcomes))
    return outcomes


async def _scenario(name: str, kwargs: dict[str, Any]) -> Any:
    PLAN.update(kwargs["plan"])
    try:
        if name == "orders":
            # Several direct-call runs of this process at once (and one of rc-keep).
            keeps = [kwargs["keep"]] if kwargs.get("keep") else []
            return await asyncio.gather(
                *(
                    order(n, run_id=f"rc-{n}")  # type: ignore[call-arg]
                    for n in kwargs["ns"]
                ),
                *(keep(run_id=k) for k in keeps),  # type: ignore[call-arg]
                return_exceptions=True,
            )
        if name == "keep":
            return await keep(run_id=kwargs["run_id"])  # type: ignore[call-arg]
        if name == "writes":
            return await writes(run_id=kwargs["run_id"])  # type: ignore[call-arg]
        raise ValueError(name)
    finally:
        await tide.close()


def main(argv: list[str]) -> None:
    name, kwargs = argv[0], json.loads(argv[1])
    try:
        result = asyncio.run(_scenario(name, kwargs))
    except TidebaseError as exc:
        print(json.dumps({"outcome": type(exc).__name__, "message": str(exc)}))
        return
    if isinstance(result, list):
        result = [r if not isinstance(r, BaseException) else type(r).__name__ for r in result]
    print(json.dumps({"outcome": "ok", "result": result}))


if __name__ == "__main__":
    main(sys.argv[1:])
