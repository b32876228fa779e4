"""Retention (``runs prune``): delete ended runs with everything recorded for them, in small
batches, keeping their usage as daily rollups so usage totals stay right.

Each batch is its own short transaction: it picks up to ``batch`` ended runs with
``FOR UPDATE SKIP LOCKED`` (it never waits on a writer, and the rows of ended runs are not ones
an executing run writes), folds their usage into ``tidebase_usage_daily`` and deletes their
usage, steps, events, state and run rows. On PostgreSQL a batch is one statement
(``sql.PRUNE_BATCH``); SQLite, one writer at a time, takes a few statements per batch. Only statuses in ``PRUNABLE_RUN_STATUSES`` are
ever deleted, and each delete checks the status again.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, case, cast, delete, extract, func, literal, null, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .._vocab import PRUNABLE_RUN_STATUSES, RunStatus
from .tables import (
    ApprovalRow,
    EventRow,
    MessageRow,
    RunRow,
    StateRow,
    StepRow,
    UsageDailyRow,
    UsageRow,
)

#: Runs each prune transaction deletes at most.
PRUNE_BATCH = 500
DAY = 86400
_CHILD_TABLES = (UsageRow, StepRow, EventRow, StateRow, ApprovalRow, MessageRow)
_SUMMED = ("requests", "input_tokens", "output_tokens", "cached_tokens", "total_tokens")
_ROLLUP_SUMS = (*_SUMMED, "reasoning_tokens", "records", "lost_tokens", "recorded_cost")
_UNPRICED = ("unpriced_input", "unpriced_output", "unpriced_cached")


@dataclasses.dataclass(frozen=True)
class PruneFilter:
    """Which runs a prune deletes: ended before ``before``, in ``statuses`` (a subset of
    ``PRUNABLE_RUN_STATUSES``), of ``pipelines`` (all when empty)."""

    before: dt.datetime
    statuses: frozenset[RunStatus] = PRUNABLE_RUN_STATUSES
    pipelines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.statuses <= PRUNABLE_RUN_STATUSES:
            raise ValueError("only ended runs may be pruned")

    def where(self) -> list[Any]:
        where = [
            RunRow.status.in_(sorted(str(s) for s in self.statuses)),
            RunRow.finished_at < self.before,
        ]
        if self.pipelines:
            where.append(RunRow.pipeline.in_(self.pipelines))
        return where


def epoch_day(column: Any) -> Any:
    """The start (epoch seconds) of the UTC day holding ``column``'s time."""
    epoch = extract("epoch", column)
    return cast(epoch - epoch % literal(DAY, BigInteger, literal_execute=True), BigInteger)


class RetentionOps(abc.ABC):
    """The retention half of a store; backends supply the transactions and ``_insert``."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def connect(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def _insert(self) -> Any: ...

    async def count_prunable(self, which: PruneFilter) -> int:
        """How many runs :meth:`prune` would delete now."""
        async with self.connect() as conn:
            q = select(func.count()).select_from(RunRow).where(*which.where())
            return int((await conn.execute(q)).scalar() or 0)

    async def prune(
        self,
        which: PruneFilter,
        *,
        batch: int = PRUNE_BATCH,
        pause: float = 0.0,
        stop: asyncio.Event | None = None,
    ) -> int:
        """Delete the runs ``which`` picks, ``batch`` at a time, each batch its own
        transaction, and no more once ``stop`` is set; return how many were deleted.

        With ``pause``, each batch is followed by a rest of ``pause`` seconds or as long as
        the batch took, whichever is longer, so pruning takes at most half of the database's
        time from the runs executing meanwhile.
        """
        deleted = 0
        loop = asyncio.get_running_loop()
        while stop is None or not stop.is_set():
            started = loop.time()
            n = await self._prune_once(which, batch)
            deleted += n
            if n < batch:
                break
            if pause:
                await asyncio.sleep(max(pause, loop.time() - started))
        return deleted

    async def _prune_once(self, which: PruneFilter, batch: int) -> int:
        """One batch in one transaction: how many runs it deleted."""
        async with self.transaction() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(RunRow.run_id)
                        .where(*which.where())
                        .order_by(RunRow.finished_at)
                        .limit(batch)
                        .with_for_update(skip_locked=True)
                    )
                ).scalars()
            )
            if not ids:
                return 0
            await self._roll_up(conn, ids)
            for table in _CHILD_TABLES:
                await conn.execute(delete(table).where(table.run_id.in_(ids)))
            await conn.execute(delete(RunRow).where(RunRow.run_id.in_(ids), *which.where()))
            return len(ids)

    async def _roll_up(self, conn: AsyncConnection, ids: Sequence[str]) -> None:
        """Add the usage of runs ``ids`` to the daily rollups."""
        unpriced = UsageRow.cost_usd.is_(None)
        day = epoch_day(UsageRow.created_at)
        model = func.coalesce(UsageRow.model, "")
        rows = (
            await conn.execute(
                select(
                    day.label("day"),
                    RunRow.pipeline,
                    model.label("model"),
                    *(func.sum(getattr(UsageRow, c)).label(c) for c in _SUMMED),
                    func.sum(UsageRow.reasoning_tokens).label("reasoning_tokens"),
                    func.count().label("records"),
                    func.sum(case((UsageRow.lost, UsageRow.total_tokens), else_=0)).label(
                        "lost_tokens"
                    ),
                    func.coalesce(func.sum(UsageRow.cost_usd), 0.0).label("recorded_cost"),
                    *(
                        func.sum(case((unpriced, getattr(UsageRow, f"{c}_tokens")), else_=0)).label(
                            f"unpriced_{c}"
                        )
                        for c in ("input", "output", "cached")
                    ),
                )
                .join(RunRow, RunRow.run_id == UsageRow.run_id)
                .where(UsageRow.run_id.in_(list(ids)))
                .group_by(day, RunRow.pipeline, model)
            )
        ).all()
        if not rows:
            return
        ins = self._insert()(UsageDailyRow).values([dict(r._mapping) for r in rows])
        await conn.execute(
            ins.on_conflict_do_update(
                index_elements=["day", "pipeline", "model"],
                set_={
                    c: getattr(UsageDailyRow, c) + getattr(ins.excluded, c)
                    for c in (*_ROLLUP_SUMS, *_UNPRICED)
                },
            )
        )

    async def rollup_totals(
        self,
        by: Sequence[str],
        *,
        pipeline: str | None,
        since: dt.datetime | None,
        bucket_seconds: int | None,
    ) -> list[dict[str, Any]]:
        """Usage totals of pruned runs, in ``Store.usage_totals``' row shape (``run`` None).

        A rollup counts from its day's start: ``since`` keeps the days starting at or after
        it, and a bucket narrower than a day gets the whole day's usage at the day's start.
        """
        d = UsageDailyRow
        keyed: dict[str, Any] = {
            "run": null(),
            "pipeline": d.pipeline,
            "model": func.nullif(d.model, ""),
        }
        picked = {k: keyed[k] for k in dict.fromkeys([*by, "model"])}
        if bucket_seconds is not None:
            width = literal(int(bucket_seconds), BigInteger, literal_execute=True)
            picked["bucket"] = d.day - d.day % width
        groups = [v for k, v in picked.items() if k != "run"]
        q = select(
            *(v.label(k) for k, v in picked.items()),
            *(func.sum(getattr(d, c)).label(c) for c in (*_SUMMED, "records", "lost_tokens")),
            func.sum(d.recorded_cost).label("recorded_cost"),
            *(func.sum(getattr(d, c)).label(c) for c in _UNPRICED),
        ).group_by(*groups)
        if pipeline:
            q = q.where(d.pipeline == pipeline)
        if since:
            q = q.where(d.day >= int(since.timestamp()))
        async with self.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]
