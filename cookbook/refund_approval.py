"""A refund that waits for a person: the run parks, a second process approves it from the CLI,
a third finishes it.

    python cookbook/refund_approval.py

The support agent decides to refund an order; ``issue_refund`` needs approval
(``needs_approval=True``), so the agent run stops there. Inside a checkpointed pipeline that
stop parks the run: the call raises ``ApprovalRequired`` naming the pending tool call, and the
run waits in the database holding no lease, connection or process. Someone approves it later,
from anywhere (here ``tidebase-agents runs approve RUN_ID CALL_ID`` in another process), and
invoking the run again continues the agent run where it stopped: the refund is issued once,
with an idempotency key, and the agent confirms it. ``runs reject RUN_ID CALL_ID --message``
instead tells the model why, and the refund never runs.
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

from tidebase_agents import ApprovalRequired, checkpointed_pipeline, durable_tool, idempotency_key

REFUNDS_FILE = Path(os.environ.get("REFUNDS_FILE", "refunds.json"))


def payments_refund(order: str, amount: float, key: str) -> str:
    """A stand-in payments API that deduplicates on the idempotency key, as real ones do."""
    refunds = json.loads(REFUNDS_FILE.read_text()) if REFUNDS_FILE.exists() else {}
    if key not in refunds:
        refunds[key] = {"id": f"R-{len(refunds) + 1}", "order": order, "amount": amount}
        REFUNDS_FILE.write_text(json.dumps(refunds, indent=1))
    return str(refunds[key]["id"])


@function_tool(needs_approval=True)
@durable_tool(side_effects=["payments"])
async def issue_refund(order: str, amount: float) -> str:
    """Refund an order (a person must approve it first)."""
    return payments_refund(order, amount, key=idempotency_key())


def _support(call: ModelCall) -> object:
    done = tool_outputs(call)
    if not done:
        return call_tool("issue_refund", order="A-1009", amount=42.0)
    return reply(f"Your refund is on its way ({done[0]}).")


support = Agent(
    name="support",
    instructions="Refund damaged orders with issue_refund, then tell the customer.",
    tools=[issue_refund],
    model=model(_support),
)


@checkpointed_pipeline("refund-approval")
async def handle_complaint(message: str) -> str:
    result = await Runner.run(support, message)
    return str(result.final_output)


async def attempt(run_id: str) -> None:
    try:
        print(f"  {await handle_complaint.with_run_id(run_id)('order A-1009 arrived broken')}")
    except ApprovalRequired as waiting:
        for item in waiting.pending:
            print(f"  waiting for approval: {item.tool}({item.arguments}) call id {item.call_id}")
            Path(f"{run_id}.pending").write_text(item.call_id)


def main() -> None:
    if len(sys.argv) > 1:
        asyncio.run(attempt(sys.argv[1]))
        return
    REFUNDS_FILE.unlink(missing_ok=True)
    run_id = f"complaint-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__, run_id]
    print("1) the agent wants to refund; the run parks waiting for approval:")
    subprocess.run(me, check=True)
    pending = Path(f"{run_id}.pending")
    call_id = pending.read_text()
    pending.unlink()
    print(f"2) a person approves it from the CLI: tidebase-agents runs approve {run_id} {call_id}")
    cli = [sys.executable, "-m", "tidebase_agents._cli"]
    subprocess.run([*cli, "runs", "approve", run_id, call_id], check=True)
    print("3) invoking the run again continues the agent run:")
    subprocess.run(me, check=True)
    refunds = json.loads(REFUNDS_FILE.read_text())
    print(f"refunds issued: {len(refunds)} -> {[r['id'] for r in refunds.values()]}")


if __name__ == "__main__":
    main()
