"""The pipeline fault trials run, and the scenarios its child processes execute.

``orders(customer, items)`` is a pipeline with everything a fault can hit: an explicit step, run
state, a ``clerk`` agent whose model calls durable tools (``lookup_price`` without side effects,
``charge`` keyed by reading ``idempotency_key()``, ``reserve`` keyed through an import alias of
it, ``notify`` unkeyed), explicit side-effecting steps (``ship`` with an explicit key, ``audit``
unkeyed), explicit usage records and a ``writer`` agent. External effects are rows in an SQLite
file of their own (:class:`Effects`), outside the library's database: an "API" that
deduplicates keyed requests by key, as a payment API does, and performs unkeyed ones every time.

The clerk's model answers from its input, as a deterministic real model would, and retries a
tool call whose output is an error (as a model told "Please try again" does): a failure of the
library's machinery handed to it shows up as a second call under a new key.

Fault points (:class:`Points`): every model call, tool body (before and after its external
effect), explicit step body and pipeline section is a numbered point, and so is each call of the
store's writes (before and after it), wrapped in the child process only. A child killed at point
``kill_at`` SIGKILLs itself there; a ``gate`` label pauses the child at that point until the
test opens the gate, so a database fault can be injected exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agentkit_common import _current_turn, log_line, message, policy_model, usage, user_text
from agents import Agent, Runner, function_tool
from agents.testing import ModelStep, function_call

from tidebase_agents import (
    RunLocked,
    checkpointed_pipeline,
    current_run,
    durable_tool,
    idempotency_key,
)
from tidebase_agents import idempotency_key as reservation_key

PIPELINE = "fault-orders"
CUSTOMER = "alice"
ITEMS = ["widget", "gadget"]
#: What the SDK tells the model when a tool raised.
TOOL_ERROR = "An error occurred while running the tool"
#: Store methods wrapped with fault points in child processes.
STORE_WRITES = ("acquire", "check_lease", "write_step", "append_state", "record_usage", "finish")
#: Logical calls with an idempotency key (by tool / step name); the others are unkeyed.
KEYED_TOOLS = frozenset({"charge", "reserve", "ship"})


def price_of(item: str) -> int:
    return 100 + 7 * len(item)


def args_hash(args: Any) -> str:
    """SHA-256 of canonical JSON (I5): what a tool step's name carries a prefix of."""
    text = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the external systems ---------------------------------------------------------------------

_EFFECTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY, call TEXT, tool TEXT, args TEXT,
                                     key TEXT, pid INTEGER);
CREATE TABLE IF NOT EXISTS effects (id INTEGER PRIMARY KEY, call TEXT, tool TEXT, args TEXT,
                                    key TEXT, result TEXT, pid INTEGER);
"""


class Effects:
    """External APIs backed by an SQLite file: every request is an ``attempts`` row, every
    effect an ``effects`` row, committed before the call returns (a SIGKILL right after keeps
    it). A request with a key already used returns the earlier result and has no effect."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.executescript(_EFFECTS_SCHEMA)
        return db

    def perform(self, tool: str, args: dict[str, Any], key: str | None, result: str) -> str:
        call = logical_call(tool, args)
        row = (call, tool, json.dumps(args, sort_keys=True), key)
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO attempts (call, tool, args, key, pid) VALUES (?, ?, ?, ?, ?)",
                (*row, os.getpid()),
            )
            if key is not None:
                found = db.execute("SELECT result FROM effects WHERE key = ?", (key,)).fetchone()
                if found is not None:
                    db.execute("COMMIT")
                    return str(found[0])
            db.execute(
                "INSERT INTO effects (call, tool, args, key, result, pid) VALUES (?, ?, ?, ?, ?, ?)",
                (*row, result, os.getpid()),
            )
            db.execute("COMMIT")
        return result

    def rows(self, table: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with contextlib.closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY id")]


def logical_call(tool: str, args: dict[str, Any]) -> str:
    """One logical call: the same tool with the same arguments (the model asking again for
    the same charge is the same logical call, whatever step or key it ends up under)."""
    return f"{tool}:{json.dumps(args, sort_keys=True)}"


# -- fault points -------------------------------------------------------------------------------


class Points:
    """Numbered fault points of one process (see the module docstring)."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        kill_at: int | None = None,
        gate: str | None = None,
        trace: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.kill_at = kill_at
        self.gate = gate
        self.trace = trace
        self.n = 0
        self._gated = False

    async def __call__(self, label: str) -> None:
        self.n += 1
        if self.trace:
            log_line(self.workdir / "points.log", f"{self.n} {label}")
        if self.kill_at == self.n:
            log_line(self.workdir / "kills.log", label)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.gate == label and not self._gated:
            self._gated = True
            log_line(self.workdir / "gate.reached", label)
            while not (self.workdir / "gate.open").exists():
                await asyncio.sleep(0.005)


def instrument_store(points: Points) -> None:
    """Put fault points around the store's writes (in this process only)."""
    from tidebase_agents._store import Store

    for cls in Store.__subclasses__():
        for name in STORE_WRITES:
            original = getattr(cls, name, None)
            if original is None:
                continue
            setattr(cls, name, _around(points, f"store:{name}", original))


def _around(
    points: Points, label: str, original: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        await points(f"{label}:before")
        result = await original(*args, **kwargs)
        await points(f"{label}:after")
        return result

    return wrapper


# -- the clerk's model ---------------------------------------------------------------------------


def tool_history(call: Any) -> list[tuple[str, dict[str, Any], str | None]]:
    """``(tool, arguments, output or None)`` of each function call of the current turn."""
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    order: list[str] = []
    outputs: dict[str, str] = {}
    for item in _current_turn(call):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            calls[item["call_id"]] = (item["name"], json.loads(item["arguments"] or "{}"))
            order.append(item["call_id"])
        elif item.get("type") == "function_call_output":
            outputs[item["call_id"]] = str(item.get("output"))
    return [(*calls[c], outputs.get(c)) for c in order]


def clerk_answer(call: Any, workdir: Path) -> ModelStep:
    """The clerk: look up prices, then charge and reserve each item, then notify, then answer.

    A call whose latest output is an error is asked again, as a model would."""
    customer, _, listed = user_text(call).removeprefix("Order for ").partition(": ")
    items = listed.split(", ")
    history = tool_history(call)
    done: dict[str, str] = {}
    for tool, args, output in history:
        if output is None:
            continue
        if TOOL_ERROR in output:
            log_line(workdir / "model-saw-errors.log", json.dumps([tool, args, output]))
            done.pop(logical_call(tool, args), None)
        else:
            done[logical_call(tool, args)] = output
    prices = {
        item: int(done[logical_call("lookup_price", {"item": item})])
        for item in items
        if logical_call("lookup_price", {"item": item}) in done
    }
    stages: list[list[tuple[str, dict[str, Any]]]] = [
        [("lookup_price", {"item": item}) for item in items],
        [("charge", {"item": item, "cents": prices.get(item, 0)}) for item in items]
        + [("reserve", {"item": item}) for item in items],
        [("notify", {"text": f"order of {customer} is reserved: {', '.join(items)}"})],
    ]
    for stage in stages:
        todo = [(tool, args) for tool, args in stage if logical_call(tool, args) not in done]
        if todo:
            asked = [logical_call(tool, args) for tool, args, _ in history]
            return ModelStep(
                output=[
                    function_call(
                        tool,
                        args,
                        call_id=f"call-{tool}-{args_hash(args)[:8]}-"
                        f"{asked.count(logical_call(tool, args)) + 1}",
                    )
                    for tool, args in todo
                ],
                usage=usage(12, 3),
            )
    answered = [done[logical_call(tool, args)] for stage in stages[1:] for tool, args in stage]
    return message(f"order for {customer}: " + " | ".join(answered), inp=20, out=8)


# -- the pipeline ---------------------------------------------------------------------------------


def build(url: str, workdir: str | Path, points: Points, lease_seconds: float = 1.0) -> Any:
    """The ``orders`` pipeline on ``url`` with its own models, effects and fault points."""
    workdir = Path(workdir)
    fx = Effects(workdir / "effects.db")

    async def external(label: str, tool: str, args: Any, key: str | None, result: str) -> str:
        """A request to an external system, with fault points before and after it."""
        await points(f"{label}:before")
        value = fx.perform(tool, args, key, result)
        await points(f"{label}:after")
        return value

    @function_tool
    @durable_tool
    async def lookup_price(item: str) -> int:
        """Look up the price of an item, in cents.

        Args:
            item: The item.
        """
        await points("tool:lookup_price")
        return price_of(item)

    # Each keyed tool reads its key in its own body (once by name, once through an alias).
    @function_tool
    @durable_tool(side_effects=["payments"])
    async def charge(item: str, cents: int) -> str:
        """Charge the customer for an item.

        Args:
            item: The item.
            cents: The price in cents.
        """
        args = {"item": item, "cents": cents}
        return await external("tool:charge", "charge", args, idempotency_key(), f"receipt-{item}")

    @function_tool
    @durable_tool(side_effects=["inventory"])
    async def reserve(item: str) -> str:
        """Reserve an item in the warehouse.

        Args:
            item: The item.
        """
        args = {"item": item}
        return await external("tool:reserve", "reserve", args, reservation_key(), f"hold-{item}")

    @function_tool
    @durable_tool(side_effects=["mail"])
    async def notify(text: str) -> str:
        """Tell the customer.

        Args:
            text: The message.
        """
        return await external("tool:notify", "notify", {"text": text}, None, f"sent {len(text)}")

    async def clerk_policy(call: Any) -> ModelStep:
        await points("model:clerk")
        return clerk_answer(call, workdir)

    async def writer_policy(call: Any) -> ModelStep:
        await points("model:writer")
        return message("POST: " + user_text(call), inp=30, out=9)

    clerk_model = policy_model(clerk_policy)
    writer_model = policy_model(writer_policy)
    clerk = Agent(
        name="clerk",
        instructions="Price, charge and reserve each item, then tell the customer.",
        model=clerk_model,
        tools=[lookup_price, charge, reserve, notify],
    )
    writer = Agent(name="writer", instructions="Summarize the order.", model=writer_model)

    @checkpointed_pipeline(PIPELINE, database_url=url, lease_seconds=lease_seconds)
    async def orders(customer: str, items: list[str]) -> dict[str, Any]:
        run = current_run()
        await points("pipeline:start")
        plan = await run.step(
            "plan", lambda: [{"item": i, "qty": 1} for i in items], input={"items": items}
        )
        await run.state_set({"phase": "planned", "lines": len(plan)})
        await points("pipeline:planned")
        order = await Runner.run(clerk, f"Order for {customer}: {', '.join(items)}")
        await points("pipeline:ordered")
        await run.usage_record(
            provider="scripted", model="pricing-oracle", input_tokens=7, output_tokens=3
        )
        await run.state_patch({"phase": "charged"})
        ship_key = f"ship:{run.run_id}"
        parcel = await run.step(
            "ship",
            lambda: external("step:ship", "ship", {}, ship_key, f"parcel-{customer}"),
            input={"customer": customer},
            side_effects=["shipping"],
            idempotency_key=ship_key,
        )
        audit = await run.step(
            "audit",
            lambda: external("step:audit", "audit", {}, None, f"audited-{customer}"),
            input={"customer": customer},
            side_effects=["audit-log"],
        )
        await points("pipeline:shipped")
        post = await Runner.run(writer, f"Summarize: {order.final_output}")
        await run.usage_record(kind="embedding", model="embed-small", input_tokens=11)
        await run.state_patch({"phase": "done", "parcel": parcel})
        await points("pipeline:end")
        return {"post": post.final_output, "parcel": parcel, "audit": audit}

    return orders


# -- child scenarios -------------------------------------------------------------------------------


async def attempt(
    url: str,
    workdir: str,
    run_id: str,
    kill_at: int | None = None,
    gate: str | None = None,
    trace: bool = False,
    lease_seconds: float = 1.0,
    lock_wait: float = 60.0,
) -> dict[str, Any]:
    """One execution of run ``run_id`` of ``orders`` in this (fresh) process.

    Waits while a dead executor's lease is live (``RunLocked``), then runs or resumes the run.
    """
    points = Points(workdir, kill_at=kill_at, gate=gate, trace=trace)
    instrument_store(points)
    pipeline = build(url, workdir, points, lease_seconds)
    log_line(Path(workdir) / "started", str(os.getpid()))
    t0 = time.monotonic()
    deadline = t0 + lock_wait
    try:
        while True:
            try:
                output = await pipeline(CUSTOMER, ITEMS, run_id=run_id)
                break
            except RunLocked:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        try:
            await pipeline.tide.close()
        except Exception as exc:  # reported beside the run's own outcome
            log_line(Path(workdir) / "close-errors.log", repr(exc))
    return {"output": output, "duration": time.monotonic() - t0, "points": points.n}
