"""Tool functions with string annotations (``from __future__ import annotations``), for the
schema-equality test of ``function_tool(durable_tool(f))`` versus ``function_tool(f)``."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from agents import RunContextWrapper
from agents.tool_context import ToolContext
from pydantic import BaseModel, Field


class Address(BaseModel):
    street: str
    city: str
    zip_code: str | None = None


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


def plain(city: str, days: int = 3, metric: bool = True) -> str:
    """Forecast for a city.

    Args:
        city: Name of the city.
        days: How many days ahead.
        metric: Celsius when true.
    """
    return f"{city}:{days}:{metric}"


async def async_model_arg(address: Address, tags: list[str], note: str | None = None) -> str:
    """Ship a parcel.

    Args:
        address: Where to.
        tags: Labels for the parcel.
        note: Optional note for the courier.
    """
    return address.city


def constrained(
    count: Annotated[int, Field(ge=1, le=10)], mode: Literal["fast", "slow"] = "fast"
) -> int:
    """Repeat something.

    Args:
        count: How many times (1-10).
        mode: Speed.
    """
    return count


def with_wrapper(ctx: RunContextWrapper[Any], priority: Priority, items: list[int]) -> str:
    """Queue work with the run context.

    Args:
        priority: Urgency.
        items: Item counts.
    """
    return priority.value


async def with_tool_context(ctx: ToolContext[Any], query: str, limit: int = 5) -> str:
    """Search, knowing the tool call.

    Args:
        query: What to search for.
        limit: Maximum results.
    """
    return f"{ctx.tool_name}:{query}:{limit}"


FUNCTIONS = [plain, async_model_arg, constrained, with_wrapper, with_tool_context]
