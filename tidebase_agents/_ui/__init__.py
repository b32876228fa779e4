"""The run inspector: read-only web pages over a tidebase database (``tidebase-agents ui``).

Needs the ``ui`` extra (Starlette, Jinja2, uvicorn). Only the CLI imports it, lazily.
"""
