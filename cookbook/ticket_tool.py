"""A side-effecting tool with an idempotency key: the crash happens right after the external write.

    python cookbook/ticket_tool.py

The triage agent calls ``create_ticket``, which writes to an external ticketing API (a JSON file
standing in for it). The first process dies right after that write, before the agent run
finished. The second process re-executes the agent run: the tool is in doubt, and because its
body passes ``idempotency_key()`` to the API, it is re-executed with the same key and the API
deduplicates it. One ticket exists at the end, not two.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _offline import ModelCall, call_tool, model, reply, tool_outputs
from agents import Agent, Runner, function_tool

from tidebase_agents import checkpointed_pipeline, durable_tool, idempotency_key

API_FILE = Path(os.environ.get("TICKET_API_FILE", "tickets.json"))


def ticket_api_create(title: str, body: str, key: str) -> str:
    """A stand-in external API that deduplicates on the idempotency key, as real ones do."""
    tickets = json.loads(API_FILE.read_text()) if API_FILE.exists() else {}
    if key not in tickets:
        tickets[key] = {"id": f"T-{len(tickets) + 1}", "title": title, "body": body}
        API_FILE.write_text(json.dumps(tickets, indent=1))
    return str(tickets[key]["id"])


@function_tool
@durable_tool(side_effects=["ticketing-api"])
async def create_ticket(title: str, body: str) -> str:
    """Open a ticket in the ticketing system."""
    ticket = ticket_api_create(title, body, key=idempotency_key())
    if os.environ.get("CRASH_IN_TOOL"):
        print(f"  wrote {ticket}; the process dies before the agent run finishes", flush=True)
        os._exit(1)
    return ticket


def _triage(call: ModelCall) -> object:
    done = tool_outputs(call)
    if not done:
        return call_tool("create_ticket", title="Checkout is down", body="500s since 09:12")
    return reply(f"Opened {done[0]} for the on-call team.")


triage = Agent(
    name="triage",
    instructions="Open a ticket for the incident with create_ticket, then confirm.",
    tools=[create_ticket],
    model=model(_triage),
)


@checkpointed_pipeline("incident-triage")
async def handle_incident(report: str) -> str:
    result = await Runner.run(triage, report)
    return str(result.final_output)


async def attempt(run_id: str) -> None:
    print(f"  {await handle_incident.with_run_id(run_id)('checkout returns 500')}")


def main() -> None:
    if len(sys.argv) > 1:
        asyncio.run(attempt(sys.argv[1]))
        return
    API_FILE.unlink(missing_ok=True)
    run_id = f"incident-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__, run_id]
    print("1) the tool writes the ticket, then the process dies:")
    subprocess.run(me, env={**os.environ, "CRASH_IN_TOOL": "1"}, check=False)
    print("2) the same run id in a fresh process re-executes with the same key:")
    subprocess.run(me, check=True)
    tickets = json.loads(API_FILE.read_text())
    print(
        f"tickets in the external system: {len(tickets)} -> {[t['id'] for t in tickets.values()]}"
    )


if __name__ == "__main__":
    main()
