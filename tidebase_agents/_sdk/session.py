"""Sessions under replay: a journaling proxy for an Agents SDK ``Session``.

The SDK reads and writes a run's session while the run executes (the new user input before the
first model call, each turn's items after it). If the process dies mid-run, the agent step is
re-executed and would write the same input again and see a history that differs from the first
attempt's. Each session call made inside an agent step is therefore a step of its own:

- ``get_items`` returns what the first attempt read, so the re-executed run sees the same
  history and the same model input;
- ``add_items`` / ``pop_item`` / ``clear_session`` that completed are not repeated.

What remains: a crash in the moment between the session's own commit and the commit of that
call's checkpoint repeats that one write on resume (the session store and the checkpoint store
do not share a transaction).
"""

from __future__ import annotations

from typing import Any

from .._engine import Executor, StepSpec, current_scope
from .._hashing import sha256_hex


class DurableSession:
    """Wraps ``inner`` so that its calls inside a pipeline replay instead of repeating."""

    def __init__(self, inner: Any, executor: Executor) -> None:
        self.inner = inner
        self.executor = executor
        self.session_id = inner.session_id
        self.session_settings = getattr(inner, "session_settings", None)

    async def _journal(self, op: str, call: Any, arguments: Any) -> Any:
        scope = current_scope() or self.executor.root
        name = f"{scope.prefix}session:{op}#{scope.next_ordinal('session')}"
        spec = StepSpec(
            name=name,
            fn=call,
            input_hash=sha256_hex({"session": self.session_id, "op": op, "args": arguments}),
        )
        return await self.executor.execute(spec)

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return list(
            await self._journal("get", lambda: self.inner.get_items(limit), {"limit": limit})
        )

    async def add_items(self, items: list[Any]) -> None:
        await self._journal("add", lambda: self.inner.add_items(items), items)

    async def pop_item(self) -> Any:
        return await self._journal("pop", self.inner.pop_item, None)

    async def clear_session(self) -> None:
        await self._journal("clear", self.inner.clear_session, None)
