"""Serving the inspector with uvicorn, safe by default: loopback only unless given a token."""

from __future__ import annotations

import uvicorn

from .._errors import ConfigurationError
from .app import create_app, is_loopback

ENV_TOKEN = "TIDEBASE_UI_TOKEN"


class BindRefused(ConfigurationError):
    """The inspector would be reachable from other machines without a token."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind other machines could reach unless a token guards it."""
    if not token and not is_loopback(host):
        raise BindRefused(
            f"refusing to serve on {host} without a token: pass --token or set {ENV_TOKEN} "
            f"(or bind to 127.0.0.1)"
        )


def serve(
    host: str = "127.0.0.1",
    port: int = 8321,
    *,
    database_url: str | None = None,
    schema: str | None = None,
    token: str | None = None,
    prices: str | None = None,
) -> None:
    """Serve the inspector until interrupted (``BindRefused`` for an unguarded open bind)."""
    check_bind(host, token)
    app = create_app(database_url, schema=schema, token=token, prices=prices)
    shown = f"[{host}]" if ":" in host else host
    print(f"tidebase inspector (read-only) on http://{shown}:{port}/", flush=True)
    # No access log: a first request may carry the token in its query string.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
