"""Run context plumbing: which run and which step scope the current task is in.

Concurrent tasks (``asyncio.gather``, ``create_task``) copy the context they were started in, so
each sees the scope of its parent step; counters live on the shared :class:`Scope` object and so
count call starts across tasks (I1).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from typing import TYPE_CHECKING, Any

from ._errors import TidebaseError

if TYPE_CHECKING:
    from ._runtime import Run


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
    """The durable tool call being executed in this task, for :func:`idempotency_key`."""

    key: str
    #: Keyed by an ``idempotency_key=`` function given to the decorator.
    explicit: bool = False
    #: The body read :func:`idempotency_key` (R3: only then is an unkeyed tool keyed).
    key_read: bool = False


_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("tidebase_run", default=None)
_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "tidebase_scope", default=None
)
_tool_call: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar(
    "tidebase_tool_call", default=None
)


class StopRun(BaseException):
    """Carries an error that must end the agent run out of a tool call.

    The SDK turns a tool's ``Exception`` into a message for the model and lets the run go on;
    a step that needs review, a lost lease or a cancelled run must instead stop it. Raised as a
    ``BaseException`` from durable tools and unwrapped where the agent run was started.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class NotInRun(TidebaseError):
    """Raised by :func:`current_run` / :func:`idempotency_key` outside their context."""


def active_run() -> Run | None:
    """The run executing in this task, or None."""
    return _run.get()


def current_run() -> Run:
    """The run context of the pipeline executing in this task.

    Raises :class:`NotInRun` outside a ``@checkpointed_pipeline`` or ``Tidebase.run``.
    """
    run = _run.get()
    if run is None:
        raise NotInRun(
            "current_run() was called outside a pipeline; call it from code running inside a "
            "@checkpointed_pipeline function or a Tidebase.run(...) pipeline"
        )
    return run


def idempotency_key() -> str:
    """The idempotency key derived for the durable tool call executing in this task (I4).

    Stable across attempts and processes: pass it to the external API so a re-executed call is
    deduplicated there. Raises :class:`NotInRun` outside a durable tool call in a pipeline.
    """
    call = _tool_call.get()
    if call is None:
        raise NotInRun(
            "idempotency_key() was called outside a durable tool call; call it from the body of "
            "a @durable_tool running inside a pipeline"
        )
    call.key_read = True
    return call.key


def current_scope() -> Scope | None:
    return _scope.get()
