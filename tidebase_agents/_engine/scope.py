"""Step scopes: where the current task's step names are allocated, and its durable tool call.

Concurrent tasks (``asyncio.gather``, ``create_task``) copy the context they were started in, so
each sees the scope of its parent step; counters live on the shared :class:`Scope` object and so
count call starts across tasks (I1).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


@dataclasses.dataclass(eq=False)
class Scope:
    """Step names are allocated within a scope: the run's top level or one step's execution."""

    prefix: str = ""
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    claimed: set[str] = dataclasses.field(default_factory=set)
    #: The task whose code the scope belongs to. Calls from other tasks (gather, create_task)
    #: may start in a different order on every attempt.
    owner: asyncio.Task[Any] | None = dataclasses.field(default_factory=_current_task)

    def next_ordinal(self, key: str) -> int:
        n = self.counters.get(key, 0) + 1
        self.counters[key] = n
        return n

    def child(self, step_name: str) -> Scope:
        return Scope(prefix=f"{step_name}/")

    def in_concurrent_task(self) -> bool:
        """Whether the calling code runs in a task other than the scope's own."""
        return _current_task() is not self.owner


@dataclasses.dataclass(eq=False)
class ToolCall:
    """The durable tool call being executed in this task, for ``idempotency_key()``."""

    key: str
    #: Keyed by an ``idempotency_key=`` function given to the decorator.
    explicit: bool = False
    #: The body read ``idempotency_key()`` (R3: only then is an unkeyed tool keyed).
    key_read: bool = False
    #: Called at the first read when the intent record says the step is unkeyed: decoration
    #: could not see the read, and the record must learn it before the external call is made.
    on_first_read: Callable[[], None] | None = None


scope_var: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "tidebase_scope", default=None
)
tool_call_var: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar(
    "tidebase_tool_call", default=None
)


def current_scope() -> Scope | None:
    return scope_var.get()


def current_tool_call() -> ToolCall | None:
    return tool_call_var.get()
