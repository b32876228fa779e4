"""Pipelines whose checkpoints the hostile-input tests tamper with, and the CLI as a child.

``make(url)`` builds the ``fault-hostile`` pipeline: an explicit step ``first``, run state, an
``echo`` agent step, and a first attempt that fails after them (so a second invocation replays
them from their checkpoints). The module-level ``hostile`` is the same pipeline on the
database the CLI is given (``tidebase-agents runs resume RUN --app fault_apps:hostile``).

:func:`cli` runs the ``tidebase-agents`` command line in a child process of the zygote and
returns its exit code; an exception escaping it prints a traceback, as the console script would.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from agentkit_common import answers
from agents import Agent, Runner

from tidebase_agents import CheckpointedPipeline, checkpointed_pipeline, current_run

PIPELINE = "fault-hostile"


class Interrupted(Exception):
    """Ends a run's first attempt after its steps (so the next one replays them)."""


def make(url: str | None) -> CheckpointedPipeline[[str], dict[str, Any]]:
    echo = Agent(
        name="echo", instructions="Repeat the input.", model=answers(lambda t: f"echo: {t}")
    )

    @checkpointed_pipeline(PIPELINE, database_url=url)
    async def hostile(text: str) -> dict[str, Any]:
        run = current_run()
        first = await run.step("first", lambda: {"text": text, "n": len(text)}, input=text)
        await run.state_patch({"phase": "first"})
        echoed = await Runner.run(echo, text)
        if run.attempt == 1:
            raise Interrupted("the first attempt ends after its steps")
        return {"first": first, "echo": echoed.final_output}

    return hostile


hostile = make(None)


def cli(argv: list[str], env: dict[str, str] | None = None) -> int:
    """``tidebase-agents *argv`` in this process; its exit code."""
    os.environ.update(env or {})
    from tidebase_agents._cli import app

    try:
        app(args=argv, prog_name="tidebase-agents")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0
