"""The reads behind the run inspector, on both backends: keyset pages of runs (P2), run counts,
per-run cost for a page of runs and usage over time buckets (R9)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from agentkit_common import close_engines as close_engines
from harness import library_engine
from sqlalchemy import update

from tidebase_agents import ConfigurationError, Run, Tidebase, checkpointed_pipeline
from tidebase_agents._store import RunCursor
from tidebase_agents._store.tables import RunRow, UsageRow

T0 = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.timezone.utc)


async def set_times(url: str, table: Any, rows: list[tuple[Any, dt.datetime]]) -> None:
    """Give rows (each picked by a where clause) chosen creation times: everything the API
    writes is created 'now'."""
    engine = library_engine(url)
    try:
        async with engine.begin() as conn:
            for where, when in rows:
                await conn.execute(update(table).where(where).values(created_at=when))
    finally:
        await engine.dispose()


async def set_run_times(url: str, times: dict[str, dt.datetime]) -> None:
    await set_times(url, RunRow, [(RunRow.run_id == r, when) for r, when in times.items()])


async def noop(run: Run, value: Any) -> Any:
    return value


def queued_pipeline(url: str, name: str) -> Any:
    @checkpointed_pipeline(name, database_url=url)
    async def later() -> None:
        return None

    return later


async def with_usage(run: Run, records: list[dict[str, Any]]) -> None:
    for record in records:
        await run.usage_record(**record)


async def test_runs_page_walks_every_run_once_newest_first_with_ties_broken_by_run_id(
    db_url: str,
) -> None:
    tide = Tidebase(db_url)
    ids = [f"page-{i:02d}" for i in range(11)]
    for i, run_id in enumerate(ids):
        await tide.run("pages" if i % 2 else "other", noop, run_id=run_id, input=i)
    # Five runs share one creation time: only the run id orders them.
    times = {run_id: T0 + dt.timedelta(minutes=i if i < 6 else 6) for i, run_id in enumerate(ids)}
    await set_run_times(db_url, times)
    expected = sorted(ids, key=lambda r: (times[r], r), reverse=True)

    seen: list[str] = []
    cursor: RunCursor | None = None
    pages = 0
    while True:
        page = await tide.runs_page(limit=3, before=cursor)
        seen += [r.run_id for r in page.runs]
        pages += 1
        if page.next is None:
            break
        assert page.next == RunCursor(page.runs[-1].created_at, page.runs[-1].run_id)
        cursor = page.next
    assert seen == expected
    assert pages == 4  # 3 + 3 + 3 + 2, and the last page says it is the last

    # Filters hold across pages.
    first = await tide.runs_page(pipeline="pages", limit=2)
    second = await tide.runs_page(pipeline="pages", limit=2, before=first.next)
    assert [r.run_id for r in first.runs + second.runs] == [
        r for r in expected if ids.index(r) % 2
    ][:4]
    exact = await tide.runs_page(pipeline="pages", limit=5)
    assert len(exact.runs) == 5 and exact.next is None  # exactly a page: no empty next page


async def test_runs_page_filters_by_status_queue_and_since_and_refuses_bad_input(
    db_url: str,
) -> None:
    tide = Tidebase(db_url)
    await tide.run("p", noop, run_id="done", input=1)
    assert await queued_pipeline(db_url, "p").enqueue(run_id="waiting", queue="mail") == "waiting"
    await set_run_times(db_url, {"done": T0})

    page = await tide.runs_page(status=["queued", "completed"])
    assert [r.run_id for r in page.runs] == ["waiting", "done"]
    assert [r.run_id for r in (await tide.runs_page(status="queued")).runs] == ["waiting"]
    assert [r.run_id for r in (await tide.runs_page(queue="mail")).runs] == ["waiting"]
    since = T0 + dt.timedelta(seconds=1)
    assert [r.run_id for r in (await tide.runs_page(since=since)).runs] == ["waiting"]
    with pytest.raises(ConfigurationError, match="status must be one of"):
        await tide.runs_page(status="sleeping")
    with pytest.raises(ConfigurationError, match="limit"):
        await tide.runs_page(limit=0)


async def test_run_counts_group_runs_by_status_pipeline_or_queue_under_the_filters(
    db_url: str,
) -> None:
    tide = Tidebase(db_url)
    for i in range(3):
        await tide.run("alpha", noop, run_id=f"a-{i}", input=i)
    await tide.run("beta", noop, run_id="b-0", input=0)
    await queued_pipeline(db_url, "beta").enqueue(run_id="b-1", queue="mail")

    assert await tide.run_counts() == {"completed": 4, "queued": 1}
    assert await tide.run_counts("pipeline") == {"alpha": 3, "beta": 2}
    assert await tide.run_counts("queue") == {None: 4, "mail": 1}
    assert await tide.run_counts(pipeline="beta") == {"completed": 1, "queued": 1}
    assert await tide.run_counts("pipeline", status="queued") == {"beta": 1}
    with pytest.raises(ConfigurationError, match="by must be one of"):
        await tide.run_counts("owner")

    # Capped: a count stops past the cap, and only the statuses asked for are counted.
    assert await tide.run_counts(cap=2) == {"completed": 3, "queued": 1}
    assert await tide.run_counts(cap=10, pipeline="beta") == {"completed": 1, "queued": 1}
    assert await tide.run_counts(cap=1, pipeline=["alpha", "beta"]) == {"completed": 2, "queued": 1}
    assert await tide.run_counts(cap=2, status=["queued", "failed"]) == {"queued": 1}
    with pytest.raises(ConfigurationError, match="cap"):
        await tide.run_counts("pipeline", cap=2)


async def test_run_costs_prices_each_run_of_a_page_in_one_read(db_url: str) -> None:
    tide = Tidebase(db_url)
    mini = {"model": "gpt-4o-mini", "input_tokens": 1_000_000, "output_tokens": 1_000_000}
    await tide.run("c", with_usage, run_id="priced", input=[mini, {**mini, "input_tokens": 0}])
    await tide.run("c", with_usage, run_id="own-cost", input=[{"model": "x", "cost_usd": 0.5}])
    await tide.run(
        "c", with_usage, run_id="unpriced", input=[{"model": "no-such-model", "input_tokens": 5}]
    )
    await tide.run("c", with_usage, run_id="no-usage", input=[])

    costs = await tide.run_costs(["priced", "own-cost", "unpriced", "no-usage", "absent"])
    # gpt-4o-mini: $0.15 per 1M input, $0.60 per 1M output tokens.
    assert costs == {"priced": pytest.approx(1.35), "own-cost": 0.5, "unpriced": None}
    assert await tide.run_costs(["own-cost"]) == {"own-cost": 0.5}
    assert await tide.run_costs([]) == {}


async def test_usage_over_time_sums_tokens_and_cost_per_bucket_pipeline_and_model(
    db_url: str,
) -> None:
    tide = Tidebase(db_url)
    records = [
        {"model": "gpt-4o-mini", "input_tokens": 100, "output_tokens": 10},
        {"model": "gpt-4o-mini", "input_tokens": 200, "output_tokens": 20},
        {"model": "gpt-4o", "input_tokens": 300, "output_tokens": 30},
        {"model": "gpt-4o-mini", "input_tokens": 400, "output_tokens": 40},
    ]
    await tide.run("writer", with_usage, run_id="u1", input=records[:3])
    await tide.run("reader", with_usage, run_id="u2", input=records[3:])
    ids = [(run, u.dedupe_key) for run in ("u1", "u2") for u in await tide.usage_records(run)]
    at = [
        T0 + dt.timedelta(seconds=5),
        T0 + dt.timedelta(minutes=59, seconds=59, microseconds=900_000),  # still 10:00
        T0 + dt.timedelta(hours=1),  # the 11:00 bucket starts here
        T0 + dt.timedelta(days=1),
    ]
    await set_times(
        db_url,
        UsageRow,
        [
            ((UsageRow.run_id == run) & (UsageRow.dedupe_key == key), when)
            for (run, key), when in zip(ids, at, strict=True)
        ],
    )

    rows = await tide.usage_over_time(dt.timedelta(hours=1))
    got = [(r["bucket"], r["pipeline"], r["model"], r["input_tokens"], r["records"]) for r in rows]
    assert got == [
        (T0, "writer", "gpt-4o-mini", 300, 2),
        (T0 + dt.timedelta(hours=1), "writer", "gpt-4o", 300, 1),
        (T0 + dt.timedelta(days=1), "reader", "gpt-4o-mini", 400, 1),
    ]
    assert rows[0]["cost_usd"] == pytest.approx((300 * 0.15 + 30 * 0.60) / 1e6)

    daily = await tide.usage_over_time(dt.timedelta(days=1), by="model")
    assert [(r["bucket"], r["model"], r["input_tokens"]) for r in daily] == [
        (T0.replace(hour=0), "gpt-4o", 300),
        (T0.replace(hour=0), "gpt-4o-mini", 300),
        (T0.replace(hour=0) + dt.timedelta(days=1), "gpt-4o-mini", 400),
    ]
    later = await tide.usage_over_time(
        dt.timedelta(hours=1), pipeline="writer", since=T0 + dt.timedelta(minutes=1)
    )
    assert [r["input_tokens"] for r in later] == [200, 300]
    with pytest.raises(ConfigurationError, match="whole number of seconds"):
        await tide.usage_over_time(dt.timedelta(milliseconds=1500))
