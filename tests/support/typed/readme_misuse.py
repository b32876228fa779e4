"""Calls the type checkers must reject: each line marked ``# rejected`` is an error for both
``mypy --strict`` and pyright (``tests/unit/test_typing.py``); nothing else is."""

from __future__ import annotations

from readme_app import research

from tidebase_agents import Run, Tidebase


async def misuse() -> None:
    await research(42)  # rejected: topic is a str
    count: int = await research("topic")  # rejected: the pipeline returns a str
    await research.with_run_id("run-42")(topic=7)  # rejected: topic is a str
    await research.enqueue_with(queue="default")()  # rejected: topic is missing
    await research.enqueue("a", "b")  # rejected: one argument too many

    async def pipeline(run: Run, input: dict[str, str]) -> str:
        text: int = await run.step("s", lambda: "text")  # rejected: the step returns a str
        return str(text)

    await Tidebase().run("p", pipeline, input=3)  # rejected: input is a dict[str, str]
    print(count)
