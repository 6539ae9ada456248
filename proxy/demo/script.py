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
    body = entry.get("body")
    if body is None:
        system = systems[entry["system"]] if "system" in entry else None
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": entry["question"]})
        thinking = entry.get("thinking", False)
        body = {
            "model": entry["model"],
            "messages": messages,
            "stream": entry.get("stream", False),
            "thinking": {"type": "enabled" if thinking else "disabled"},
        }
    return Call(entry["team"], at, dict(body), entry["note"], entry.get("path", _CHAT_PATH))


def _script(path: Path) -> tuple[Call, ...]:
    raw = load_yaml(path)
    return tuple(_call(entry, raw["systems"]) for entry in raw["calls"])


SCRIPT = _script(SCRIPT_FILE)
