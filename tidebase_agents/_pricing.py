"""Token prices and usage reports with cost.

Prices are USD per 1M tokens. The defaults are OpenAI list prices at the time of writing; they
change, so users override or extend them with a JSON file (``--prices FILE`` or
``$TIDEBASE_PRICES_FILE``) shaped ``{"model": {"input": 2.5, "output": 10, "cached_input":
1.25}}``. A usage record that carries its own ``cost_usd`` is never re-priced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError
from ._store import UsageRecord

ENV_PRICES = "TIDEBASE_PRICES_FILE"


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per 1M tokens. ``cached_input`` defaults to the input price."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        # OpenAI counts cached tokens inside input_tokens; they are billed at the cached rate.
        cached = min(cached_tokens, input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (
            (input_tokens - cached) * self.input
            + cached * cached_rate
            + output_tokens * self.output
        ) / 1_000_000


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00, 0.125),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "o1": Price(15.00, 60.00, 7.50),
    "o3": Price(2.00, 8.00, 0.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


def load_prices(path: str | os.PathLike[str] | None = None) -> dict[str, Price]:
    """The default price table overlaid with the JSON file ``path`` (or ``$TIDEBASE_PRICES_FILE``)."""
    prices = dict(DEFAULT_PRICES)
    source = path or os.environ.get(ENV_PRICES)
    if not source:
        return prices
    try:
        doc = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read price file {str(source)!r}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"price file {str(source)!r} must hold a JSON object")
    for model, entry in doc.items():
        try:
            prices[model] = Price(
                float(entry["input"]),
                float(entry["output"]),
                None if entry.get("cached_input") is None else float(entry["cached_input"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigurationError(
                f"price file {str(source)!r}: {model!r} needs numeric 'input' and 'output' "
                f"(USD per 1M tokens) and optionally 'cached_input'"
            ) from None
    return prices


def price_for(model: str | None, prices: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: an exact entry, else the longest entry it starts with (dated
    snapshots like ``gpt-4o-2024-08-06``), ignoring a ``provider/`` prefix."""
    if not model:
        return None
    name = model.rsplit("/", 1)[-1]
    if name in prices:
        return prices[name]
    matches = [m for m in prices if name.startswith(f"{m}-")]
    return prices[max(matches, key=len)] if matches else None


USAGE_GROUPS = ("run", "pipeline", "model")
_TOKENS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "total_tokens")
_UNPRICED = ("unpriced_input", "unpriced_output", "unpriced_cached")


def parse_group_by(spec: str | Sequence[str]) -> list[str]:
    """``"pipeline,model"`` (or a list of keys) -> ``["pipeline", "model"]``, validated."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    keys = [k.strip() for k in parts if k.strip()]
    unknown = [k for k in keys if k not in USAGE_GROUPS]
    if not keys or unknown:
        raise ConfigurationError(
            f"--by takes a comma list of {', '.join(USAGE_GROUPS)}; got {spec!r}"
        )
    return list(dict.fromkeys(keys))


def record_cost(record: UsageRecord, prices: Mapping[str, Price]) -> float | None:
    """What one usage record cost: its own ``cost_usd``, else its model's price (None if the
    model has no price)."""
    if record.cost_usd is not None:
        return record.cost_usd
    price = price_for(record.model, prices)
    if price is None:
        return None
    return price.cost(record.input_tokens, record.output_tokens, record.cached_tokens)


_SUMMED = (*_TOKENS, "records", "lost_tokens", "recorded_cost", *_UNPRICED)


def _by_model(totals: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group and model: live rows and the daily rollups of pruned runs come as
    separate sums, and pricing each apart rounded differently from pricing their total."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in totals:
        key = (*(r[k] for k in keys), r["model"])
        acc = merged.get(key)
        if acc is None:
            merged[key] = {**r, **{c: r[c] or 0 for c in _SUMMED}}
        else:
            for c in _SUMMED:
                acc[c] += r[c] or 0
    return list(merged.values())


def usage_report(
    totals: Sequence[Mapping[str, Any]], by: Sequence[str], prices: Mapping[str, Price]
) -> list[dict[str, Any]]:
    """Token totals and cost grouped by ``by``, from the store's per-(group, model) sums.

    ``cost_usd`` is None when some tokens of a group belong to a model without a price;
    ``unpriced_models`` names those models. ``lost_tokens`` of ``total_tokens`` were billed
    for work a later attempt did again (a journaled model turn it did not reuse).
    """
    keys = list(by)
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in _by_model(totals, keys):
        ident = tuple(r[k] for k in keys)
        acc = out.setdefault(
            ident,
            {
                **dict(zip(keys, ident, strict=True)),
                **{c: 0 for c in _TOKENS},
                "records": 0,
                "lost_tokens": 0,
                "cost_usd": 0.0,
                "unpriced_models": [],
            },
        )
        for c in (*_TOKENS, "records", "lost_tokens"):
            acc[c] += int(r[c] or 0)
        cost = float(r["recorded_cost"] or 0.0)
        tokens = [int(r[c] or 0) for c in _UNPRICED]
        if any(tokens):
            price = price_for(r["model"], prices)
            if price is None:
                acc["unpriced_models"].append(r["model"])
            else:
                cost += price.cost(*tokens)
        acc["cost_usd"] += cost
    report = []
    for ident in sorted(out, key=lambda t: tuple("" if v is None else str(v) for v in t)):
        acc = out[ident]
        acc["cost_usd"] = None if acc["unpriced_models"] else round(acc["cost_usd"], 6)
        report.append(acc)
    return report
