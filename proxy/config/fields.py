"""Reading the configuration's scalar fields: each either parses or raises `ConfigError`."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from proxy.config.model import ConfigError


class Reader:
    """Reads one configuration file's fields; every failure names the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def section(self, raw: Any, key: str) -> Mapping[str, Any]:
        value = raw.get(key) if isinstance(raw, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def keys(self, raw: Any, key: str, allowed: set[str]) -> None:
        if raw is None:
            return
        if not isinstance(raw, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(raw).__name__}")
        for name in raw:
            if name not in allowed:
                raise self.fail(
                    f"{key}.{name}" if key != "(file)" else str(name),
                    f"unknown key (allowed: {', '.join(sorted(allowed))})",
                )

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected text, got {value!r}")
        return value.strip()

    def seconds(self, value: Any, key: str) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"expected seconds, got {value!r}") from None
        if isinstance(value, bool) or not seconds > 0:
            raise self.fail(key, f"expected a positive number of seconds, got {value!r}")
        return seconds

    def positive_int(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"expected a positive whole number, got {value!r}")
        return value

    def flag(self, value: Any, key: str) -> bool:
        """A YAML boolean (``true``, ``false``; YAML 1.1 also reads ``yes``/``no`` so); a
        number or a string such as ``"true"`` or ``1`` is refused rather than guessed at."""
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def decimal(self, value: Any, key: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.fail(key, f"expected a number, got {value!r}")
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise self.fail(key, f"not a number: {value!r}") from None
        if not number.is_finite():
            raise self.fail(key, f"not a finite number: {value!r}")
        return number
