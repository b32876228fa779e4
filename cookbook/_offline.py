"""Models for the recipes: OpenAI when ``OPENAI_API_KEY`` is set, else an offline scripted model.

The offline model answers from the request it gets (``agents.testing.ScriptedModel`` with a
responder), so the recipes run anywhere with no network and no key.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

from agents import Model, set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.testing.model import ModelCall
from agents.usage import Usage

ONLINE = bool(os.environ.get("OPENAI_API_KEY"))
if not ONLINE:
    set_tracing_disabled(True)

__all__ = ["ONLINE", "ModelCall", "call_tool", "last_user_text", "model", "reply", "tool_outputs"]


def model(respond: Callable[[ModelCall], ModelStep], online: str = "gpt-4.1-mini") -> str | Model:
    """``online`` with an API key, else an offline model answering through ``respond``."""
    if ONLINE:
        return online
    return ScriptedModel([ModelStep.respond(respond) for _ in range(256)])


def _usage(text: str) -> Usage:
    tokens = max(1, len(text) // 4)
    return Usage(requests=1, input_tokens=tokens * 3, output_tokens=tokens, total_tokens=tokens * 4)


def reply(text: str) -> ModelStep:
    """A final assistant message."""
    return ModelStep(output=[assistant_message(text)], usage=_usage(text))


def call_tool(name: str, **arguments: Any) -> ModelStep:
    """A function-tool call with a fresh call id, as a real model would emit."""
    return ModelStep(
        output=[function_call(name, arguments, call_id=f"call_{uuid.uuid4().hex[:12]}")],
        usage=_usage(json.dumps(arguments)),
    )


def _items(call: ModelCall) -> list[Any]:
    return [call.input] if isinstance(call.input, str) else list(call.input)


def last_user_text(call: ModelCall) -> str:
    """The text of the latest user message in the request."""
    for item in reversed(_items(call)):
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return " ".join(str(part.get("text", "")) for part in content or [])
    return ""


def tool_outputs(call: ModelCall) -> list[str]:
    """Outputs of the tool calls already answered in this request."""
    return [
        str(item.get("output"))
        for item in _items(call)
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]
