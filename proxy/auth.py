"""Client keys: how they are made, stored (SHA-256 only) and recognised.

The proxy never stores or logs a client key, nor its full hash: a request is identified by the
team and a short key id (the first 8 hex digits of the hash), enough to tell a team's keys apart
in logs and records while useless for guessing the key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

KEY_PREFIX = "sk-proxy-"
TEAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
"""A team's name (`fullmatch`): safe in metric labels, ledger rows, SQL lock keys and YAML
keys without quoting."""
TEAM_NAME_RULE = (
    "team names are 1 to 63 lower-case letters, digits, '_', '.' or '-', starting with a "
    "letter or digit"
)


@dataclass(frozen=True, slots=True)
class ClientKey:
    team: str
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(digest: str) -> str:
    return f"k_{digest[:8]}"


def new_key() -> str:
    """A fresh random client key: 256 bits from the OS's CSPRNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def lookup(token: str | None, keys: Mapping[str, ClientKey]) -> ClientKey | None:
    """The client behind a bare key (Anthropic's ``x-api-key`` header), or None."""
    if not token or len(token) > 1024 or not token.strip():
        return None
    try:
        digest = hash_key(token.strip())
    except UnicodeEncodeError:
        return None
    return keys.get(digest)


def authenticate(authorization: str | None, keys: Mapping[str, ClientKey]) -> ClientKey | None:
    """The key behind an ``Authorization: Bearer <key>`` header, or None.

    The header is only hashed and looked up; it is never parsed further, logged or echoed.
    Bytes that are not UTF-8 (aiohttp hands them over as surrogates) cannot be a key the
    proxy issued, which are ASCII: such a header is refused like any unknown key.
    """
    if not authorization or len(authorization) > 1024:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        digest = hash_key(token.strip())
    except UnicodeEncodeError:
        return None
    return keys.get(digest)
