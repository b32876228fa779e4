"""The run inspector's test helpers: a database seeded by real pipelines (crashes in child
processes, resumes, a parked step, usage, hostile output), the app served by uvicorn on a free
loopback port, and headless Chromium driven by Selenium."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentkit_common import CRASH_CODE, until_unlocked
from agentkit_research import build
from harness import SUPPORT_DIR

from tidebase_agents import Run, StepNeedsReview, Tidebase, checkpointed_pipeline

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Under this variable (CI sets it) a missing browser fails the browser tests.
REQUIRE_BROWSER = os.environ.get("TIDEBASE_TEST_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)

#: Stored output that would run script if the inspector did not escape it.
PAYLOAD = (
    '<script>window.__pwned = 1; document.title = "pwned"</script>'
    "<img src=x onerror=\"window.__pwned = 2; document.title = 'pwned'\">"
)
#: A step name trying to break out of the SVG text and title elements it is drawn in.
HOSTILE_STEP = "tool:</title></text><script>window.__pwned = 3</script>#1"

RESUMED = "research-resumed"
PARKED = "research-parked"
IN_DOUBT = "research-in-doubt"
HOSTILE = "hostile-output"
PROBE = "refresh-probe"
DIGESTS = ("digest-1", "digest-2", "digest-3")
SEEDED = (RESUMED, PARKED, IN_DOUBT, HOSTILE, PROBE, *DIGESTS)
#: Models whose usage the seed records (the research agents' scripted model, and two priced).
SCRIPTED_MODEL = "agents.testing.model.ScriptedModel"
PRICED_MODELS = ("gpt-4o", "gpt-4o-mini")


#: The research runs that crash, where, and with which tool (see ``agentkit_research``).
CRASHES = (
    (RESUMED, "after_researcher", "key_read"),
    (PARKED, "in_tool", "unkeyed"),
    (IN_DOUBT, "in_tool", "key_read"),
)


def crash_together(url: str, directory: str) -> None:
    """In a child process: every run of ``CRASHES`` at once, each on a thread and event loop
    of its own. A run reaching its crash point waits there; when all have, the process dies
    (``os._exit``) with each of them mid-flight. One child instead of one per run: the Agents
    SDK takes seconds to import."""
    import agentkit_research

    reached = threading.Barrier(len(CRASHES), action=lambda: os._exit(CRASH_CODE), timeout=60)
    agentkit_research.crash = reached.wait  # type: ignore[assignment]

    opening = threading.Lock()

    async def crash_at_its_point(run_id: str, pipeline: Any) -> None:
        # Embedded SQLite migrates as it opens, and Alembic's context is process-global.
        with opening:
            await pipeline.tide.store.open()
        await pipeline("durable agents", run_id=run_id)

    def execute(run_id: str, pipeline: Any) -> None:
        try:
            asyncio.run(crash_at_its_point(run_id, pipeline))
        except BaseException as exc:
            print(f"{run_id} ended before its crash point: {exc!r}", file=sys.stderr, flush=True)
            reached.abort()

    threads = []
    for run_id, crash_at, tool in CRASHES:
        Path(directory, run_id).mkdir(parents=True, exist_ok=True)
        kit = build(url, str(Path(directory, run_id)), tool=tool, crash_at=crash_at)
        threads.append(threading.Thread(target=execute, args=(run_id, kit.pipeline)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def _crash_all(url: str, directory: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys, ui_support; ui_support.crash_together(*sys.argv[1:])",
        url,
        str(directory),
        env={**os.environ, "PYTHONPATH": str(SUPPORT_DIR)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != CRASH_CODE:
        raise AssertionError(f"the child did not crash (rc={proc.returncode}): {err.decode()}")


async def _hostile(run: Run, prompt: Any) -> str:
    await run.state_set({"note": PAYLOAD})
    await run.step(HOSTILE_STEP, lambda: PAYLOAD)
    await run.usage_record(model="gpt-4o", input_tokens=1200, output_tokens=300)
    return PAYLOAD


async def _digest(run: Run, n: int) -> str:
    await run.step("summarize", lambda: f"digest {n}")
    await run.usage_record(model="gpt-4o-mini", input_tokens=4000 * n, output_tokens=900)
    await run.usage_record(model="gpt-4o", input_tokens=1500, output_tokens=400 * n)
    return f"digest {n}"


async def seed(url: str, directory: Path) -> None:
    """Runs of every kind the inspector draws, made by real pipelines on ``url``:

    - ``research-resumed``: crashed after its first agent, resumed here: the researcher and its
      durable tool replayed, the writer executed in attempt 2.
    - ``research-parked``: crashed inside its unkeyed side-effecting tool, resumed: the tool
      step is parked in ``manual_review`` (R5).
    - ``research-in-doubt``: crashed inside its keyed tool and left so: the step is in doubt.
    - ``hostile-output``: output, state, arguments and a step name holding markup and script.
    - ``digest-1..3``: usage of two priced models; ``refresh-probe``: queued on queue ``mail``.
    """
    await _crash_all(url, directory)
    resumed = build(url, str(directory / RESUMED))
    parked = build(url, str(directory / PARKED), tool="unkeyed")
    tide = Tidebase(url)
    try:
        await until_unlocked(lambda: resumed.pipeline.resume(RESUMED))
        try:
            await until_unlocked(lambda: parked.pipeline.resume(PARKED))
        except StepNeedsReview:
            pass
        else:
            raise AssertionError("an unkeyed write in doubt must park for review")
        await tide.run("hostile <b>pipeline</b>", _hostile, run_id=HOSTILE, input=PAYLOAD)
        for i, run_id in enumerate(DIGESTS, 1):
            await tide.run("digest", _digest, run_id=run_id, input=i)

        @checkpointed_pipeline("probe", tide=tide)
        async def probe() -> None:
            return None

        await probe.enqueue(run_id=PROBE, queue="mail")
    finally:
        await resumed.pipeline.tide.close()
        await parked.pipeline.tide.close()
        await tide.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the inspector did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def browser_missing() -> str | None:
    """Why headless Chromium cannot be driven here, or None if it can."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        return f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium with a fresh profile, driven by Selenium (the system chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tidebase-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
