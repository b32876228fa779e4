"""Everything that touches the OpenAI Agents SDK lives in this package, and only here.

The library pins ``openai-agents`` 0.24.x because this package relies on private ``RunState`` /
``RunResult`` fields, on ``agents.run.set_default_agent_runner`` and on subclassing the
experimental ``AgentRunner``; every line that reaches into a private SDK name says so with an
``SDK private`` comment. An SDK upgrade is a change to this package and its tests.

Modules, one seam each:

* ``fingerprint``: agent fingerprints and run-input JSON, the raw material of input hashes (I2);
* ``state``, ``result_codec``: the ``RunResult`` checkpoint codec (R1);
* ``errors``: deterministic agent failures that replay as the same exception;
* ``usage``: usage isolation for nested runs;
* ``model``: every model turn a journal entry (T1), usage per call;
* ``agent_runner``: the runner hook that routes every ``Runner`` call;
* ``agent_steps``: agent runs inside a pipeline as steps of the engine;
* ``streaming``: streamed runs, completion and replay;
* ``tools``, ``tool_signature``: ``@durable_tool``;
* ``session``: sessions journaled under replay;
* ``tracing``: one trace per execution of a run, replayed steps as spans;
* ``_fastpath``: a faster ``RunState.to_json`` for graphs with unique agent names.
"""

# ruff: noqa: E402
# (the SDK version is checked before importing private SDK modules, so that a wrong version fails
# with our message instead of an obscure ImportError from a moved private name)

from __future__ import annotations

import agents
from agents.run_state import CURRENT_SCHEMA_VERSION

SDK_SERIES = "0.24"
RUN_STATE_SCHEMA = "1.21"


def _check_sdk_version() -> None:
    version = str(agents.__version__)
    if version.split(".")[:2] != SDK_SERIES.split("."):
        raise ImportError(
            f"tidebase-agents needs openai-agents {SDK_SERIES}.x, found {version}; "
            f"install 'openai-agents>={SDK_SERIES},<0.25'"
        )
    if CURRENT_SCHEMA_VERSION != RUN_STATE_SCHEMA:
        raise ImportError(
            f"tidebase-agents needs the Agents SDK RunState schema {RUN_STATE_SCHEMA}, "
            f"found {CURRENT_SCHEMA_VERSION} (openai-agents {version})"
        )


_check_sdk_version()

from agents.result import RunResultBase

from .._engine import register_reentrant_output, register_run_scope, register_step_replayed
from . import _fastpath, model
from .agent_runner import install_runner
from .agent_steps import INTERCEPTOR
from .tracing import run_trace, step_replayed


def install() -> None:
    """Plug the SDK into the engine: agent runs inside a pipeline become steps, their model
    turns journal entries, each run execution one trace (idempotent)."""
    _fastpath.install()
    model.install()
    register_reentrant_output(RunResultBase)
    install_runner(INTERCEPTOR)
    register_run_scope(run_trace)
    register_step_replayed(step_replayed)
