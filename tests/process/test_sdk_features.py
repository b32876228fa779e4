"""Agents SDK features under the decorators, crash or no crash (R16 and R1-R5 through them).

Per backend, one child process starts a run of every scenario in ``support/sdk_features.py``
(its ``JOBS``), each stopping at its crash point, and dies (``os._exit``) once all stopped; a
fresh child resumes every run and then runs each scenario once crash-free, for reference. Each
test below checks one feature's runs: the resumed run must read like the crash-free one, and
what must not happen twice (a model call, a write, an MCP call) did not.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import CHILD_CODE, assert_crashed, report_of
from harness import pg_admin, pg_url_of, run_child
from sdk_features import JOBS, job_key

pytestmark = pytest.mark.crash


@dataclasses.dataclass
class Runs:
    """What the crash and resume children saw, per job."""

    crash: dict[str, Any]
    resumed: dict[str, Any]
    reference: dict[str, Any]

    def resumed_ok(self, name: str, crash_at: str) -> dict[str, Any]:
        key = job_key(name, crash_at)
        assert key in self.crash["arrived"], self.crash["ended"].get(key)
        report: dict[str, Any] = self.resumed[key]
        assert report["outcome"] == "ok", report.get("error")
        return report

    def reference_of(self, name: str) -> dict[str, Any]:
        report: dict[str, Any] = self.reference[name]
        assert report["outcome"] == "ok", report.get("error")
        return report


def _child(target: str, url: str, root: Path, timeout: float) -> Any:
    return run_child(
        CHILD_CODE, target, json.dumps({"url": url, "root": str(root)}), timeout=timeout
    )


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def runs(
    request: pytest.FixtureRequest,
    pg_template: str | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp(f"sdk-features-{request.param}")
    database = None
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'tidebase.db'}"
    else:
        if pg_template is None:
            pytest.skip("PostgreSQL not reachable (set TIDEBASE_TEST_REQUIRE_PG=1 to require it)")
        database = f"tidebase_sdkfeat_{root.name.replace('-', '_')}"[:60]
        pg_admin(f'CREATE DATABASE "{database}" TEMPLATE "{pg_template}"')
        url = pg_url_of(database)
    try:
        crashed = _child("sdk_features:crash_all", url, root, timeout=400)
        assert_crashed(crashed)
        crash = json.loads((root / "crash-report.json").read_text())
        reports = report_of(_child("sdk_features:resume_all", url, root, timeout=600))
        assert reports["outcome"] == "ok", reports
        yield Runs(crash, reports["resumed"], reports["reference"])
    finally:
        if database is not None:
            pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_every_job_stopped_at_its_crash_point(runs: Runs) -> None:
    assert runs.crash["ended"] == {}
    assert sorted(runs.crash["arrived"]) == sorted(job_key(*job) for job in JOBS)


# -- context (R16): the customer-service example --------------------------------------------------

CUSTOMER_SERVICE_CRASHES = [
    "after_turn_1",
    "after_turn_2",
    "after_turn_3",
    "in_write",
    # The seat tool finished (and set the context), its agent run did not: the re-executed run
    # replays the tool, which brings the context to what the call left.
    "after_seat_tool",
]


@pytest.mark.parametrize("crash_at", CUSTOMER_SERVICE_CRASHES)
def test_customer_service_context_survives_a_crash(runs: Runs, crash_at: str) -> None:
    """Context set by ``on_handoff`` and by tools, read by dynamic instructions and tools: every
    resume ends with the crash-free answers and context; the seat is written once."""
    resumed = runs.resumed_ok("customer_service", crash_at)
    reference = runs.reference_of("customer_service")
    # The flight number is random: the resumed run keeps the one drawn before the crash.
    (drawn,) = resumed["draws"]
    ref_flight = reference["result"]["context"]["flight_number"]
    expected = json.loads(json.dumps(reference["result"]).replace(ref_flight, drawn))
    assert expected["context"] == {
        "passenger_name": None,
        "confirmation_number": "ABC123",
        "seat_number": "12A",
        "flight_number": drawn,
    }
    assert resumed["result"] == expected
    assert resumed["caller_context"] == expected["context"]  # the caller's own object
    assert "You keep seat 12A on " + drawn in resumed["result"]["answers"][2]

    (write,) = resumed["writes"]
    assert write["title"] == f"{drawn}:12A"
    attempts = resumed["attempts"]
    assert len(attempts) == (2 if crash_at == "in_write" else 1)
    assert {a["key"] for a in attempts} == {write["key"]}


# -- Runner.run(agent, state) by hand -------------------------------------------------------------


def test_approval_by_hand_resumes_with_the_states_context(runs: Runs) -> None:
    """``to_state`` / ``approve`` / ``Runner.run(agent, state)`` without ``context=`` in user code:
    the replay uses the state's context (its ``is_enabled`` reads it), as the SDK does."""
    resumed = runs.resumed_ok("approval", "after_approved_run")
    reference = runs.reference_of("approval")
    assert resumed["result"] == reference["result"]
    assert resumed["result"]["context"] == {"tenant": "t1", "charged": 5}
    assert resumed["result"]["state_context_is_result_context"] is True
    assert len(resumed["writes"]) == 1
    assert len(resumed["attempts"]) == 1  # the charge did not run again


# -- MCP ------------------------------------------------------------------------------------------


def test_mcp_tool_that_answered_is_not_called_again(runs: Runs) -> None:
    """Crashed after the MCP server answered, before the agent finished: on resume the agent
    re-executes, its MCP calls replay from their checkpoints, the server is not called."""
    resumed = runs.resumed_ok("mcp", "after_mcp_answer")
    reference = runs.reference_of("mcp")
    issued = [row for row in resumed["ledger"] if row["tool"] == "issue_number"]
    assert len(issued) == 1  # one call in all (a repeat would be logged too)
    assert issued[0]["key"]  # the derived idempotency key went in _meta
    assert [row["tool"] for row in resumed["ledger"]].count("lookup") == 1
    assert resumed["result"] == f"your number is {issued[0]['result']} (durable: lasting)"
    (ref_issued,) = [row for row in reference["ledger"] if row["tool"] == "issue_number"]
    assert reference["result"] == f"your number is {ref_issued['result']} (durable: lasting)"


def test_mcp_keyed_call_in_doubt_reexecutes_with_the_same_key(runs: Runs) -> None:
    resumed = runs.resumed_ok("mcp_keyed_in_doubt", "in_call")
    first, again = resumed["ledger"]  # the call, and the same call again after the crash
    assert first["key"] and again["key"] == first["key"]
    assert again.get("repeat") is True and again["result"] == first["result"]  # deduplicated
    assert resumed["result"] == f"got {first['result']}"
    assert resumed["parked"] is None


def test_mcp_unkeyed_call_in_doubt_parks_for_review(runs: Runs) -> None:
    resumed = runs.resumed_ok("mcp_unkeyed_in_doubt", "in_call")
    assert resumed["result"] is None
    assert re.fullmatch(r"agent:clerk#1/mcp:ledger:issue_number:[0-9a-f]{12}#1", resumed["parked"])
    (issued,) = resumed["ledger"]  # not called again
    assert issued["key"] is None
    assert runs.reference_of("mcp_unkeyed_in_doubt")["parked"] is None


def test_mcp_read_only_call_in_doubt_runs_again(runs: Runs) -> None:
    resumed = runs.resumed_ok("mcp_read_only_in_doubt", "in_call")
    assert resumed["result"] == runs.reference_of("mcp_read_only_in_doubt")["result"]
    assert resumed["result"] == "got durable: lasting"
    assert [row["tool"] for row in resumed["ledger"]] == ["lookup", "lookup"]


# -- handoffs, agents as tools, guardrails, outputs, behaviours, instructions ---------------------


def test_handoff_with_input_filter(runs: Runs) -> None:
    resumed = runs.resumed_ok("handoffs", "after_handoff")
    assert resumed["result"] == runs.reference_of("handoffs")["result"]
    assert resumed["result"]["last_agent_is_live"] is True
    assert "function_call" not in resumed["result"]["answers"][0]  # the filter removed tools
    assert resumed["specialist_calls"] == 1  # only the second run: the handoff run replayed


def test_agents_as_tools_streamed_to_on_stream(runs: Runs) -> None:
    resumed = runs.resumed_ok("agents_as_tools", "after_tools")
    reference = runs.reference_of("agents_as_tools")
    assert resumed["result"] == reference["result"]
    assert resumed["result"]["output"] == "[fr] good morning / summary: a long story"
    assert resumed["nested_calls"] == 0  # the nested agents replayed
    assert "run_item_stream_event" in resumed["on_stream"]  # replayed events reach on_stream
    assert set(resumed["on_stream"]) <= set(reference["on_stream"])


def test_guardrails_replay_with_their_types(runs: Runs) -> None:
    resumed = runs.resumed_ok("guardrails", "after_guardrails")["result"]
    reference = runs.reference_of("guardrails")["result"]
    # An unregistered output_info type is never constructed from a checkpoint (R14).
    assert reference["guardrails"]["input"][1] == ["UnregisteredNote", {"note": "seen"}]
    assert resumed["guardrails"]["input"][1] == ["dict", {"note": "seen"}]
    resumed["guardrails"]["input"][1] = reference["guardrails"]["input"][1]
    assert resumed == reference
    assert reference["guardrails"]["input"][0][0] == "InputCheck"
    assert [g[0] for g in reference["guardrails"]["output"]] == ["OutputCheck"]
    assert [g[0] for g in reference["guardrails"]["agent_output"]] == ["CityAnswer"]
    assert [g[0] for g in reference["guardrails"]["tool_input"]] == ["ToolCheck"]
    assert all(reference["guardrails"]["input_live"] + reference["guardrails"]["output_live"])
    assert reference["tripwire"][0] == "InputCheck"


def test_structured_outputs(runs: Runs) -> None:
    resumed = runs.resumed_ok("structured_outputs", "after_forecast")
    assert resumed["result"] == runs.reference_of("structured_outputs")["result"]
    assert resumed["result"]["types"] == ["Forecast", "list"]


def test_tool_use_behavior_variants(runs: Runs) -> None:
    resumed = runs.resumed_ok("tool_use_behavior", "after_runs")
    assert resumed["result"] == runs.reference_of("tool_use_behavior")["result"]
    assert resumed["result"]["outputs"] == [
        ["str", "150"],
        ["str", "2.75 EUR"],
        ["str", "{'sum': 425}"],  # the SDK makes a tool-derived answer text
    ]
    assert resumed["model_calls"] == 0


def test_dynamic_instructions_see_the_restored_context(runs: Runs) -> None:
    resumed = runs.resumed_ok("dynamic_instructions", "after_upgrade")
    assert resumed["result"] == runs.reference_of("dynamic_instructions")["result"]
    assert resumed["result"]["tier"] == "gold"
    assert "a gold customer" in resumed["result"]["answers"][1]


# -- hooks ----------------------------------------------------------------------------------------

AGENT_LEVEL = {
    "run.agent_start",
    "run.agent_end",
    "run.handoff",
    "agent.start",
    "agent.end",
    "agent.handoff",
}


def test_hooks_fire_for_a_replayed_run_flagged_as_replayed(runs: Runs) -> None:
    resumed = runs.resumed_ok("hooks", "after_run")
    reference = runs.reference_of("hooks")
    assert resumed["result"] == reference["result"] == "booked 12A"
    live = reference["events"]
    assert all(event[-1] is False for event in live)
    assert {"run.llm_end", "run.tool_end"} <= {event[0] for event in live}
    expected = [[*event[:-1], True] for event in live if event[0] in AGENT_LEVEL]
    assert resumed["events"] == expected


# -- sessions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["session_file", "session_sqlalchemy"])
def test_sessions_outliving_the_process_keep_the_conversation(runs: Runs, kind: str) -> None:
    resumed = runs.resumed_ok(kind, "after_turn_1")
    reference = runs.reference_of(kind)
    assert resumed["result"] == reference["result"]
    assert "my name is Ann | what is my name?" in resumed["result"]["answers"][1]
    assert resumed["session_items"] == reference["session_items"] == 4
    assert resumed["warnings"] == []


def test_in_memory_session_warns_and_loses_the_conversation(runs: Runs) -> None:
    resumed = runs.resumed_ok("session_memory", "after_turn_1")
    reference = runs.reference_of("session_memory")
    (warning,) = resumed["warnings"]
    assert "SQLiteSession" in warning and "kept in memory" in warning
    assert reference["result"]["answers"][1] == "I have heard: my name is Ann | what is my name?"
    assert resumed["result"]["answers"][0] == reference["result"]["answers"][0]
    assert resumed["result"]["answers"][1] == "I have heard: what is my name?"  # as documented
    assert resumed["session_items"] == 2


# -- run_sync, max_turns --------------------------------------------------------------------------


def test_run_sync_from_a_thread(runs: Runs) -> None:
    resumed = runs.resumed_ok("run_sync", "after_run_sync")
    assert resumed["result"] == runs.reference_of("run_sync")["result"]
    assert resumed["result"] == "edited draft: a haiku"
    assert resumed["drafter_calls"] == 0


def test_max_turns_raised_and_handled(runs: Runs) -> None:
    resumed = runs.resumed_ok("max_turns", "after_max_turns")
    assert resumed["result"] == runs.reference_of("max_turns")["result"]
    assert resumed["result"] == {
        "raised": "Max turns (2) exceeded",
        "handled": "gave up after looper",
    }
    assert resumed["model_calls"] == 0
