"""Traces: one Agents SDK trace per execution of a pipeline run, grouped by the run id, with a
span for each step replayed from its checkpoint (a replayed agent run calls no model, so the
SDK would record nothing of it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from agents.tracing import custom_span, get_current_trace, trace
from agents.tracing.traces import NoOpTrace

from .._engine import RunInfo
from .._vocab import RunStatus


@contextlib.contextmanager
def run_trace(info: RunInfo) -> Iterator[None]:
    """Trace the execution as workflow ``<pipeline>`` grouped by ``<run id>``, unless the
    application already traces around it (then its spans join that trace)."""
    if get_current_trace() is not None:
        _mark_completed(info)
        yield
        return
    metadata = {"run_id": info.run_id, "pipeline": info.pipeline, "attempt": str(info.attempt)}
    with trace(workflow_name=info.pipeline, group_id=info.run_id, metadata=metadata):
        _mark_completed(info)
        yield


def _mark_completed(info: RunInfo) -> None:
    if info.replayed:
        with custom_span(
            f"replayed run {info.run_id}",
            data={"replayed": True, "run_id": info.run_id, "status": str(RunStatus.COMPLETED)},
        ):
            pass


def step_replayed(run_id: str, step: str) -> None:
    """A span saying that ``step`` returned its recorded output."""
    current = get_current_trace()
    if current is None or isinstance(current, NoOpTrace):
        return  # tracing is off: a resume replaying many steps pays nothing for spans
    with custom_span(f"replayed {step}", data={"replayed": True, "step": step, "run_id": run_id}):
        pass
