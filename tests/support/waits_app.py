"""Pipelines for the wait tests (W1): an agent that must get approval before a refund (keyed
or not, directly or through an agent used as a tool), and pipelines that wait for messages
and sleep. Importable in child processes: ``agentkit_common.child_main`` runs the scenarios
below and prints their report.

The refund goes to :class:`agentkit_common.ExternalApi`, which logs every attempt and
deduplicates writes by idempotency key. ``crash`` makes the tool kill its process right after
the external write (``os._exit``), once: a marker file in ``directory`` says it crashed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agentkit_common import (
    CRASH_CODE,
    ExternalApi,
    message,
    policy_model,
    tool_calls,
    tool_outputs,
)
from agents import Agent, Runner, function_tool

from tidebase_agents import (
    ApprovalRequired,
    RunWaiting,
    Tidebase,
    WaitTimeout,
    checkpointed_pipeline,
    current_run,
    durable_tool,
    idempotency_key,
)

LEASE = 1.0


def _pending(exc: ApprovalRequired) -> list[dict[str, Any]]:
    return [
        {"call_id": p.call_id, "agent": p.agent, "tool": p.tool, "arguments": p.arguments}
        for p in exc.pending
    ]


def refund_pipeline(url: str, directory: str, *, keyed: bool = True, crash: bool = False) -> Any:
    """The refund pipeline: ``refund(amount)`` needs approval; nested=True routes it through
    a manager agent that uses the payer agent as a tool."""
    api = ExternalApi(directory)
    crashed = Path(directory, "crashed")

    def pay(amount: int, key: str | None) -> str:
        receipt = api.create(f"refund {amount}", key)
        if crash and not crashed.exists():
            crashed.write_text("1")
            os._exit(CRASH_CODE)
        return f"refunded {amount} ({receipt})"

    if keyed:

        @function_tool(needs_approval=True)
        @durable_tool(side_effects=["payments"])
        async def refund(amount: int) -> str:
            """Refund the customer."""
            return pay(amount, idempotency_key())

    else:

        @function_tool(needs_approval=True)
        @durable_tool(side_effects=["payments"])
        async def refund(amount: int) -> str:
            """Refund the customer."""
            return pay(amount, None)

    def payer_policy(call: Any) -> Any:
        done = tool_outputs(call)
        return message(f"payer: {done[0]}") if done else tool_calls(("refund", {"amount": 5}))

    payer = Agent(name="payer", tools=[refund], model=policy_model(payer_policy))

    def manager_policy(call: Any) -> Any:
        done = tool_outputs(call)
        if done:
            return message(f"manager: {done[0]}")
        return tool_calls(("payments", {"input": "refund 5"}))

    manager = Agent(
        name="manager",
        tools=[payer.as_tool(tool_name="payments", tool_description="Pays refunds.")],
        model=policy_model(manager_policy),
    )

    # A short lease: a crashed executor's run is taken over within a second.
    @checkpointed_pipeline("refund", tide=Tidebase(url, lease_seconds=LEASE))
    async def pipeline(request: str, nested: bool = False) -> str:
        result = await Runner.run(manager if nested else payer, request)
        return str(result.final_output)

    return pipeline


async def start_refund(
    url: str, run_id: str, directory: str, keyed: bool = True, nested: bool = False
) -> dict[str, Any]:
    """Start the refund run; it parks waiting for approval."""
    pipeline = refund_pipeline(url, directory, keyed=keyed)
    try:
        out = await pipeline.with_run_id(run_id)("refund order 7", nested)
        return {"result": out}
    except ApprovalRequired as exc:
        return {"parked": "ApprovalRequired", "pending": _pending(exc)}
    finally:
        await pipeline.tide.close()


async def decide(
    url: str, run_id: str, call_id: str, approve: bool = True, message: str | None = None
) -> dict[str, Any]:
    """Approve or reject from a process that has no pipeline defined."""
    tide = Tidebase(url)
    try:
        if approve:
            record = await tide.approve(run_id, call_id)
        else:
            record = await tide.reject(run_id, call_id, message=message)
        return {"decision": record.decision}
    finally:
        await tide.close()


async def resume_refund(
    url: str, run_id: str, directory: str, keyed: bool = True, crash: bool = False
) -> dict[str, Any]:
    """Invoke the run again (in a new process) after the decisions."""
    pipeline = refund_pipeline(url, directory, keyed=keyed, crash=crash)
    try:
        return {"result": await pipeline.resume(run_id)}
    finally:
        await pipeline.tide.close()


def waiting_pipeline(url: str) -> Any:
    """Waits for ``topic`` (with an optional timeout), then sleeps ``nap`` seconds."""

    @checkpointed_pipeline("waiter", tide=Tidebase(url))
    async def waiter(topic: str, timeout: float | None = None, nap: float = 0.0) -> Any:
        run = current_run()
        try:
            got = await run.wait_for(topic, timeout=timeout)
        except WaitTimeout:
            got = "timed out"
        if nap:
            await run.sleep(nap)
        return {"got": got}

    return waiter


async def invoke_waiter(
    url: str, run_id: str, topic: str, timeout: float | None = None, nap: float = 0.0
) -> dict[str, Any]:
    waiter = waiting_pipeline(url)
    try:
        return {"result": await waiter.with_run_id(run_id)(topic, timeout, nap)}
    except RunWaiting as exc:
        return {"parked": "RunWaiting", "topic": exc.topic}
    finally:
        await waiter.tide.close()
