"""Tampered checkpoints: reading one never constructs an unregistered type, never executes code,
and fails with ``CheckpointSerializationError`` (R13, R14); the CLI says so in one line.

The tampering is done with raw SQL, as an attacker with write access to the checkpoint tables
(or a broken disk) could: a codec tag naming ``subprocess:Popen`` or ``io:FileIO`` (both would
create a marker file if constructed) or an unregistered pydantic class, invalid JSON text in an
SQLite checkpoint, an agent checkpoint replaced by a string or another shape. Each case runs on
both backends (invalid JSON text only on SQLite: PostgreSQL's JSONB cannot hold it) and checks
that a prior run still reads back as committed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fault_apps
import pytest
from fault_hostile import (
    Outcome,
    check_prior_intact,
    execute_sql,
    expect_library_error,
    make_prior_run,
    outcome,
    set_json,
)
from fault_report import REPORT, Checks
from zygote import Zygote

from tidebase_agents import CheckpointSerializationError, Tidebase

pytestmark = pytest.mark.faults

TEXT = "hello"
#: Codec tags naming classes that must never be constructed from a checkpoint.
PAYLOADS: dict[str, Callable[[str], Any]] = {
    "enum_popen": lambda marker: {"$t": "enum", "cls": "subprocess:Popen", "v": ["touch", marker]},
    "dataclass_popen": lambda marker: {
        "$t": "dataclass",
        "cls": "subprocess:Popen",
        "v": {"args": ["touch", marker]},
    },
    "dataclass_fileio": lambda marker: {
        "$t": "dataclass",
        "cls": "io:FileIO",
        "v": {"file": marker, "mode": "w"},
    },
    "pydantic_popen": lambda marker: {
        "$t": "pydantic",
        "cls": "subprocess:Popen",
        "v": {"args": ["touch", marker]},
    },
    "pydantic_unregistered": lambda marker: {
        "$t": "pydantic",
        "cls": "pydantic:BaseModel",
        "v": {},
    },
    "nested_enum_popen": lambda marker: {
        "text": "hello",
        "n": [
            1,
            {
                "$t": "tuple",
                "v": [{"$t": "enum", "cls": "subprocess:Popen", "v": ["touch", marker]}],
            },
        ],
    },
}
#: Agent checkpoints replaced by something that is valid JSON but not a checkpoint.
AGENT_SHAPES = {
    "string": '"just a string"',
    "number": "42",
    "list": "[1, 2]",
    "empty_object": "{}",
    "codec_only": '{"codec": 1}',
    "state_string": '{"codec": 1, "sdk": "0.24.0", "input": "hello", "state": "garbage", '
    '"final_output": {"kind": "text", "value": "x"}, "replay_from_model_input_items": false}',
}
#: Invalid JSON text written into an SQLite JSON column.
BROKEN_JSON = '{"text": "hel'


@pytest.fixture
def run_id() -> str:
    return f"tampered-{uuid.uuid4().hex[:10]}"


async def interrupted_run(url: str, run_id: str) -> Any:
    """Run ``fault-hostile`` once: its steps are committed, the run is failed_retryable."""
    pipeline = fault_apps.make(url)
    first = await outcome(lambda: pipeline(TEXT, run_id=run_id))
    assert isinstance(first.error, fault_apps.Interrupted), first.describe()
    return pipeline


async def completed_run(url: str, run_id: str) -> Any:
    pipeline = await interrupted_run(url, run_id)
    assert (await pipeline(TEXT, run_id=run_id))["echo"] == f"echo: {TEXT}"
    return pipeline


async def run_cli(zygote: Zygote, tmp_path: Path, url: str, *argv: str) -> tuple[int | None, str]:
    child = zygote.spawn(
        "fault_apps:cli", {"argv": ["--database-url", url, *argv]}, tmp_path / "cli", argv[1]
    )
    status = await child.wait(120)
    if status is None:
        return None, await child.stop()
    return status, child.stderr


def check_cli(
    checks: Checks, what: str, status: int | None, stderr: str, *, must_fail: bool
) -> None:
    """The CLI's contract: exit 0, or exit 1 with one line on stderr and no traceback."""
    line = stderr.strip()
    if not checks.check(status is not None, "hang", f"{what} did not exit: {stderr[-2000:]}"):
        return
    checks.check(
        "Traceback" not in stderr and "\n" not in line,
        "cli_traceback",
        f"{what} exited {status} with {stderr[-1500:]!r}",
    )
    if must_fail:
        checks.check(
            status == 1 and line.startswith("error:"),
            "cli_not_one_line_error",
            f"{what} exited {status}: {line[:300]!r}",
        )
    else:
        checks.check(status in (0, 1), "cli_bad_exit", f"{what} exited {status}: {line[:300]!r}")


async def check_not_executed(checks: Checks, marker: Path, payload: str, what: str) -> None:
    if "popen" in payload:
        # A process started by a decoded Popen may take a moment to create the marker.
        await asyncio.sleep(0.2)
    checks.check(not marker.exists(), "code_executed", f"{what} created {marker.name}")


@pytest.mark.parametrize("entry", ["resume", "completed", "cli_show", "cli_resume"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
async def test_tampered_class_tag_is_never_constructed(
    shared_url: str,
    tide: Tidebase,
    run_id: str,
    zygote: Zygote,
    tmp_path: Path,
    payload: str,
    entry: str,
) -> None:
    marker = tmp_path / "pwned"
    tampered = json.dumps(PAYLOADS[payload](str(marker)))
    checks = Checks("hostile", f"tampered {payload} via {entry} on {shared_url.split(':')[0]}")
    REPORT.hostile_inputs[f"tampered_class:{payload}"] += 1
    if entry in ("resume", "cli_resume"):
        pipeline = await interrupted_run(shared_url, run_id)
    else:
        pipeline = await completed_run(shared_url, run_id)
        await set_json(shared_url, "tidebase_runs", "output", tampered, run_id=run_id)
    await set_json(shared_url, "tidebase_steps", "output", tampered, run_id=run_id, name="first")
    if entry in ("resume", "completed"):
        result = await outcome(lambda: pipeline(TEXT, run_id=run_id))
        expect_library_error(checks, result, entry, CheckpointSerializationError)
    else:
        command = ["runs", "show", run_id]
        if entry == "cli_resume":
            command = ["runs", "resume", run_id, "--app", "fault_apps:hostile"]
        status, stderr = await run_cli(zygote, tmp_path, shared_url, *command)
        check_cli(checks, " ".join(command), status, stderr, must_fail=entry == "cli_resume")
    await check_prior_intact(tide, checks)
    await check_not_executed(checks, marker, payload, entry)
    checks.done()


@pytest.mark.parametrize("shape", sorted(AGENT_SHAPES))
async def test_agent_checkpoint_replaced(
    shared_url: str, tide: Tidebase, run_id: str, shape: str
) -> None:
    where = f"agent checkpoint replaced by {shape} on {shared_url.split(':')[0]}"
    checks = Checks("hostile", where)
    REPORT.hostile_inputs[f"agent_checkpoint:{shape}"] += 1
    pipeline = await interrupted_run(shared_url, run_id)
    await set_json(
        shared_url,
        "tidebase_steps",
        "output",
        AGENT_SHAPES[shape],
        run_id=run_id,
        name="agent:echo#1",
    )
    result = await outcome(lambda: pipeline(TEXT, run_id=run_id))
    expect_library_error(checks, result, "resume", CheckpointSerializationError)
    steps = await outcome(lambda: tide.steps(run_id))
    checks.check(steps.error is None, "steps_unreadable", f"steps() {steps.describe()}")
    await check_prior_intact(tide, checks)
    checks.done()


#: (table, column, row) of an SQLite checkpoint column, and how each is read.
JSON_COLUMNS: dict[str, tuple[str, str, dict[str, str], tuple[str, ...]]] = {
    "step_output": ("tidebase_steps", "output", {"name": "first"}, ("resume", "steps", "cli")),
    "step_input_parts": (
        "tidebase_steps",
        "input_parts",
        {"name": "agent:echo#1"},
        ("resume", "steps", "cli"),
    ),
    "run_input": ("tidebase_runs", "input", {}, ("resume", "get_run", "cli")),
    "run_output": ("tidebase_runs", "output", {}, ("completed", "get_run", "cli")),
    "state_value": ("tidebase_state", "value", {}, ("resume", "state_versions")),
    "event_data": ("tidebase_events", "data", {"seq": "1"}, ("events", "cli")),
}
JSON_CASES = [(column, entry) for column, spec in JSON_COLUMNS.items() for entry in spec[3]]


@pytest.mark.parametrize(("column", "entry"), JSON_CASES)
async def test_invalid_json_text_in_sqlite_checkpoint(
    tmp_path: Path, zygote: Zygote, run_id: str, column: str, entry: str
) -> None:
    url = f"sqlite:///{tmp_path / 'tidebase.db'}"
    tide = Tidebase(url)
    await make_prior_run(tide)
    checks = Checks("hostile", f"invalid JSON in {column} via {entry}")
    REPORT.hostile_inputs[f"invalid_json:{column}"] += 1
    table, name, where, _ = JSON_COLUMNS[column]
    make = completed_run if entry == "completed" else interrupted_run
    pipeline = await make(url, run_id)
    seq = where.get("seq")
    await execute_sql(
        url,
        f"UPDATE {table} SET {name} = ? WHERE run_id = ?"
        + ("".join(f" AND {k} = ?" for k in where)),
        BROKEN_JSON,
        run_id,
        *((int(seq),) if seq else where.values()),
    )
    reads: dict[str, Callable[[], Any]] = {
        "resume": lambda: pipeline(TEXT, run_id=run_id),
        "completed": lambda: pipeline(TEXT, run_id=run_id),
        "steps": lambda: tide.steps(run_id),
        "get_run": lambda: tide.get_run(run_id),
        "state_versions": lambda: tide.state_versions(run_id),
        "events": lambda: tide.events(run_id),
    }
    if entry == "cli":
        status, stderr = await run_cli(zygote, tmp_path, url, "runs", "show", run_id)
        check_cli(checks, "runs show", status, stderr, must_fail=True)
    else:
        result: Outcome = await outcome(reads[entry])
        expect_library_error(checks, result, entry, CheckpointSerializationError)
    await check_prior_intact(tide, checks)
    await tide.close()
    checks.done()
