"""A payments agent whose one tool charges an external API under an idempotency key, in the
ways application code reaches for the key: by name, through an import alias, through a closure
variable of a tool factory (the seed's ``make_tools(run)`` shape), or behind a dynamic lookup
that no reading of the code can see. Used in-process and by child processes."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

from agentkit_common import ExternalApi, crash, message, policy_model, tool_calls, tool_outputs
from agents import Agent, Runner, function_tool

import tidebase_agents
from tidebase_agents import checkpointed_pipeline, durable_tool
from tidebase_agents import idempotency_key as key_alias

KEYINGS = ("name", "alias", "closure", "dynamic")


def _respond(call: Any) -> Any:
    outputs = tool_outputs(call)
    if not outputs:
        return tool_calls(("charge", {"amount": 5}))
    return message(f"charged: {outputs[0]}")


def _dynamic_key() -> str:
    # A lookup by a computed name: invisible to any reading of the code.
    module = importlib.import_module("tidebase_agents")
    return str(getattr(module, "_".join(("idempotency", "key")))())


def make_tools(api: ExternalApi, keying: str, *, crash_after_write: bool, latency: float) -> Any:
    """The charge tool, keyed the way ``keying`` says; ``crash_after_write`` kills the process
    right after the external write (once per marker file)."""
    marker = Path(api.writes).with_suffix(".crashed")
    via_closure = tidebase_agents.idempotency_key

    async def write(amount: int, key: str) -> str:
        await asyncio.sleep(latency)  # the network before the external call
        ticket = api.create(f"charge {amount}", key)
        if crash_after_write and not marker.exists():
            marker.touch()
            crash()
        return ticket

    async def by_name(amount: int) -> str:
        """Charge the customer."""
        return await write(amount, tidebase_agents.idempotency_key())

    async def by_alias(amount: int) -> str:
        """Charge the customer."""
        return await write(amount, key_alias())

    async def by_closure(amount: int) -> str:
        """Charge the customer."""
        return await write(amount, via_closure())

    async def by_lookup(amount: int) -> str:
        """Charge the customer."""
        return await write(amount, _dynamic_key())

    bodies = {"name": by_name, "alias": by_alias, "closure": by_closure, "dynamic": by_lookup}
    charge = bodies[keying]
    charge.__name__ = "charge"
    # Decorated here, as an application would inside its factory.
    return function_tool(durable_tool(side_effects=["payments"])(charge))


def build(
    url: str, directory: str, keying: str, *, crash_after_write: bool = False, latency: float = 0.0
) -> Any:
    api = ExternalApi(directory)
    model = policy_model(_respond)
    agent = Agent(
        name="cashier",
        model=model,
        tools=[make_tools(api, keying, crash_after_write=crash_after_write, latency=latency)],
    )

    @checkpointed_pipeline("charge-pipeline", tide=tidebase_agents.Tidebase(url, lease_seconds=1))
    async def pay(customer: str) -> str:
        result = await Runner.run(agent, f"charge {customer}")
        return str(result.final_output)

    return pay, api, model


async def run_once(
    url: str,
    directory: str,
    run_id: str,
    keying: str,
    crash_after_write: bool,
    latency: float = 0.0,
) -> dict[str, Any]:
    """A child's whole job: invoke the run (waiting out a dead holder's lease) and report."""
    from agentkit_common import until_unlocked

    pay, _api, model = build(
        url, directory, keying, crash_after_write=crash_after_write, latency=latency
    )
    try:
        output = await until_unlocked(lambda: pay("ada", run_id=run_id))
    finally:
        await pay.tide.close()
    return {"output": output, "model_calls": len(model.calls)}
