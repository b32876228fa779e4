"""R15: when the library's own machinery fails inside a durable tool (a checkpoint write the
database refuses, an output that cannot be checkpointed), the agent run stops and the caller
gets the library's error; the model is never told to try again, and on resume a keyed tool
re-executes under the same key.

The database failure is real: a trigger makes the database refuse the tool's completion write
the way a full disk does (SQLSTATE 53100 on PostgreSQL, SQLITE_FULL's message on SQLite).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import agentkit_charge
import asyncpg
import pytest
from agentkit_common import ExternalApi, message, policy_model, tool_calls, tool_outputs
from agentkit_common import close_engines as close_engines
from agents import Agent, Runner, function_tool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tidebase_agents import (
    CheckpointSerializationError,
    DatabaseUnavailable,
    Tidebase,
    checkpointed_pipeline,
    durable_tool,
)

# The library's tables live in the schema tidebase, and its connections see only that schema.
PG_TRIGGER = [
    "CREATE TABLE public.tb_fault (armed boolean NOT NULL)",
    "INSERT INTO public.tb_fault VALUES (true)",
    """CREATE FUNCTION tb_fail() RETURNS trigger AS $$ BEGIN
         IF (SELECT armed FROM public.tb_fault) AND NEW.status = 'completed'
            AND NEW.name LIKE '%tool:charge%' THEN
           RAISE EXCEPTION 'could not extend file: No space left on device'
             USING ERRCODE = '53100';
         END IF;
         RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER tb_fail BEFORE INSERT OR UPDATE ON tidebase.tidebase_steps "
    "FOR EACH ROW EXECUTE FUNCTION public.tb_fail()",
]
SQLITE_TRIGGER = [
    "CREATE TABLE tb_fault (armed INTEGER NOT NULL)",
    "INSERT INTO tb_fault VALUES (1)",
    """CREATE TRIGGER tb_fail BEFORE UPDATE ON tidebase_steps
       WHEN (SELECT armed FROM tb_fault) = 1 AND NEW.status = 'completed'
            AND NEW.name LIKE '%tool:charge%'
       BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END""",
]


async def admin(url: str, *statements: str) -> None:
    if url.startswith("postgresql"):
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
        return
    engine = create_async_engine(url.replace("sqlite:///", "sqlite+aiosqlite:///"))
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def full_disk(db_url: str) -> Any:
    """Arm the fault; the test disarms it by calling the returned function."""
    if db_url.startswith("postgresql"):
        await admin(db_url, *PG_TRIGGER)
    else:
        await Tidebase(db_url).migrate()  # the embedded file gets its tables on first use
        await admin(db_url, *SQLITE_TRIGGER)

    async def disarm() -> None:
        await admin(
            db_url, "UPDATE tb_fault SET armed = " + ("false" if "postgres" in db_url else "0")
        )

    return disarm


async def test_r15_a_refused_checkpoint_write_stops_the_run_and_the_resume_charges_once(
    db_url: str, tmp_path: Path, full_disk: Any
) -> None:
    run_id = f"disk-{uuid.uuid4().hex[:8]}"
    pay, api, model = agentkit_charge.build(db_url, str(tmp_path / "faulted"), "name")
    (tmp_path / "faulted").mkdir()
    with pytest.raises(DatabaseUnavailable, match=r"full|No space"):
        await pay("ada", run_id=run_id)
    assert len(model.calls) == 1  # the model was not told to try again
    assert len(api.attempt_rows()) == 1
    await full_disk()
    output = await pay("ada", run_id=run_id)
    keys = {row["key"] for row in api.attempt_rows()}
    assert len(api.attempt_rows()) == 2 and len(keys) == 1  # re-executed under the same key
    assert len(api.write_rows()) == 1

    (tmp_path / "clean").mkdir()
    clean, clean_api, _ = agentkit_charge.build(db_url, str(tmp_path / "clean"), "name")
    assert output == await clean("ada", run_id=f"clean-{run_id}")
    assert len(clean_api.write_rows()) == 1


class Receipt:
    """Not JSON, not a dataclass: no checkpoint can hold it."""


def _respond(call: Any) -> Any:
    return message("done") if tool_outputs(call) else tool_calls(("issue_receipt", {"n": 1}))


@pytest.mark.parametrize("side_effects", [None, ["printer"]], ids=["plain", "side_effects"])
async def test_r15_an_output_that_cannot_be_checkpointed_reaches_the_caller_not_the_model(
    db_url: str, tmp_path: Path, side_effects: list[str] | None
) -> None:
    printed = ExternalApi(tmp_path)

    @function_tool
    @durable_tool(side_effects=side_effects)
    async def issue_receipt(n: int) -> Any:
        """Print a receipt."""
        printed.create(f"receipt {n}", None)
        return Receipt()

    model = policy_model(_respond)
    agent = Agent(name="clerk", model=model, tools=[issue_receipt])

    @checkpointed_pipeline(f"receipt-{uuid.uuid4().hex[:6]}", database_url=db_url)
    async def sell() -> str:
        return str((await Runner.run(agent, "sell")).final_output)

    with pytest.raises(CheckpointSerializationError, match="Receipt"):
        await sell()
    assert len(model.calls) == 1  # no "An error occurred... try again" turn
    assert len(printed.attempt_rows()) == 1
