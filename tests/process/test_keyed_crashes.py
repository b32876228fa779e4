"""R5 under real crashes: a keyed durable tool killed right after its external write re-executes
with the same key on resume, however its body reaches ``idempotency_key()`` (by name, an
import alias, a closure variable of a tool factory, or a lookup no reading of the code can
see). Each attempt is a fresh process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from agentkit_common import CHILD_CODE, ExternalApi, assert_crashed, report_of
from harness import run_child

from tidebase_agents import Tidebase
from tidebase_agents._vocab import StepStatus


def attempt(url: str, directory: Path, run_id: str, keying: str, **options: object) -> object:
    kwargs = {"url": url, "directory": str(directory), "run_id": run_id, "keying": keying}
    return run_child(CHILD_CODE, "agentkit_charge:run_once", json.dumps({**kwargs, **options}))


@pytest.mark.parametrize("keying", ["name", "alias", "closure"])
async def test_r5_a_keyed_tool_killed_after_its_write_reexecutes_with_the_same_key(
    db_url: str, tmp_path: Path, keying: str
) -> None:
    run_id = f"charge-{keying}-{uuid.uuid4().hex[:8]}"
    assert_crashed(attempt(db_url, tmp_path, run_id, keying, crash_after_write=True))
    report = report_of(attempt(db_url, tmp_path, run_id, keying, crash_after_write=True))
    assert report["outcome"] == "ok", report
    api = ExternalApi(tmp_path)
    keys = {row["key"] for row in api.attempt_rows()}
    assert len(api.attempt_rows()) == 2 and len(keys) == 1  # re-executed, under the same key
    assert len(api.write_rows()) == 1  # the API saw one charge
    assert report["output"] == f"charged: {api.write_rows()[0]['ticket']}"
    steps = {s.name: s for s in await Tidebase(db_url).steps(run_id)}
    (charge,) = [s for s in steps.values() if "tool:charge" in s.name]
    assert charge.status == StepStatus.COMPLETED and charge.keyed
    assert charge.attempts == 2
    await Tidebase(db_url).close()


async def test_r5_a_key_read_no_reading_of_the_code_can_see_is_recorded_before_the_write(
    db_url: str, tmp_path: Path
) -> None:
    """The tool looks the key up by a computed name: decoration records it as unkeyed, the
    first read corrects the intent record while the call is on its way to the API, and after a
    crash the call re-executes under the same key instead of waiting for a person."""
    run_id = f"charge-dynamic-{uuid.uuid4().hex[:8]}"
    options = {"crash_after_write": True, "latency": 0.3}
    assert_crashed(attempt(db_url, tmp_path, run_id, "dynamic", **options))
    report = report_of(attempt(db_url, tmp_path, run_id, "dynamic", **options))
    assert report["outcome"] == "ok", report
    api = ExternalApi(tmp_path)
    assert len({row["key"] for row in api.attempt_rows()}) == 1
    assert len(api.write_rows()) == 1
    events = [e.kind for e in await Tidebase(db_url).events(run_id)]
    assert "step_key_read" in events and "step_in_doubt" in events
    await Tidebase(db_url).close()
