"""Reading YAML configuration strictly and safely.

PyYAML's defaults are wrong for money and for configuration files people edit by hand:

- ``0.135`` becomes a binary float; prices must stay exact, so floats are kept as their text and
  the caller turns them into `Decimal`.
- ``2025-02-08 16:00:00+00:00`` silently becomes a `datetime` and bare dates become `date`;
  instants are parsed by the caller with `datetime.fromisoformat`, one rule for every field.
- A key written twice keeps the last value without a word; here it is an error, because a price
  entered twice is a mistake someone must see.

The loader derives from `yaml.SafeLoader`: no Python object construction is possible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_DROPPED_TAGS = {"tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}


class YamlError(Exception):
    """A file that cannot be read as YAML, with the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that keeps floats and timestamps as text and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    """Parse one YAML file; raise `YamlError` naming the file on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise YamlError(str(path), f"not UTF-8: {exc.reason}") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlError(str(path), f"invalid YAML: {exc}") from exc
