"""Calls as the relay meters them, built for tests that price, store or count records without
relaying anything: one builder instead of a `CallMeter(...)` of eleven arguments per test."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from proxy.attribution import NO_TAGS
from proxy.config import Limits
from proxy.metering import CallMeter
from tests.support.proxy_harness import PEAK

LOOSE = Limits()
"""Bounds far above any test's usage: nothing is cut."""


def call_meter(
    request_id: str = "r1",
    *,
    team: str = "alpha",
    started_at: datetime = PEAK,
    stream: bool = False,
    endpoint: str = "chat",
    model: str = "deepseek-flash",
    payload: Mapping[str, Any] | None = None,
    **facts: Any,
) -> CallMeter:
    """A call of `team` to `model`, within `LOOSE` bounds; `facts` set what the relay would
    have recorded (``upstream_status=200``, ``failure="cut"``, ``price_book=...``)."""
    meter = CallMeter(
        request_id=request_id,
        team=team,
        key_id="k_00000000",
        endpoint=endpoint,
        stream=stream,
        model_requested=model,
        tags=NO_TAGS,
        end_user=None,
        payload=payload if payload is not None else {},
        started_at=started_at,
        prompt_bound=LOOSE.max_context_tokens,
        output_bound=LOOSE.max_output_tokens,
    )
    for name, value in facts.items():
        setattr(meter, name, value)
    return meter
