"""The replay contract (R1-R13): run context, scopes, the executor and its heartbeat.

Never imports the Agents SDK: the SDK package plugs in through the hooks of :mod:`.spec`
(step specs with their own codecs, reentrant output types).
"""

from .execute import check_input_size, execute_run
from .executor import Executor, error_record
from .run import NotInRun, Run, active_executor, current_run, idempotency_key
from .scope import Scope, ToolCall, current_scope, current_tool_call
from .settings import EngineSettings
from .spec import (
    RUN_CONTROL,
    Decision,
    Execution,
    PipelineOptions,
    RunInfo,
    StepSpec,
    StopRun,
    current_pipeline_options,
    decode_value,
    register_reentrant_output,
    register_run_scope,
    register_step_replayed,
    reset_pipeline_options,
    set_pipeline_options,
)
from .waits import await_approvals

__all__ = [
    "RUN_CONTROL",
    "Decision",
    "EngineSettings",
    "Execution",
    "Executor",
    "NotInRun",
    "PipelineOptions",
    "Run",
    "RunInfo",
    "Scope",
    "StepSpec",
    "StopRun",
    "ToolCall",
    "active_executor",
    "await_approvals",
    "check_input_size",
    "current_pipeline_options",
    "current_run",
    "current_scope",
    "current_tool_call",
    "decode_value",
    "error_record",
    "execute_run",
    "idempotency_key",
    "register_reentrant_output",
    "register_run_scope",
    "register_step_replayed",
    "reset_pipeline_options",
    "set_pipeline_options",
]
