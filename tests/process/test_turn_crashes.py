"""T1 under real crashes: a process killed inside the k-th tool of a long agent run resumes in a
fresh process without asking the model again for any turn that already answered, in a tool
loop, a handoff chain and an agent used as a tool; the result (final output, input list, usage)
and the usage ledger equal a crash-free run's."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import CHILD_CODE, assert_crashed, read_lines, report_of
from agentkit_turns import SCENARIOS
from harness import run_child

from tidebase_agents import Tidebase


def attempt(url: str, directory: Path, run_id: str, scenario: str, crash_at: int | None) -> Any:
    kwargs = {
        "url": url,
        "directory": str(directory),
        "run_id": run_id,
        "scenario": scenario,
        "crash_at": crash_at,
    }
    return run_child(CHILD_CODE, "agentkit_turns:run_once", json.dumps(kwargs))


async def ledger(url: str, run_id: str) -> tuple[int, int, int]:
    rows = await Tidebase(url).usage_records(run_id)
    return (
        sum(r.requests for r in rows),
        sum(r.total_tokens for r in rows),
        sum(r.total_tokens for r in rows if r.lost),
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("k", [1, 5, 9])
async def test_t1_a_crash_inside_the_kth_tool_rebills_no_turn_that_answered(
    db_url: str, tmp_path: Path, scenario: str, k: int
) -> None:
    total = SCENARIOS[scenario]
    clean_dir, crash_dir = tmp_path / "clean", tmp_path / "crash"
    clean_dir.mkdir()
    crash_dir.mkdir()
    clean_id, run_id = f"clean-{uuid.uuid4().hex[:8]}", f"crash-{uuid.uuid4().hex[:8]}"
    clean = report_of(attempt(db_url, clean_dir, clean_id, scenario, None))
    assert clean["outcome"] == "ok" and clean["calls"] == total, clean

    assert_crashed(attempt(db_url, crash_dir, run_id, scenario, k))
    answered = len(read_lines(crash_dir / "calls.log"))
    resumed = report_of(attempt(db_url, crash_dir, run_id, scenario, k))
    assert resumed["outcome"] == "ok", resumed
    # Every call before the crash answered and was journaled: the resume makes only the rest.
    assert resumed["calls"] == total - answered
    assert resumed["summary"] == clean["summary"]  # output, to_input_list(), result usage
    requests, tokens, lost = await ledger(db_url, run_id)
    assert (requests, tokens) == (await ledger(db_url, clean_id))[:2]
    assert lost == 0
    assert not [s.name for s in await Tidebase(db_url).steps(run_id) if "/model#" in s.name]
    await Tidebase(db_url).close()
