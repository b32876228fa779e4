"""The research pipeline as a DBOS workflow (``dbos`` + ``dbos-openai-agents``, the bench extra).

Importing this module registers the workflow and step with DBOS, so it is imported only by the
DBOS configurations. ``DBOSRunner.run`` wraps each model call as a DBOS step; the tool is a
``@function_tool`` over ``@DBOS.step()``, as DBOS documents for durable tools.
"""

from __future__ import annotations

from agents import function_tool
from dbos import DBOS, DBOSConfig
from dbos_openai_agents import DBOSRunner

from bench import workload


@function_tool
@DBOS.step()
async def lookup(topic: str) -> str:
    return await workload.lookup_impl(topic)


@DBOS.workflow()
async def research(topic: str, uid: str) -> str:
    return await workload.research(topic, uid, run=DBOSRunner.run, lookup_tool=lookup)


def launch(system_database_url: str) -> None:
    """Configure and launch DBOS on ``system_database_url`` (``postgresql://...`` or
    ``sqlite:///path``); DBOS creates and migrates its system database on launch."""
    config: DBOSConfig = {
        "name": "tidebase-bench",
        "system_database_url": system_database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


def shutdown() -> None:
    DBOS.destroy()
