"""Helpers for tests that talk to the fake DeepSeek directly (request bodies, SSE parsing)."""

from __future__ import annotations

import json
from typing import Any

from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY

UPSTREAM_AUTH = {"Authorization": f"Bearer {FAKE_UPSTREAM_KEY}"}
LONG_PROMPT = "x" * 1000  # 251 prompt tokens: long enough for a 64-token cache hit


def chat(**extra: Any) -> dict[str, Any]:
    """A minimal valid chat request body."""
    return {
        "model": "deepseek-flash",
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        **extra,
    }


def data_events(raw: bytes, ending: bytes = b"\n") -> list[bytes]:
    """The ``data:`` payloads of a complete SSE body framed with ``ending``; comments skipped.

    Deliberately naive (exact framing, one data line per event) so a framing slip in the fake
    fails here instead of being smoothed over by a tolerant parser."""
    blocks = raw.split(ending * 2)
    assert blocks[-1] == b"", "a stream ends with a blank line"
    payloads = []
    for block in blocks[:-1]:
        if block.startswith(b":"):
            continue
        assert block.startswith(b"data: "), block
        payloads.append(block.removeprefix(b"data: "))
    return payloads


def stream_chunks_of(raw: bytes, ending: bytes = b"\n") -> list[dict[str, Any]]:
    """The JSON chunks of a complete stream, checking that it ends with ``[DONE]``."""
    events = data_events(raw, ending)
    assert events[-1] == b"[DONE]"
    return [json.loads(event) for event in events[:-1]]
