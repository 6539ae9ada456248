"""The demo's fixed script of calls (``script.yaml`` beside this module): teams, models, routes
and the simulated instants they are priced at, chosen to show every tier: a holiday, peak and
off-peak hours, a weekend. The calls are data, read once at import."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from proxy.yamlfile import load_yaml

TEAMS = ("search", "support", "research")
BEIJING = ZoneInfo("Asia/Shanghai")
FLASH = "deepseek-flash"
FREE_PLAY = datetime(2026, 11, 2, 10, 0, tzinfo=BEIJING)
"""The instant (plus real time elapsed) at which calls made after the script are priced."""
SCRIPT_FILE = Path(__file__).with_name("script.yaml")
_CHAT_PATH = "/chat/completions"
_PATHS = {"chat": _CHAT_PATH, "anthropic": "/anthropic/v1/messages", "responses": "/responses"}
"""The route each request format is sent to unless the entry names one."""


@dataclass(frozen=True, slots=True)
class Call:
    """One scripted call: who sends what, where, and at which (simulated) instant."""

    team: str
    at: datetime
    body: dict[str, Any]
    note: str
    path: str = _CHAT_PATH


def _call(entry: Mapping[str, Any], systems: Mapping[str, str]) -> Call:
    at = datetime.strptime(f"2026-{entry['at']}", "%Y-%m-%d %H:%M").replace(tzinfo=BEIJING)
    kind = entry.get("format", "chat")
    body = entry.get("body")
    if body is None:
        body = _body(kind, entry, systems[entry["system"]] if "system" in entry else None)
    return Call(entry["team"], at, dict(body), entry["note"], entry.get("path", _PATHS[kind]))


def _body(kind: str, entry: Mapping[str, Any], system: str | None) -> dict[str, Any]:
    """A request in the entry's format: a system prompt where that format puts it (a chat
    message, Anthropic's ``system``, the Responses API's ``instructions``)."""
    question, stream = entry["question"], entry.get("stream", False)
    thinking = {"type": "enabled" if entry.get("thinking", False) else "disabled"}
    if kind == "anthropic":
        messages = [{"role": "user", "content": question}]
        body = {"model": entry["model"], "max_tokens": 1024, "messages": messages}
        return {**body, "stream": stream, **({"system": system} if system else {})}
    if kind == "responses":
        body = {"model": entry["model"], "input": question, "stream": stream}
        return {**body, "thinking": thinking, **({"instructions": system} if system else {})}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return {"model": entry["model"], "messages": messages, "stream": stream, "thinking": thinking}


def _script(path: Path) -> tuple[Call, ...]:
    raw = load_yaml(path)
    return tuple(_call(entry, raw["systems"]) for entry in raw["calls"])


SCRIPT = _script(SCRIPT_FILE)
