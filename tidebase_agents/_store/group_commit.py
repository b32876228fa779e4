"""Group commit: step writes of many runs that are ready at the same moment share one
transaction and one round trip.

A write that finds a leader slot free goes out at once, alone, exactly as a single statement
would. While every slot is busy, writes queue; the first one queued is handed the next free
slot and takes everything queued with it as one batch: asyncpg's ``executemany``, which
pipelines the statements in one round trip and one implicit transaction (atomic: all land or
none do). Fencing is not weakened: each write of a batch runs its own fence, and the batch form
of the statement fails unless that fence held, so a batch with one stale lease lands nothing;
its writes then go out again one by one, each with its own outcome (a fence refused, a value the
server rejects). A batch interrupted midway (the connection lost) may have committed: like a
single interrupted statement, it is never sent again, and each of its writes raises.

A batch is sent to its end even if the caller that leads it is cancelled (the other writes are
not the caller's to abandon); the cancellation is raised after.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from .sqlite_writer import uninterrupted

#: A batch's outcome for a write whose fence held (the batch form returns no rows).
HELD = object()
_LEAD = object()

FetchRow = Callable[[str, Sequence[Any], float], Awaitable[Any]]
ExecuteMany = Callable[[str, list[Sequence[Any]], float], Awaitable[None]]


@dataclasses.dataclass(eq=False)
class _Write:
    params: Sequence[Any]
    deadline: float
    #: Resolves to the write's row (None: the fence refused), or to _LEAD: send the next batch.
    signal: asyncio.Future[Any]
    taken: bool = False


class GroupCommit:
    """Sends one fenced statement for many callers, batching those that queue up.

    ``statement`` returns the fence's row (None when the lease no longer holds);
    ``checked`` is the same write whose result fails the statement unless the fence held.
    """

    def __init__(
        self,
        fetchrow: FetchRow,
        executemany: ExecuteMany,
        statement: str,
        checked: str,
        *,
        leaders: int,
        most: int = 64,
    ) -> None:
        self._fetchrow = fetchrow
        self._executemany = executemany
        self._statement = statement
        self._checked = checked
        self._leaders = leaders
        self._most = most
        self._active = 0
        self._queue: collections.deque[_Write] = collections.deque()
        #: Batches of more than one write sent, and the writes they carried.
        self.batches = 0
        self.batched_writes = 0

    async def fetchrow(self, params: Sequence[Any], timeout: float) -> Any:
        """The write's outcome: the fence's row, :data:`HELD`, or None if the fence refused."""
        loop = asyncio.get_running_loop()
        mine = _Write(params, loop.time() + timeout, loop.create_future())
        self._queue.append(mine)
        if self._active < self._leaders:
            self._active += 1
        else:
            try:
                signal = await asyncio.shield(mine.signal)
            except asyncio.CancelledError:
                if not mine.taken:
                    # Only a write in a batch gets an outcome: a done one was handed a slot.
                    self._queue.remove(mine)
                    if mine.signal.done():
                        self._pass_on()
                raise
            if signal is not _LEAD:
                return signal
            mine.signal = loop.create_future()
        try:
            batch = self._take(mine)
            if len(batch) == 1:  # alone: exactly the single statement, with nothing to shield
                return await self._fetchrow(self._statement, params, timeout)
            await uninterrupted(self._send(batch))
        finally:
            self._pass_on()
        return mine.signal.result()

    def _take(self, mine: _Write) -> list[_Write]:
        """This leader's write and those queued behind it, except any already handed a slot
        of its own."""
        batch = [mine]
        left: collections.deque[_Write] = collections.deque()
        for write in self._queue:
            if write is mine:
                continue
            if len(batch) < self._most and not write.signal.done():
                batch.append(write)
            else:
                left.append(write)
        self._queue = left
        for write in batch:
            write.taken = True
        return batch

    def _pass_on(self) -> None:
        """Hand this leader's slot to the first queued write not yet handed one, or free it."""
        for write in self._queue:
            if not write.signal.done():
                write.signal.set_result(_LEAD)
                return
        self._active -= 1

    async def _send(self, batch: list[_Write]) -> None:
        """Send a batch of two or more writes and settle each one's outcome."""
        loop = asyncio.get_running_loop()
        timeout = max(min(w.deadline for w in batch) - loop.time(), 0.01)
        outcomes: list[Any] = []
        try:
            try:
                await self._executemany(self._checked, [w.params for w in batch], timeout)
                outcomes = [HELD] * len(batch)
                self.batches += 1
                self.batched_writes += len(batch)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                # The server refused one of them (a fence, a value) and landed none: each goes
                # alone, to learn its own outcome.
                pass
            for write in batch[len(outcomes) :]:
                try:
                    outcomes.append(await self._fetchrow(self._statement, write.params, timeout))
                except Exception as exc:  # this write's own failure, raised to its caller
                    outcomes.append(_Failed(exc))
        except BaseException as exc:
            for write in batch[len(outcomes) :]:
                _settle(write, _Failed(exc))
            for write, outcome in zip(batch, outcomes, strict=False):
                _settle(write, outcome)
            raise
        for write, outcome in zip(batch, outcomes, strict=True):
            _settle(write, outcome)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


def _settle(write: _Write, outcome: Any) -> None:
    if write.signal.done():
        return
    if isinstance(outcome, _Failed):
        write.signal.set_exception(outcome.error)
    else:
        write.signal.set_result(outcome)
