"""A small MCP server over stdio (``python mcp_ledger_server.py LOG_FILE``), for the MCP tests.

``issue_number()`` is a write: it draws a random number, appends it to the ledger (the log
file) and returns it; a request carrying ``_meta["idempotency_key"]`` that was seen before gets
the number issued then, as a server that deduplicates by key would. ``lookup(term)`` only reads.
Every call is logged, so a test can count calls across processes.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

LOG = sys.argv[1] if len(sys.argv) > 1 else os.devnull
server = MCPServer("ledger")


def _rows() -> list[dict[str, Any]]:
    if not os.path.exists(LOG):
        return []
    with open(LOG) as f:
        return [json.loads(line) for line in f if line.strip()]


def _log(row: dict[str, Any]) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


@server.tool()
def issue_number(ctx: Context) -> str:
    """Issue the next ticket number (a write)."""
    meta = getattr(ctx.request_context, "meta", None) or {}
    key = meta.get("idempotency_key") if isinstance(meta, dict) else None
    for row in _rows():
        if key is not None and row.get("key") == key and row["tool"] == "issue_number":
            _log({"tool": "issue_number", "key": key, "result": row["result"], "repeat": True})
            return str(row["result"])
    number = f"N-{secrets.randbelow(10**9)}"
    _log({"tool": "issue_number", "key": key, "result": number, "pid": os.getpid()})
    return number


@server.tool()
def lookup(term: str) -> str:
    """Look a term up (read-only)."""
    _log({"tool": "lookup", "term": term, "pid": os.getpid()})
    return f"{term}: lasting"


if __name__ == "__main__":
    server.run("stdio")
