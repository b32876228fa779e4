"""The replay contract (R1-R4, R7-R10, R12, R13, I4, I5) through the explicit step API.

Every test runs on embedded SQLite and on a fresh PostgreSQL database (the ``db_url`` fixture).
Step functions count their calls, so "not executed" is asserted, never assumed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from child_support import Box, Color, Point, run_scenario
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from tidebase_agents import (
    CheckpointSerializationError,
    PayloadTooLarge,
    RunCancelled,
    RunFailed,
    StepInputMismatch,
    StepNeedsReview,
    Tidebase,
)


def _versions(versions: list[Any]) -> list[tuple[int, Any]]:
    return [(v.version, v.value) for v in versions]


class Interrupt(Exception):
    """Ends a pipeline invocation early (stands in for a crash after its steps)."""


def sdk_hash(value: Any) -> str:
    """The Tidebase SDKs' hash of a plain JSON value (contract I5)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Calls(collections.Counter[str]):
    def fn(self, name: str, value: Any = None) -> Callable[[], Any]:
        def call() -> Any:
            self[name] += 1
            return value

        return call


@pytest.fixture
async def tide(db_url: str) -> Any:
    t = Tidebase(db_url, retry_backoff=0.001)
    yield t
    await t.close()


async def steps_of(tide: Tidebase, run_id: str) -> dict[str, Any]:
    return {s.name: s for s in await tide.steps(run_id)}


async def event_kinds(tide: Tidebase, run_id: str) -> list[str]:
    return [e.kind for e in await tide.store.get_events(run_id)]


TIDEBASE_TABLES = ("tidebase_runs", "tidebase_steps", "tidebase_events", "tidebase_state")


class Writes:
    """Counts committed write transactions on the test database, however the library reaches it.

    PostgreSQL counts them itself: statement triggers on the tidebase tables log the writing
    transaction's id (``pg_current_xact_id()``) into a side table, read back on another
    connection; a rolled-back write leaves nothing. On SQLite each COMMIT of the store's
    SQLAlchemy engine is one, and each commit of its write path (``writer_commits``).
    """

    def __init__(self, tide: Tidebase) -> None:
        self.url = str(tide.database_url)
        self.pg = self.url.startswith("postgres")
        self.tide = tide
        self.commits = 0
        self.engine: Any = None

    def _on_commit(self, conn: Any) -> None:
        self.commits += 1

    async def __aenter__(self) -> Writes:
        if self.pg:
            self.engine = create_async_engine("postgresql+asyncpg://" + self.url.split("://", 1)[1])
            async with self.engine.begin() as conn:
                await conn.exec_driver_sql(
                    "CREATE TABLE IF NOT EXISTS tb_test_writes (id BIGSERIAL PRIMARY KEY, tx TEXT NOT NULL)"
                )
                await conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION tb_test_log() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN INSERT INTO public.tb_test_writes (tx) VALUES (pg_current_xact_id()::text); "
                    "RETURN NULL; END $$"
                )
                for table in (*TIDEBASE_TABLES, "tidebase_usage"):
                    await conn.exec_driver_sql(
                        f"CREATE OR REPLACE TRIGGER tb_test_log AFTER INSERT OR UPDATE OR DELETE ON {self.tide.schema}.{table} "
                        f"FOR EACH STATEMENT EXECUTE FUNCTION tb_test_log()"
                    )
        else:
            event.listen(self.tide.store.engine.sync_engine, "commit", self._on_commit)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.pg:
            await self.engine.dispose()
        else:
            event.remove(self.tide.store.engine.sync_engine, "commit", self._on_commit)

    async def count(self) -> int:
        if not self.pg:
            return self.commits + int(self.tide.store.writer_commits)  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            result = await conn.exec_driver_sql("SELECT count(DISTINCT tx) FROM tb_test_writes")
            return int(result.scalar())


class Statements:
    """Statements the store's SQLAlchemy engine sends (its reads and operator actions)."""

    def __init__(self, tide: Tidebase) -> None:
        self.engine = tide.store.engine.sync_engine
        self.sent: list[str] = []

    def _listener(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(statement)

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._listener)
        return self

    def __exit__(self, *exc: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._listener)


# -- R1 ------------------------------------------------------------------------------------------

R1_VALUES: dict[str, Any] = {
    "model": Point(x=1, y=2, tags=["t"]),
    "dataclass": Box("b", (3, 4), dt.datetime(2024, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)),
    "datetime": dt.datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "bytes": b"\x00\x01\xfe\xff",
    "set": {3, 1, 2},
    "frozenset": frozenset({"a", "b"}),
    "tuple": (1, "a", (2, 3)),
    "enum": Color.BLUE,
    "nested": {
        "a": {"b": [Point(x=5, y=6), {"c": (1, 2), "d": {b"x"}}]},
        "when": dt.date(2024, 1, 1),
        "$t": "a user key that looks like a codec tag",
    },
    "plain": {"n": 1, "f": 1.5, "s": "é", "l": [None, True]},
    "none": None,
}


def test_r1_completed_steps_return_recorded_typed_outputs_in_a_new_instance_and_loop(
    db_url: str,
) -> None:
    """R1: a completed step returns its recorded output with its type, its fn is not called,
    also from a new Tidebase instance on a new event loop."""
    calls = Calls()
    seen: list[dict[str, Any]] = []

    async def pipeline(run: Any, inp: Any) -> str:
        out = {name: await run.step(name, calls.fn(name, v)) for name, v in R1_VALUES.items()}
        seen.append(out)
        if len(seen) == 1:
            raise Interrupt
        return "done"

    async def invoke() -> Any:
        tide = Tidebase(db_url)
        try:
            return await tide.run("r1", pipeline, run_id="r1-run")
        finally:
            await tide.close()

    with pytest.raises(Interrupt):
        asyncio.run(invoke())
    assert calls == {name: 1 for name in R1_VALUES}
    assert asyncio.run(invoke()) == "done"
    assert calls == {name: 1 for name in R1_VALUES}, "a completed step's fn was called again"

    replayed = seen[1]
    for name, value in R1_VALUES.items():
        assert replayed[name] == value, name
        assert type(replayed[name]) is type(value), name
    assert type(replayed["dataclass"].sizes) is tuple
    assert replayed["dataclass"].when.tzinfo is not None
    assert replayed["datetime"].utcoffset() == dt.timedelta(hours=2)
    nested = replayed["nested"]["a"]["b"]
    assert type(nested[0]) is Point
    assert type(nested[1]["c"]) is tuple
    assert nested[1]["d"] == {b"x"}
    assert type(replayed["nested"]["when"]) is dt.date
    assert type(replayed["tuple"][2]) is tuple


async def test_r1_replayed_step_in_same_process_is_not_executed_and_costs_no_round_trip(
    tide: Tidebase,
) -> None:
    """R1/R8: replaying a completed step does not call fn, writes nothing and sends no
    statement (its checkpoint was loaded with the others when the run was acquired)."""
    calls = Calls()
    measured: list[tuple[int, int]] = []

    async def pipeline(run: Any, inp: Any) -> Any:
        a = await run.step("a", calls.fn("a", Point(x=1, y=1)))
        async with Writes(tide) as writes:
            before = await writes.count()
            with Statements(tide) as statements:
                b = await run.step("b", calls.fn("b", {"k": (1, 2)}))
            measured.append((await writes.count() - before, len(statements.sent)))
        if len(measured) == 1:
            raise Interrupt
        return [a, b]

    with pytest.raises(Interrupt):
        await tide.run("r1b", pipeline, run_id="r1b")
    assert await tide.run("r1b", pipeline, run_id="r1b") == [Point(x=1, y=1), {"k": (1, 2)}]
    assert calls == {"a": 1, "b": 1}
    assert measured[0][0] == 1  # executing b committed its checkpoint
    assert measured[1] == (0, 0), "replaying a completed step touched the database"


# -- R2 ------------------------------------------------------------------------------------------


async def test_r2_changed_step_input_raises_mismatch_before_anything_runs_or_is_written(
    tide: Tidebase,
) -> None:
    """R2: a recorded step invoked with another input raises StepInputMismatch carrying both
    hashes; its fn is not called, nothing after it runs, and nothing about it is written."""
    calls = Calls()
    inputs = {"fetch": {"url": "https://a.example"}, "charge": {"amount": 5}}

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("fetch", calls.fn("fetch", "page"), input=inputs["fetch"])
        await run.step(
            "charge",
            calls.fn("charge", "ok"),
            input=inputs["charge"],
            side_effects=["payments"],
            idempotency_key="charge-1",
        )
        await run.step("after", calls.fn("after", 1))
        raise Interrupt

    with pytest.raises(Interrupt):
        await tide.run("r2", pipeline, run_id="r2")
    rows_before = await steps_of(tide, "r2")
    events_before = await tide.store.get_events("r2")
    assert calls == {"fetch": 1, "charge": 1, "after": 1}

    # The side-effecting step changes: no intent record, no execution.
    old, inputs["charge"] = inputs["charge"], {"amount": 6}
    with pytest.raises(StepInputMismatch) as info:
        await tide.run("r2", pipeline, run_id="r2")
    exc = info.value
    assert exc.step == "charge"
    assert exc.run_id == "r2"
    assert exc.recorded_hash == sdk_hash(old)
    assert exc.new_hash == sdk_hash({"amount": 6})
    assert exc.recorded_hash[:16] in str(exc)
    assert exc.new_hash[:16] in str(exc)
    assert calls == {"fetch": 1, "charge": 1, "after": 1}
    assert await steps_of(tide, "r2") == rows_before
    new_events = (await tide.store.get_events("r2"))[len(events_before) :]
    assert [e.step for e in new_events if e.step is not None] == []
    assert {e.kind for e in new_events} <= {"run_resumed", "run_interrupted"}

    # The first step changes: the run stops there.
    inputs["charge"] = old
    inputs["fetch"] = {"url": "https://b.example"}
    with pytest.raises(StepInputMismatch) as info:
        await tide.run("r2", pipeline, run_id="r2")
    assert info.value.step == "fetch"
    assert info.value.recorded_hash == sdk_hash({"url": "https://a.example"})
    assert info.value.new_hash == sdk_hash({"url": "https://b.example"})
    assert calls == {"fetch": 1, "charge": 1, "after": 1}
    assert await steps_of(tide, "r2") == rows_before


# -- R3 ------------------------------------------------------------------------------------------


def flaky(calls: Calls, name: str, failures: int, value: Any = "ok") -> Callable[[], Any]:
    """A step fn that raises ``failures`` times, then returns ``value``."""

    def call() -> Any:
        calls[name] += 1
        if calls[name] <= failures:
            raise ValueError(f"{name} failure #{calls[name]}")
        return value

    return call


async def test_r3_retries_in_process_until_success_and_records_attempts(tide: Tidebase) -> None:
    """R3: with retries left, a failing step is retried in process; attempts are recorded."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        return await run.step("flaky", flaky(calls, "flaky", 2, "third time"), retries=2)

    assert await tide.run("r3", pipeline, run_id="r3-retry") == "third time"
    assert calls["flaky"] == 3
    rec = (await steps_of(tide, "r3-retry"))["flaky"]
    assert rec.status == "completed"
    assert rec.attempts == 3
    assert (await tide.get_run("r3-retry")).status == "completed"


@pytest.mark.parametrize(
    ("options", "step_status", "run_status"),
    [
        pytest.param({"replay": "manual"}, "manual_review", "manual_review", id="manual"),
        pytest.param(
            {"side_effects": ["email"]}, "manual_review", "manual_review", id="unkeyed-effect"
        ),
        pytest.param(
            {"side_effects": ["email"], "idempotency_key": "mail-1"},
            "failed_retryable",
            "failed_retryable",
            id="keyed-effect",
        ),
        pytest.param({"replay": "never"}, "failed", "failed", id="never"),
        pytest.param({}, "failed_retryable", "failed_retryable", id="default"),
    ],
)
async def test_r3_final_failure_classification(
    tide: Tidebase, options: dict[str, Any], step_status: str, run_status: str
) -> None:
    """R3: after its retries, a failing step is manual_review (replay="manual" or an unkeyed
    external write), failed (replay="never"), else failed_retryable."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        return await run.step("s", flaky(calls, "s", 99), retries=1, **options)

    with pytest.raises(ValueError, match="s failure #2"):
        await tide.run("r3", pipeline, run_id="r3")
    assert calls["s"] == 2
    rec = (await steps_of(tide, "r3"))["s"]
    assert rec.status == step_status
    assert rec.attempts == 2
    assert "s failure #2" in rec.error["message"]
    assert (await tide.get_run("r3")).status == run_status


async def test_r3_replay_never_fails_the_run_for_good(tide: Tidebase) -> None:
    """R3: replay="never" fails the run; re-invoking it raises RunFailed and calls nothing."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        calls["body"] += 1
        await run.step("first", calls.fn("first", 1))
        return await run.step("s", flaky(calls, "s", 99), replay="never")

    with pytest.raises(ValueError):
        await tide.run("r3n", pipeline, run_id="r3n")
    assert (await tide.get_run("r3n")).status == "failed"
    with pytest.raises(RunFailed):
        await tide.run("r3n", pipeline, run_id="r3n")
    assert calls == {"body": 1, "first": 1, "s": 1}
    assert (await tide.get_run("r3n")).status == "failed"


async def test_r3_failed_retryable_step_runs_again_on_next_invocation(tide: Tidebase) -> None:
    """R3: by default a finally failing step is failed_retryable and runs again next time."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("first", calls.fn("first", 1))
        return await run.step("s", flaky(calls, "s", 1, "second try"))

    with pytest.raises(ValueError):
        await tide.run("r3d", pipeline, run_id="r3d")
    assert (await steps_of(tide, "r3d"))["s"].status == "failed_retryable"
    assert await tide.run("r3d", pipeline, run_id="r3d") == "second try"
    assert calls == {"first": 1, "s": 2}
    rec = (await steps_of(tide, "r3d"))["s"]
    assert rec.status == "completed"
    assert rec.attempts == 2


# -- R4 ------------------------------------------------------------------------------------------


def park(calls: Calls, behaviour: dict[str, Any]) -> Any:
    """A pipeline whose step "ask" parks in manual_review on its first execution."""

    async def pipeline(run: Any, inp: Any) -> Any:
        calls["body"] += 1
        a = await run.step("before", calls.fn("before", "b"))

        def ask() -> Any:
            calls["ask"] += 1
            if behaviour.get("fail", True):
                raise ValueError("needs a human")
            return behaviour["value"]

        answer = await run.step("ask", ask, replay="manual")
        c = await run.step("after", calls.fn("after", "c"))
        return [a, answer, c]

    return pipeline


async def test_r4_manual_review_blocks_until_retry(tide: Tidebase) -> None:
    """R4: a manual_review step raises StepNeedsReview without executing; "retry" re-runs it."""
    calls = Calls()
    behaviour: dict[str, Any] = {"fail": True}
    pipeline = park(calls, behaviour)
    with pytest.raises(ValueError):
        await tide.run("r4", pipeline, run_id="r4")
    assert calls == {"body": 1, "before": 1, "ask": 1}

    for _ in range(2):
        with pytest.raises(StepNeedsReview) as info:
            await tide.run("r4", pipeline, run_id="r4")
        assert info.value.step == "ask"
        assert (await tide.get_run("r4")).status == "manual_review"
    assert calls == {"body": 3, "before": 1, "ask": 1}

    rec = await tide.review_step("r4", "ask", "retry")
    assert rec.status == "failed_retryable"
    behaviour.update(fail=False, value="human said yes")
    assert await tide.run("r4", pipeline, run_id="r4") == ["b", "human said yes", "c"]
    assert calls == {"body": 4, "before": 1, "ask": 2, "after": 1}
    assert (await tide.get_run("r4")).status == "completed"
    assert "step_review_retry" in await event_kinds(tide, "r4")


async def test_r4_review_output_supplies_the_step_result_without_calling_it(
    tide: Tidebase,
) -> None:
    """R4: "output" completes the step with the operator's (typed) value; fn is never called."""
    calls = Calls()
    pipeline = park(calls, {"fail": True})
    with pytest.raises(ValueError):
        await tide.run("r4o", pipeline, run_id="r4o")
    supplied = Point(x=7, y=8, tags=["operator"])
    rec = await tide.review_step("r4o", "ask", "output", supplied)
    assert rec.status == "completed"
    result = await tide.run("r4o", pipeline, run_id="r4o")
    assert result == ["b", supplied, "c"]
    assert type(result[1]) is Point
    assert calls == {"body": 2, "before": 1, "ask": 1, "after": 1}
    assert (await tide.get_run("r4o")).status == "completed"


async def test_r4_review_fail_fails_the_run(tide: Tidebase) -> None:
    """R4: "fail" fails the run: re-invocation raises RunFailed and executes nothing."""
    calls = Calls()
    pipeline = park(calls, {"fail": True})
    with pytest.raises(ValueError):
        await tide.run("r4f", pipeline, run_id="r4f")
    rec = await tide.review_step("r4f", "ask", "fail")
    assert rec.status == "failed"
    assert (await tide.get_run("r4f")).status == "failed"
    with pytest.raises(RunFailed):
        await tide.run("r4f", pipeline, run_id="r4f")
    assert calls == {"body": 1, "before": 1, "ask": 1}


# -- R7 ------------------------------------------------------------------------------------------


def test_r7_completed_run_returns_recorded_result_without_calling_the_body(db_url: str) -> None:
    """R7: re-invoking a completed run (new instance, new loop) returns its recorded, typed
    result; the body is not called and nothing is written."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        calls["body"] += 1
        p = await run.step("p", calls.fn("p", Point(x=1, y=2)))
        return {"p": p, "t": (1, 2), "topic": inp["topic"]}

    async def invoke() -> tuple[Any, Any, int]:
        tide = Tidebase(db_url)
        try:
            result = await tide.run("r7", pipeline, run_id="r7", input={"topic": "x"})
            run = await tide.get_run("r7")
            return result, run, len(await tide.store.get_events("r7"))
        finally:
            await tide.close()

    first, run1, events1 = asyncio.run(invoke())
    second, run2, events2 = asyncio.run(invoke())
    assert first == second == {"p": Point(x=1, y=2), "t": (1, 2), "topic": "x"}
    assert type(second["p"]) is Point
    assert type(second["t"]) is tuple
    assert calls == {"body": 1, "p": 1}
    assert run2.status == "completed"
    assert (run2.attempts, run2.event_seq, events2) == (run1.attempts, run1.event_seq, events1)


# -- R8 and the write budget ---------------------------------------------------------------------


async def test_r8_resume_cost_is_independent_of_the_number_of_checkpoints(tide: Tidebase) -> None:
    """R8: resuming loads every checkpoint in one query: replaying 20 or 200 completed steps
    costs the same statements and write transactions, one statement reading tidebase_steps."""
    calls = Calls()
    interrupt = {20: True, 200: True}

    def pipeline_of(n: int) -> Any:
        async def pipeline(run: Any, inp: Any) -> int:
            for i in range(n):
                await run.step(f"s{i}", calls.fn("step", i))
            if interrupt[n]:
                raise Interrupt
            return n

        return pipeline

    for n in (20, 200):
        with pytest.raises(Interrupt):
            await tide.run(f"r8-{n}", pipeline_of(n), run_id=f"r8-{n}")
        interrupt[n] = False
    assert calls["step"] == 220

    sent: dict[int, list[str]] = {}
    written: dict[int, int] = {}
    async with Writes(tide) as writes:
        for n in (20, 200):
            before = await writes.count()
            with Statements(tide) as statements:
                assert await tide.run(f"r8-{n}", pipeline_of(n), run_id=f"r8-{n}") == n
            written[n] = await writes.count() - before
            sent[n] = statements.sent
    assert calls["step"] == 220, "a replayed step was executed"
    assert len(sent[20]) == len(sent[200]), (sent[20], sent[200])
    assert written[20] == written[200] <= 3, written  # acquire, finish (and nothing per step)
    for n in (20, 200):
        step_reads = [s for s in sent[n] if re.search(r"FROM (\w+\.)?tidebase_steps", s)]
        assert len(step_reads) == 1, step_reads


async def test_write_budget_one_commit_per_step_two_with_side_effects(tide: Tidebase) -> None:
    """Write budget: executing a step without side effects costs exactly one committed write
    transaction, with side effects exactly two (intent, then completion); replaying costs none."""
    measured: list[dict[str, int]] = []

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("warm-up", lambda: 0)
        out: dict[str, int] = {}
        async with Writes(tide) as writes:
            for name, kwargs in (
                ("plain", {}),
                ("effect", {"side_effects": ["api"]}),
                ("keyed-effect", {"side_effects": ["api"], "idempotency_key": "k1"}),
            ):
                before = await writes.count()
                await run.step(name, lambda: {"v": 1}, input={"n": name}, **kwargs)
                out[name] = await writes.count() - before
        measured.append(out)
        if len(measured) == 1:
            raise Interrupt
        return "ok"

    with pytest.raises(Interrupt):
        await tide.run("budget", pipeline, run_id="budget")
    assert measured[0] == {"plain": 1, "effect": 2, "keyed-effect": 2}
    assert await tide.run("budget", pipeline, run_id="budget") == "ok"
    assert measured[1] == {"plain": 0, "effect": 0, "keyed-effect": 0}


# -- R9 ------------------------------------------------------------------------------------------


async def test_r9_usage_records_are_deduplicated_by_position_on_replay(tide: Tidebase) -> None:
    """R9: a replayed pipeline calling usage_record again adds no rows; a new call does."""
    invocations = [0]

    async def pipeline(run: Any, inp: Any) -> str:
        invocations[0] += 1
        await run.usage_record(provider="openai", model="m1", input_tokens=10, output_tokens=5)
        await run.step("s", lambda: "x")
        await run.usage_record(provider="openai", model="m2", input_tokens=20, output_tokens=7)
        if invocations[0] == 3:
            await run.usage_record(model="m3", input_tokens=1, output_tokens=1)
        if invocations[0] < 3:
            raise Interrupt
        return "ok"

    with pytest.raises(Interrupt):
        await tide.run("r9", pipeline, run_id="r9")
    first = await tide.store.get_usage("r9")
    assert [(u.model, u.input_tokens, u.output_tokens, u.total_tokens) for u in first] == [
        ("m1", 10, 5, 15),
        ("m2", 20, 7, 27),
    ]
    with pytest.raises(Interrupt):
        await tide.run("r9", pipeline, run_id="r9")
    assert await tide.store.get_usage("r9") == first
    assert await tide.run("r9", pipeline, run_id="r9") == "ok"
    after = await tide.store.get_usage("r9")
    assert after[:2] == first
    assert [u.model for u in after] == ["m1", "m2", "m3"]


# -- R10 -----------------------------------------------------------------------------------------


async def test_r10_state_versions_are_monotonic_merge_patched_and_not_duplicated(
    tide: Tidebase,
) -> None:
    """R10: state_set / state_patch append versions 1, 2, 3...; patches follow JSON merge patch
    (RFC 7386); a replay writes no version; after it, new versions continue from the latest."""
    invocations = [0]
    returned: list[list[int]] = []

    async def pipeline(run: Any, inp: Any) -> Any:
        invocations[0] += 1
        versions = [
            await run.state_set({"phase": "a", "n": 1, "extra": {"x": 1}}),
            await run.state_patch({"n": 2, "extra": {"y": 2}}),
            await run.state_patch({"phase": None, "list": [1, 2]}),
        ]
        await run.step("s", lambda: 1)
        if invocations[0] == 2:
            versions.append(await run.state_patch({"extra": {"x": None}, "done": True}))
        returned.append(versions)
        if invocations[0] == 1:
            raise Interrupt
        return await run.state()

    with pytest.raises(Interrupt):
        await tide.run("r10", pipeline, run_id="r10")
    v1 = {"phase": "a", "n": 1, "extra": {"x": 1}}
    v2 = {"phase": "a", "n": 2, "extra": {"x": 1, "y": 2}}
    v3 = {"n": 2, "extra": {"x": 1, "y": 2}, "list": [1, 2]}
    v4 = {"n": 2, "extra": {"y": 2}, "list": [1, 2], "done": True}
    assert _versions(await tide.state_versions("r10")) == [(1, v1), (2, v2), (3, v3)]
    assert returned == [[1, 2, 3]]

    assert await tide.run("r10", pipeline, run_id="r10") == v4
    assert returned[1] == [1, 2, 3, 4]
    assert _versions(await tide.state_versions("r10")) == [(1, v1), (2, v2), (3, v3), (4, v4)]
    assert (await tide.get_run("r10")).state_version == 4
    kinds = await event_kinds(tide, "r10")
    assert kinds.count("state_set") == 4


async def test_r10_concurrent_state_sets_get_distinct_versions_and_replay_cleanly(
    tide: Tidebase,
) -> None:
    """R10: concurrent state_set calls get versions 1..N; a replay of them writes nothing."""
    invocations = [0]

    async def pipeline(run: Any, inp: Any) -> Any:
        invocations[0] += 1
        versions = await asyncio.gather(*(run.state_set({"i": i}) for i in range(12)))
        if invocations[0] == 1:
            raise Interrupt
        return sorted(versions)

    with pytest.raises(Interrupt):
        await tide.run("r10c", pipeline, run_id="r10c")
    state = _versions(await tide.state_versions("r10c"))
    assert [v for v, _ in state] == list(range(1, 13))
    assert await tide.run("r10c", pipeline, run_id="r10c") == list(range(1, 13))
    assert _versions(await tide.state_versions("r10c")) == state
    assert (await tide.get_run("r10c")).state_version == 12


# -- R12 -----------------------------------------------------------------------------------------


async def test_r12_cancel_between_steps_stops_the_run_before_its_next_step(
    tide: Tidebase,
) -> None:
    """R12: cancelled from outside between two steps, the executor raises RunCancelled at the
    next step boundary: the next step's fn never runs; re-invocation raises RunCancelled."""
    calls = Calls()
    gate = asyncio.Event()
    reached = asyncio.Event()

    async def pipeline(run: Any, inp: Any) -> Any:
        calls["body"] += 1
        await run.step("one", calls.fn("one", 1))
        reached.set()
        await gate.wait()
        await run.step("two", calls.fn("two", 2))
        return "done"

    task = asyncio.create_task(tide.run("r12", pipeline, run_id="r12"))
    await asyncio.wait_for(reached.wait(), 30)
    other = Tidebase(tide.database_url)
    assert await other.cancel("r12", reason="operator") == "cancelled"
    gate.set()
    with pytest.raises(RunCancelled):
        await task
    assert calls == {"body": 1, "one": 1}, "a step started after cancellation ran"
    assert set(await steps_of(tide, "r12")) == {"one"}
    assert (await tide.get_run("r12")).status == "cancelled"
    with pytest.raises(RunCancelled):
        await tide.run("r12", pipeline, run_id="r12")
    assert calls == {"body": 1, "one": 1}
    assert (await tide.get_run("r12")).status == "cancelled"


async def test_r12_cancel_during_a_step_refuses_its_late_completion(tide: Tidebase) -> None:
    """R12: a step that finishes after its run was cancelled does not land; later steps never
    run; the run stays cancelled (never resurrected) and re-invocation raises RunCancelled."""
    calls = Calls()
    gate = asyncio.Event()
    inside = asyncio.Event()

    async def slow() -> str:
        calls["slow"] += 1
        inside.set()
        await gate.wait()
        return "late"

    async def pipeline(run: Any, inp: Any) -> Any:
        calls["body"] += 1
        await run.step("one", calls.fn("one", 1))
        await run.step("slow", slow)
        await run.step("three", calls.fn("three", 3))
        return "done"

    task = asyncio.create_task(tide.run("r12b", pipeline, run_id="r12b"))
    await asyncio.wait_for(inside.wait(), 30)
    assert await tide.cancel("r12b") == "cancelled"
    gate.set()
    with pytest.raises(RunCancelled):
        await task
    assert calls == {"body": 1, "one": 1, "slow": 1}
    steps = await steps_of(tide, "r12b")
    assert "three" not in steps
    assert "slow" not in steps or steps["slow"].status != "completed"
    run = await tide.get_run("r12b")
    assert run.status == "cancelled"
    assert run.output is None
    kinds = await event_kinds(tide, "r12b")
    assert kinds[-1] == "run_cancelled"
    assert "run_completed" not in kinds
    with pytest.raises(RunCancelled):
        await tide.run("r12b", pipeline, run_id="r12b")
    assert await tide.cancel("r12b") == "cancelled"
    assert calls == {"body": 1, "one": 1, "slow": 1}
    assert await event_kinds(tide, "r12b") == kinds


async def test_r12_cancelling_a_completed_run_changes_nothing(tide: Tidebase) -> None:
    """R12: cancellation is one-way and only for runs that have not ended."""

    async def pipeline(run: Any, inp: Any) -> Any:
        return await run.step("s", lambda: 1)

    assert await tide.run("r12c", pipeline, run_id="r12c") == 1
    assert await tide.cancel("r12c") == "completed"
    assert (await tide.get_run("r12c")).status == "completed"
    assert await tide.run("r12c", pipeline, run_id="r12c") == 1


# -- R13 (bad values; database errors are in test_storage.py) ------------------------------------


async def test_r13_unserializable_output_keeps_earlier_checkpoints_and_run_resumes(
    tide: Tidebase,
) -> None:
    """R13: an unserializable step output raises CheckpointSerializationError; the checkpoints
    committed before are intact and the run resumes once the step is fixed."""
    calls = Calls()
    produce: dict[str, Any] = {"value": {"a": {"b": [1, 2, object()]}}}

    async def pipeline(run: Any, inp: Any) -> Any:
        good = await run.step("good", calls.fn("good", Point(x=1, y=1)))

        def bad() -> Any:
            calls["bad"] += 1
            return produce["value"]

        return [good, await run.step("bad", bad)]

    with pytest.raises(CheckpointSerializationError) as info:
        await tide.run("r13", pipeline, run_id="r13")
    assert "$.a.b[2]" in str(info.value)
    assert "'bad'" in str(info.value), "the error should name the step"
    steps = await steps_of(tide, "r13")
    assert steps["good"].status == "completed"
    assert steps["bad"].status != "completed"
    assert (await tide.get_run("r13")).status == "failed_retryable"

    produce["value"] = {"a": {"b": [1, 2, 3]}}
    assert await tide.run("r13", pipeline, run_id="r13") == [
        Point(x=1, y=1),
        {"a": {"b": [1, 2, 3]}},
    ]
    assert calls == {"good": 1, "bad": 2}


async def test_r13_unsupported_step_input_names_step_and_path_and_writes_nothing(
    tide: Tidebase,
) -> None:
    """R13/I5: an input with no canonical form fails before the step runs, naming the step and
    the path of the offending value; nothing is recorded for the step."""
    calls = Calls()

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("ok", calls.fn("ok", 1))
        return await run.step("bad-input", calls.fn("bad", 2), input={"a": {"b": [1, 2, object()]}})

    with pytest.raises(CheckpointSerializationError) as info:
        await tide.run("r13i", pipeline, run_id="r13i")
    assert "$.a.b[2]" in str(info.value)
    assert "bad-input" in str(info.value)
    assert calls == {"ok": 1}
    assert set(await steps_of(tide, "r13i")) == {"ok"}


async def test_r13_oversized_step_output_and_result_raise_payload_too_large(db_url: str) -> None:
    """R13: a step output or a pipeline result over max_payload_bytes raises PayloadTooLarge;
    earlier checkpoints stay."""
    tide = Tidebase(db_url, max_payload_bytes=200)
    big = "x" * 1000
    try:

        async def big_step(run: Any, inp: Any) -> Any:
            await run.step("small", lambda: "ok")
            return await run.step("big", lambda: big)

        with pytest.raises(PayloadTooLarge):
            await tide.run("big", big_step, run_id="big-step")
        steps = await steps_of(tide, "big-step")
        assert steps["small"].status == "completed"
        assert steps["big"].status != "completed"

        async def big_result(run: Any, inp: Any) -> Any:
            await run.step("small", lambda: "ok")
            return big

        with pytest.raises(PayloadTooLarge):
            await tide.run("big", big_result, run_id="big-result")
        assert (await tide.get_run("big-result")).status != "completed"
        assert (await steps_of(tide, "big-result"))["small"].status == "completed"
    finally:
        await tide.close()


async def test_r13_oversized_state_and_pipeline_input_raise_payload_too_large(db_url: str) -> None:
    """R13: a state value or a pipeline input over max_payload_bytes raises PayloadTooLarge
    (like step outputs and results) instead of being stored."""
    tide = Tidebase(db_url, max_payload_bytes=200)
    big = "x" * 1000
    try:

        async def big_state(run: Any, inp: Any) -> Any:
            await run.state_set({"v": big})
            return "ok"

        with pytest.raises(PayloadTooLarge):
            await tide.run("big", big_state, run_id="big-state")
        assert _versions(await tide.state_versions("big-state")) == []

        async def noop(run: Any, inp: Any) -> Any:
            return "ok"

        with pytest.raises(PayloadTooLarge):
            await tide.run("big", noop, run_id="big-input", input={"v": big})
    finally:
        await tide.close()


# -- I4, I5 --------------------------------------------------------------------------------------


async def test_i4_explicit_idempotency_keys_are_recorded(tide: Tidebase) -> None:
    """I4: an explicit idempotency key is recorded with its step and marks it keyed."""

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("t", lambda: 1, side_effects=["tickets"], idempotency_key="ticket-r-42")
        await run.step("u", lambda: 2, side_effects=["tickets"])
        return "ok"

    await tide.run("i4", pipeline, run_id="i4")
    steps = await steps_of(tide, "i4")
    assert (steps["t"].idempotency_key, steps["t"].keyed) == ("ticket-r-42", True)
    assert steps["t"].side_effects == ["tickets"]
    assert steps["u"].keyed is False
    assert steps["u"].idempotency_key  # a derived key is recorded too


async def test_i4_derived_keys_are_stable_across_processes_and_databases(
    db_url: str, tmp_path: Any
) -> None:
    """I4: the derived key of an unkeyed side-effecting step is a function of run id and step
    name only: a child process on this database and this process on another database record
    the same key for the same run id and step; another run id or step name gets another key."""
    child = await run_scenario("derived_key", url=db_url, run_id="same-run", step="send")
    assert child.outcome == "ok", child.stderr
    assert child.report["keyed"] is False

    tide = Tidebase(f"sqlite:///{tmp_path / 'other.db'}")
    try:

        def pipeline(step: str) -> Any:
            async def body(run: Any, inp: Any) -> Any:
                return await run.step(step, lambda: "ok", side_effects=["mail"])

            return body

        keys = {}
        for run_id, step in (("same-run", "send"), ("other-run", "send"), ("same-run2", "x")):
            await tide.run("keys", pipeline(step), run_id=run_id)
            keys[run_id] = (await steps_of(tide, run_id))[step].idempotency_key
    finally:
        await tide.close()
    assert keys["same-run"] == child.report["key"]
    assert len(set(keys.values())) == 3


async def test_i5_recorded_input_hash_is_the_sdk_hash_of_plain_json(tide: Tidebase) -> None:
    """I5: a step's input hash is SHA-256 of canonical JSON (sorted keys, compact, UTF-8)."""
    plain = {"zeta": [1, 2.5, None, True], "alpha": {"é": "ü", "n": -3}, "s": "日本"}

    @dataclasses.dataclass
    class Query:
        topic: str
        limit: int

    typed = {
        "q": Query("t", 3),
        "p": Point(x=1, y=2),
        "c": Color.RED,
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "raw": b"\x00\xff",
        "tags": {"b", "a", "c"},
        "pair": (1, 2),
    }
    typed_canonical = {
        "q": {"topic": "t", "limit": 3},
        "p": {"x": 1, "y": 2, "tags": []},
        "c": "red",
        "when": "2024-01-02T03:04:05+00:00",
        "raw": "AP8=",
        "tags": ["a", "b", "c"],
        "pair": [1, 2],
    }

    async def pipeline(run: Any, inp: Any) -> Any:
        await run.step("plain", lambda: 1, input=plain)
        await run.step("typed", lambda: 2, input=typed)
        return "ok"

    await tide.run("i5", pipeline, run_id="i5")
    steps = await steps_of(tide, "i5")
    assert steps["plain"].input_hash == sdk_hash(plain)
    assert steps["typed"].input_hash == sdk_hash(typed_canonical)
