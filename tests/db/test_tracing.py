"""Traces and logs of a pipeline run, on SQLite and PostgreSQL: each execution is one Agents SDK
trace grouped by the run id, replayed steps are spans marked as replayed, the README's
OpenTelemetry processor exports them, and the library logs its decisions (and no Alembic
chatter) under ``tidebase_agents``."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import Interrupted, answers, total_calls
from agentkit_common import close_engines as close_engines
from agents import Agent, Runner, set_tracing_disabled, trace
from agents.tracing import Span, Trace, TracingProcessor, set_trace_processors

from tidebase_agents import Tidebase, checkpointed_pipeline, current_run

README = Path(__file__).resolve().parents[2] / "README.md"


class Collector(TracingProcessor):
    """Every trace started and every span ended, as the SDK exports them."""

    def __init__(self) -> None:
        self.traces: list[dict[str, Any]] = []
        self.spans: list[dict[str, Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        self.traces.append(trace.export() or {})

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        self.spans.append(span.export() or {})

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The traces and spans since the last take."""
        taken = (self.traces, self.spans)
        self.traces, self.spans = [], []
        return taken


@pytest.fixture
def processors() -> Iterator[list[TracingProcessor]]:
    """Tracing on, exported only to the processors the test puts in the list."""
    installed: list[TracingProcessor] = []
    set_tracing_disabled(False)
    try:
        yield installed
    finally:
        set_trace_processors([])
        set_tracing_disabled(True)


def research_pipeline(db_url: str, name: str) -> Any:
    """An agent step and an explicit step, then a second agent step; the first attempt stops
    in between."""
    researcher = Agent(name="researcher", model=answers(lambda text: f"notes on {text}"))
    writer = Agent(name="writer", model=answers(lambda text: f"POST {text}"))

    @checkpointed_pipeline(name, database_url=db_url)
    async def pipeline(topic: str) -> str:
        notes = await Runner.run(researcher, topic)
        facts = await current_run().step("facts", lambda: f"facts on {topic}", input=topic)
        if current_run().attempt == 1:
            raise Interrupted
        post = await Runner.run(writer, f"{notes.final_output}; {facts}")
        return str(post.final_output)

    pipeline.models = [researcher.model, writer.model]  # type: ignore[attr-defined]
    return pipeline


def spans_of(spans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["span_data"]["type"] == kind]


def replayed_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The library's spans of replayed steps (the SDK has custom spans of its own)."""
    return [
        s["span_data"] for s in spans_of(spans, "custom") if s["span_data"]["data"].get("replayed")
    ]


async def test_each_execution_of_a_run_is_one_trace_and_replayed_steps_are_marked(
    db_url: str, processors: list[TracingProcessor]
) -> None:
    collector = Collector()
    set_trace_processors([collector])
    pipeline = research_pipeline(db_url, "traced")

    with pytest.raises(Interrupted):
        await pipeline.with_run_id("traced-1")("tides")
    (first,), spans = collector.take()
    assert (first["workflow_name"], first["group_id"]) == ("traced", "traced-1")
    assert first["metadata"] == {"run_id": "traced-1", "pipeline": "traced", "attempt": "1"}
    assert {s["trace_id"] for s in spans} == {first["id"]}
    assert [s["span_data"]["name"] for s in spans_of(spans, "agent")] == ["researcher"]
    assert replayed_spans(spans) == []  # nothing was replayed

    calls = total_calls(pipeline.models)
    assert await pipeline.with_run_id("traced-1")("tides") == "POST notes on tides; facts on tides"
    assert total_calls(pipeline.models) == calls + 1  # the writer only
    (second,), spans = collector.take()
    assert (second["group_id"], second["metadata"]["attempt"]) == ("traced-1", "2")
    assert second["id"] != first["id"]
    assert {s["trace_id"] for s in spans} == {second["id"]}  # one trace holds the execution
    assert replayed_spans(spans) == [
        {
            "type": "custom",
            "name": f"replayed {step}",
            "data": {"replayed": True, "step": step, "run_id": "traced-1"},
        }
        for step in ("agent:researcher#1", "facts")
    ]
    assert [s["span_data"]["name"] for s in spans_of(spans, "agent")] == ["writer"]

    # A completed run invoked again executes nothing: its trace says it was replayed.
    assert await pipeline.with_run_id("traced-1")("tides") == "POST notes on tides; facts on tides"
    (third,), spans = collector.take()
    assert third["group_id"] == "traced-1"
    assert [s["span_data"] for s in spans] == [
        {
            "type": "custom",
            "name": "replayed run traced-1",
            "data": {"replayed": True, "run_id": "traced-1", "status": "completed"},
        }
    ]
    assert {s["trace_id"] for s in spans} == {third["id"]}


async def test_a_run_inside_the_applications_own_trace_joins_it(
    db_url: str, processors: list[TracingProcessor]
) -> None:
    collector = Collector()
    set_trace_processors([collector])
    agent = Agent(name="solo", model=answers(lambda text: text.upper()))
    tide = Tidebase(db_url)

    async def body(run: Any, topic: str) -> str:
        result = await Runner.run(agent, topic)
        return str(result.final_output)

    with trace("the application's request", group_id="request-7") as outer:
        assert await tide.run("joined", body, run_id="joined-1", input="x") == "X"
    traces, spans = collector.take()
    assert [t["workflow_name"] for t in traces] == ["the application's request"]
    assert {s["trace_id"] for s in spans} == {outer.trace_id}
    assert [s["span_data"]["name"] for s in spans_of(spans, "agent")] == ["solo"]


def readme_processor() -> type[TracingProcessor]:
    """The OpenTelemetry processor class of the README, as written there."""
    text = README.read_text()
    blocks = re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
    found = [(m[1], m[2]) for m in blocks if "class OpenTelemetryProcessor" in m[2]]
    assert len(found) == 1, "the README has no OpenTelemetry processor"
    indent, block = found[0]
    code = "\n".join(line[len(indent) :] for line in block.splitlines())
    code = code.split("\nadd_trace_processor(")[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cls: type[TracingProcessor] = namespace["OpenTelemetryProcessor"]
    return cls


_exporter: Any = None


def otel_exporter() -> Any:
    """An in-memory exporter behind the process's OpenTelemetry tracer provider (set once)."""
    global _exporter
    if _exporter is None:
        from opentelemetry import trace as otel
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        _exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        otel.set_tracer_provider(provider)
    _exporter.clear()
    return _exporter


async def test_the_readme_opentelemetry_processor_exports_a_run_with_its_replayed_steps(
    db_url: str, processors: list[TracingProcessor]
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    exporter = otel_exporter()
    set_trace_processors([readme_processor()()])
    pipeline = research_pipeline(db_url, "exported")
    with pytest.raises(Interrupted):
        await pipeline.with_run_id("exported-1")("tides")
    exporter.clear()
    await pipeline.with_run_id("exported-1")("tides")

    finished = exporter.get_finished_spans()
    (root,) = [s for s in finished if s.parent is None]
    assert root.name == "exported"
    assert root.attributes["agents.group_id"] == "exported-1"
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}
    replayed = sorted(
        str(s.attributes["agents.name"])
        for s in finished
        if s.name == "custom" and "'replayed': True" in str(s.attributes["agents.data"])
    )
    assert replayed == ["replayed agent:researcher#1", "replayed facts"]
    agents = [s for s in finished if s.name == "agent"]
    assert [s.attributes["agents.name"] for s in agents] == ["writer"]
    by_id = {s.context.span_id: s for s in finished}
    span = agents[0]
    while span.parent is not None:  # nested as in the SDK trace, under the run's root span
        span = by_id[span.parent.span_id]
    assert span is root


async def test_decisions_are_logged_and_migrations_say_nothing_at_info(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = research_pipeline(db_url, "logged")
    with caplog.at_level(logging.DEBUG, logger="tidebase_agents"):
        with pytest.raises(Interrupted):
            await pipeline.with_run_id("logged-1")("tides")
        caplog.clear()
        await pipeline.with_run_id("logged-1")("tides")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tidebase_agents"]
    assert ("INFO", "run logged-1 of logged: attempt 2, 2 recorded steps to replay") in said
    for step in ("agent:researcher#1", "facts"):
        assert ("DEBUG", f"run logged-1: step {step} replayed from its checkpoint") in said
    assert ("DEBUG", "run logged-1: executing step agent:writer#1 (attempt 1)") in said
    assert any(
        level == "DEBUG" and msg.startswith("run logged-1: step agent:writer#1 executed")
        for level, msg in said
    )
    assert ("DEBUG", "run logged-1 completed: 1 steps executed, 2 replayed") in said

    # A new SQLite database migrates itself on first use without a word at INFO.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        tide = Tidebase(f"sqlite:///{tmp_path / 'quiet.db'}")
        try:
            await tide.run("quiet", _noop, run_id="q")
        finally:
            await tide.close()
    assert [r for r in caplog.records if r.name.startswith("alembic")] == []
    assert logging.getLogger("alembic").level == logging.NOTSET  # left as it was


async def _noop(run: Any, inp: Any) -> str:
    return "ok"
