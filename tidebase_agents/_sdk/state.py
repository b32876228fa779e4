"""``RunState`` snapshots for checkpoints and hashes: the user's context never goes in."""

from __future__ import annotations

import copy
from typing import Any

from agents import RunContextWrapper, RunResult, RunResultStreaming
from agents.run_state import RunState


def blanked_state_json(state: RunState[Any]) -> dict[str, Any]:
    """``state.to_json()`` without the user's context value (never persisted or hashed)."""
    shallow = copy.copy(state)
    if state._context is not None:  # SDK private
        # The SDK copies mapping contexts verbatim (secrets included): blank a copy of the
        # wrapper instead, which also leaves the caller's state untouched.
        shallow._context = copy.copy(state._context)  # SDK private
        shallow._context.context = None  # SDK private
    return shallow.to_json(context_serializer=lambda _ctx: {})


def checkpoint_state(result: RunResult | RunResultStreaming) -> RunState[Any]:
    """``result.to_state()`` for a checkpoint: the user's context left out, and without the
    deep copies of usage, approvals and tool invocations the SDK makes so that a state can be
    resumed on its own. A checkpoint state is serialized at once and never resumed, so sharing
    them is safe; those copies were a quarter of the CPU of every agent checkpoint.

    A run stopped on interruptions (approvals, nested agent-tool states) takes the SDK's own
    path, which rebinds nested states to the copy's scope.
    """
    if result.interruptions:
        return result.to_state()
    wrapper = result.context_wrapper

    def shallow_copy() -> RunContextWrapper[Any]:
        copied = copy.copy(wrapper)
        copied.context = None
        return copied

    # An instance attribute shadows the method for this one synchronous call.
    wrapper._copy_for_run_state = shallow_copy  # type: ignore[method-assign]  # SDK private
    try:
        return result.to_state()
    finally:
        del wrapper._copy_for_run_state  # SDK private
