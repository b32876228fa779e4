"""Pipelines for worker subprocesses of the wait tests
(``tidebase-agents worker --app waits_worker_app:tide``).

``TIDEBASE_DATABASE_URL`` is the database (the worker sets it from ``--database-url``);
``WAITS_DIR`` the directory of the execution log and the refund API's files.
"""

from __future__ import annotations

import os
from pathlib import Path

import waits_app
from agentkit_common import log_line

from tidebase_agents import Tidebase, checkpointed_pipeline, current_run

tide = Tidebase(lease_seconds=2)
DIRECTORY = os.environ.get("WAITS_DIR", ".")


@checkpointed_pipeline("sleeper", tide=tide)
async def sleeper(seconds: float) -> str:
    """Logs a step, sleeps durably, logs another: each line says which process ran it."""
    run = current_run()
    log = Path(DIRECTORY, "sleeper.log")
    await run.step("before", lambda: log_line(log, f"before {os.getpid()}"))
    await run.sleep(seconds)
    await run.step("after", lambda: log_line(log, f"after {os.getpid()}"))
    return "rested"


refund = waits_app.refund_pipeline(os.environ.get("TIDEBASE_DATABASE_URL", ""), DIRECTORY)
