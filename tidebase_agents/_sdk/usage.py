"""Token usage of agent runs: per model, and isolated per run for nested runs (R9)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from agents import Agent, RunContextWrapper
from agents.exceptions import RunErrorDetails
from agents.items import HandoffOutputItem, RunItem
from agents.result import RunResultBase
from agents.run_state import RunState
from agents.usage import Usage

from .fingerprint import model_name


@dataclasses.dataclass(frozen=True)
class UsageEntry:
    """Tokens one run spent on one model."""

    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int


def _producing_items(responses: list[Any], items: list[RunItem]) -> list[int | None]:
    """Per response, the index of the first new item made from its output (None if none).

    Matching is by equality (identity on live results, equal fields after a JSON round trip)
    and moves forward only, so identical items in different turns pair up in order.
    """
    found: list[int | None] = []
    cursor = 0
    for response in responses:
        index = next(
            (
                i
                for output in response.output
                for i in range(cursor, len(items))
                if items[i].raw_item is output or items[i].raw_item == output
            ),
            None,
        )
        found.append(index)
        if index is not None:
            cursor = index + 1
    return found


def result_usage(
    result: RunResultBase | RunErrorDetails,
    agent: Agent[Any],
    *,
    skip_responses: int = 0,
) -> list[UsageEntry]:
    """Tokens of the run's own model responses, grouped by model, in first-use order.

    Each raw response is attributed to the agent whose items it produced, so handoffs between
    agents on different models split correctly; a response that produced no item (an empty
    answer) goes to the agent in charge after the handoffs before it; ``agent`` is the starting
    agent. Only the run's own ``raw_responses`` count: nested agent-as-tool runs are steps of
    their own and record their own usage, so nothing is counted twice. For a run resumed from a
    ``RunState`` pass ``skip_responses=state_response_count(input)`` taken before the run: those
    responses were counted by the run that produced the state. Also accepts a failed run's
    ``run_data`` (which lacks responses still in flight, e.g. one a parallel input guardrail
    cut short; their tokens are only in ``run_data.context_wrapper.usage``).
    """
    items = list(result.new_items)
    responses = list(result.raw_responses)
    produced = _producing_items(responses, items)
    current, seen = agent, 0
    totals: dict[str, list[int]] = {}
    for number, (response, index) in enumerate(zip(responses, produced, strict=True)):
        end = index
        if end is None:  # up to the next response's first item
            end = next((i for i in produced[number + 1 :] if i is not None), len(items))
        for item in items[seen:end]:
            if isinstance(item, HandoffOutputItem):
                current = item.target_agent
        if index is not None:
            current = getattr(items[index], "agent", None) or current
            end = index + 1
        seen = end
        if number < skip_responses:
            continue
        usage = response.usage
        sums = totals.setdefault(model_name(current.model), [0] * 6)
        for i, value in enumerate(
            (
                usage.requests,
                usage.input_tokens,
                usage.output_tokens,
                usage.input_tokens_details.cached_tokens,
                usage.output_tokens_details.reasoning_tokens,
                usage.total_tokens,
            )
        ):
            sums[i] += value or 0
    return [UsageEntry(model, *values) for model, values in totals.items()]


def state_response_count(input: Any) -> int:
    """How many model responses a ``RunState`` run input already holds (0 for other inputs).

    A run resumed from that state returns them again at the start of its ``raw_responses``.
    """
    return len(input._model_responses) if isinstance(input, RunState) else 0  # SDK private


def merge_usage_into(context_wrapper: RunContextWrapper[Any], usage: Usage) -> None:
    """Add ``usage`` (requests, tokens, details, per-request entries) to a live wrapper."""
    context_wrapper.usage.add(usage)


def isolate_usage(
    kwargs: Mapping[str, Any], isolate: bool
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """Run kwargs whose wrapper context has its own Usage, and how to settle it afterwards."""
    call_kwargs = dict(kwargs)
    caller = call_kwargs.get("context")
    if not (isolate and isinstance(caller, RunContextWrapper)):
        return call_kwargs, None
    # A shallow copy keeps the live context value, the ToolContext identity fields and the SDK's
    # agent-tool scope attribute; only the Usage is the run's own.
    own = copy.copy(caller)
    own.usage = Usage()
    call_kwargs["context"] = own
    return call_kwargs, lambda: merge_usage_into(caller, own.usage)
