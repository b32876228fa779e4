"""Tool approvals of an agent step (W1): what a run stopped on waits for, and the decisions
applied to the SDK's ``RunState`` so the agent run continues where it stopped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agents import RunResult
from agents.items import ToolApprovalItem
from agents.run_state import RunState

from .._errors import PendingApproval
from .._store import ApprovalRecord
from .._vocab import ApprovalDecision


def _call_id(item: ToolApprovalItem) -> str:
    return str(item.call_id or item.tool_name or "")


def pending_approvals(result: RunResult) -> list[PendingApproval]:
    """The tool calls ``result`` stopped on (nested agent-as-tool calls included)."""
    return [
        PendingApproval(
            call_id=_call_id(item),
            agent=item.agent.name,
            tool=str(item.tool_name or item.name or ""),
            arguments=item.arguments,
        )
        for item in result.interruptions
    ]


def apply_decisions(state: RunState[Any], decisions: Mapping[str, ApprovalRecord]) -> None:
    """Approve or reject each interruption of ``state`` as decided (by call id)."""
    for item in state.get_interruptions():
        record = decisions[_call_id(item)]
        if record.decision == ApprovalDecision.APPROVE:
            state.approve(item, always_approve=record.always)
        else:
            state.reject(item, always_reject=record.always, rejection_message=record.message)


def decisions_json(decisions: Mapping[str, ApprovalRecord]) -> list[list[Any]]:
    """The decisions as the continuation's input: what its answer depends on."""
    return [
        [call_id, record.decision, record.always, record.message]
        for call_id, record in sorted(decisions.items())
    ]
