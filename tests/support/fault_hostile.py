"""Helpers of the hostile-input tests: raw tampering, a prior run that must survive, outcomes.

Tampering goes around the library on purpose, with the backend's own driver: it writes what an
attacker (or a broken disk) could leave in the checkpoint tables.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from fault_report import Checks

from tidebase_agents import Run, Tidebase, TidebaseError

PRIOR_RUN = "prior-run"
PRIOR_RESULT = {"total": 3, "words": ["durable", "agents"]}


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def execute_sql(url: str, statement: str, *params: Any) -> None:
    """Run one statement on the test database, bypassing the library (``?`` placeholders)."""
    if backend_of(url) == "sqlite":
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            db.execute(statement, params)
            db.commit()
        return
    import asyncpg

    numbered = statement
    for i in range(1, len(params) + 1):
        numbered = numbered.replace("?", f"${i}", 1)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(numbered, *params)
    finally:
        await conn.close()


async def set_json(url: str, table: str, column: str, json_text: str, **where: str) -> None:
    """Overwrite a JSON column of the rows matching ``where`` with ``json_text``."""
    sqlite = backend_of(url) == "sqlite"
    cast = "" if sqlite else "::jsonb"
    qualified = table if sqlite else f"tidebase.{table}"  # the library's own schema
    condition = " AND ".join(f"{k} = ?" for k in where)
    await execute_sql(
        url,
        f"UPDATE {qualified} SET {column} = ?{cast} WHERE {condition}",
        json_text,
        *where.values(),
    )


async def _prior_body(run: Run, words: list[str]) -> dict[str, Any]:
    count = await run.step("count", lambda: len(words) + 1)
    await run.state_set({"counted": count})
    await run.usage_record(model="gpt-4o-mini", input_tokens=5, output_tokens=2)
    return {"total": count, "words": words}


async def make_prior_run(tide: Tidebase) -> None:
    """A completed run that every hostile case must leave readable (R13); made once per
    database (re-invoking it returns its recorded result)."""
    result = await tide.run(
        "fault-prior", _prior_body, run_id=PRIOR_RUN, input=["durable", "agents"]
    )
    assert result == PRIOR_RESULT, result


async def check_prior_intact(tide: Tidebase, checks: Checks) -> None:
    """The prior run still reads back as committed, and re-invoking it returns its result."""

    async def never(run: Run, words: Any) -> Any:
        raise AssertionError("a completed run's body was called again")

    try:
        run = await tide.get_run(PRIOR_RUN)
        steps = await tide.steps(PRIOR_RUN)
        state = await tide.state_versions(PRIOR_RUN)
        usage = await tide.usage_records(PRIOR_RUN)
        again = await tide.run("fault-prior", never, run_id=PRIOR_RUN, input=["durable", "agents"])
    except Exception as exc:
        checks.check(False, "prior_run_lost", f"the prior run no longer reads back: {exc!r}")
        return
    checks.check(
        (run.status, run.output, again) == ("completed", PRIOR_RESULT, PRIOR_RESULT)
        and [(s.name, s.status, s.output) for s in steps] == [("count", "completed", 3)]
        and [v.value for v in state] == [{"counted": 3}]
        and [(u.model, u.input_tokens) for u in usage] == [("gpt-4o-mini", 5)],
        "prior_run_changed",
        f"prior run now {run.status} {run.output} {steps} {state} {usage}",
    )


class Outcome:
    """What awaiting a call did: its value, or the exception it raised."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    @property
    def name(self) -> str:
        return "ok" if self.error is None else type(self.error).__name__

    def describe(self) -> str:
        if self.error is None:
            return f"returned {self.value!r}"[:300]
        kind = type(self.error)
        return f"raised {kind.__module__}.{kind.__qualname__}: {str(self.error)[:300]}"


async def outcome(call: Callable[[], Awaitable[Any]]) -> Outcome:
    try:
        return Outcome(await call())
    except Exception as exc:
        return Outcome(error=exc)


def expect_library_error(
    checks: Checks,
    result: Outcome,
    what: str,
    expected: type[TidebaseError] = TidebaseError,
    *,
    names: tuple[str, ...] = (),
) -> None:
    """``result`` must be the library's own error (of ``expected``), naming ``names``."""
    if not checks.check(result.error is not None, "accepted", f"{what} {result.describe()}"):
        return
    if not checks.check(
        isinstance(result.error, TidebaseError), "foreign_error", f"{what} {result.describe()}"
    ):
        return
    checks.check(
        isinstance(result.error, expected),
        "wrong_error_type",
        f"{what} {result.describe()}; expected {expected.__name__}",
    )
    missing = [n for n in names if n not in str(result.error)]
    checks.check(not missing, "error_not_named", f"{what}: message lacks {missing}: {result.error}")
