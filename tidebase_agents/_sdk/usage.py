"""Usage of nested agent runs: each run counts its own, and the caller gets it added."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from agents import RunContextWrapper
from agents.usage import Usage


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
