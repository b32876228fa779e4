"""Pipelines of the hostile-input and tool-machinery tests, and the CLI as a child process.

``make(url)`` builds the ``fault-hostile`` pipeline: an explicit step ``first``, run state, an
``echo`` agent step, and a first attempt that fails after them (so a second invocation replays
them from their checkpoints). The module-level ``hostile`` is the same pipeline on the
database the CLI is given (``tidebase-agents runs resume RUN --app fault_apps:hostile``).

:func:`cli` runs the ``tidebase-agents`` command line in a child process of the zygote and
returns its exit code; an exception escaping it prints a traceback, as the console script would.

:func:`ticketing` builds a pipeline whose agent opens a ticket through a keyed durable tool that
reads its key directly, through a closure variable or through an import alias.
"""

from __future__ import annotations

import os
import signal
import traceback
from pathlib import Path
from typing import Any

from agentkit_common import answers, message, policy_model, tool_outputs, until_unlocked
from agents import Agent, Runner, function_tool
from agents.testing import ModelStep, function_call
from fault_kit import TOOL_ERROR, Effects

from tidebase_agents import (
    CheckpointedPipeline,
    checkpointed_pipeline,
    current_run,
    durable_tool,
    idempotency_key,
)
from tidebase_agents import idempotency_key as ticket_key

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


# -- durable tools whose machinery fails --------------------------------------------------------


def ticketing(
    url: str, workdir: str | Path, variant: str, *, crash: bool = False, returns: Any = None
) -> Any:
    """A pipeline whose agent opens one ticket through a keyed durable tool that reads its key
    as ``variant`` says (``direct``, ``closure``, ``alias``), may SIGKILL its process right
    after the external write, and may return ``returns`` instead of the ticket."""
    fx = Effects(Path(workdir) / "effects.db")
    key_of = idempotency_key  # the closure variant reaches it through this variable

    async def open_with(title: str, key: str) -> Any:
        ticket = fx.perform("open_ticket", {"title": title}, key, f"T-{title}")
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        return ticket if returns is None else returns

    async def direct(title: str) -> Any:
        """Open a ticket.

        Args:
            title: Its title.
        """
        return await open_with(title, idempotency_key())

    async def closure(title: str) -> Any:
        """Open a ticket.

        Args:
            title: Its title.
        """
        return await open_with(title, key_of())

    async def alias(title: str) -> Any:
        """Open a ticket.

        Args:
            title: Its title.
        """
        return await open_with(title, ticket_key())

    body = {"direct": direct, "closure": closure, "alias": alias}[variant]
    open_ticket = function_tool(
        durable_tool(side_effects=["tickets"])(body), name_override="open_ticket"
    )

    def answer(call: Any) -> Any:
        outputs = tool_outputs(call)
        if not outputs or TOOL_ERROR in outputs[-1]:
            n = len(outputs) + 1
            return ModelStep(
                output=[function_call("open_ticket", {"title": "bug"}, call_id=f"call-{n}")]
            )
        return message(f"opened {outputs[-1]}")

    model = policy_model(answer)
    agent = Agent(name="helpdesk", instructions="Open a ticket.", model=model, tools=[open_ticket])

    @checkpointed_pipeline("fault-ticketing", database_url=url, lease_seconds=1)
    async def pipeline() -> Any:
        return (await Runner.run(agent, "Please open a ticket")).final_output

    pipeline.model = model  # type: ignore[attr-defined]
    return pipeline


async def ticketing_attempt(
    url: str, workdir: str, run_id: str, variant: str, crash: bool = False
) -> dict[str, Any]:
    """One execution (or resume) of the ticketing run in this fresh process."""
    pipeline = ticketing(url, workdir, variant, crash=crash)
    try:
        output = await until_unlocked(lambda: pipeline(run_id=run_id))
    finally:
        await pipeline.tide.close()
    return {"output": output}
