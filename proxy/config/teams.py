"""The ``teams`` and ``budgets`` sections: client keys, team policies, spending limits."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from proxy.auth import TEAM_NAME, TEAM_NAME_RULE, ClientKey, key_id_of
from proxy.config.fields import Reader
from proxy.config.model import DEFAULT_POLICY, Budget, TeamPolicy

_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


def read_teams(
    reader: Reader, raw: Any
) -> tuple[dict[str, ClientKey], tuple[str, ...], dict[str, TeamPolicy]]:
    if not isinstance(raw, Mapping) or not raw:
        raise reader.fail(
            "teams",
            "expected at least one team with client keys "
            "(create one with: python -m proxy keys new --team NAME)",
        )
    keys: dict[str, ClientKey] = {}
    policies: dict[str, TeamPolicy] = {}
    for team, spec in raw.items():
        where = f"teams.{team}"
        if not isinstance(team, str) or not TEAM_NAME.fullmatch(team):
            raise reader.fail(where, TEAM_NAME_RULE)
        reader.keys(spec, where, {"keys", "default_max_tokens", "over_budget"})
        policy = _policy(reader, spec, where)
        if policy != DEFAULT_POLICY:
            policies[team] = policy
        entries = spec.get("keys") if isinstance(spec, Mapping) else None
        if not isinstance(entries, list) or not entries:
            raise reader.fail(f"{where}.keys", "expected a list of 'sha256:<hex>' key hashes")
        for index, entry in enumerate(entries):
            match = _HASH.match(entry.strip()) if isinstance(entry, str) else None
            if match is None:
                raise reader.fail(
                    f"{where}.keys[{index}]", "expected 'sha256:' and 64 lower-case hex digits"
                )
            digest = match.group(1)
            if digest in keys:
                raise reader.fail(
                    f"{where}.keys[{index}]",
                    f"the same key is already listed for team {keys[digest].team!r}",
                )
            keys[digest] = ClientKey(team=team, key_id=key_id_of(digest))
    return keys, tuple(raw), policies


def _policy(reader: Reader, spec: Mapping[str, Any], where: str) -> TeamPolicy:
    default = spec.get("default_max_tokens")
    if default is not None:
        default = reader.positive_int(default, f"{where}.default_max_tokens")
    over_budget = spec.get("over_budget", "refuse")
    if over_budget not in ("refuse", "lower_max_tokens"):
        raise reader.fail(
            f"{where}.over_budget", f"expected refuse or lower_max_tokens, got {over_budget!r}"
        )
    return TeamPolicy(default_max_tokens=default, over_budget=over_budget)


def read_budgets(reader: Reader, raw: Any, teams: tuple[str, ...]) -> tuple[Budget, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise reader.fail("budgets", "expected a mapping of team -> list of budgets")
    budgets: list[Budget] = []
    for team, entries in raw.items():
        if team not in teams:
            raise reader.fail(f"budgets.{team}", "not a team defined under 'teams'")
        if not isinstance(entries, list) or not entries:
            raise reader.fail(f"budgets.{team}", "expected a list of budgets")
        periods: set[str] = set()
        for index, entry in enumerate(entries):
            budgets.append(_budget(reader, str(team), entry, f"budgets.{team}[{index}]"))
            if budgets[-1].period in periods:
                raise reader.fail(
                    f"budgets.{team}[{index}].period",
                    f"team {team!r} already has a {budgets[-1].period} budget",
                )
            periods.add(budgets[-1].period)
    return tuple(budgets)


def _budget(reader: Reader, team: str, entry: Any, where: str) -> Budget:
    reader.keys(entry, where, {"period", "amount", "currency", "soft", "hard"})
    if not isinstance(entry, Mapping):
        raise reader.fail(where, "expected a mapping")
    period = entry.get("period")
    if period not in ("day", "week", "month"):
        raise reader.fail(f"{where}.period", f"expected day, week or month, got {period!r}")
    amount = reader.decimal(entry.get("amount"), f"{where}.amount")
    if amount <= 0:
        raise reader.fail(f"{where}.amount", "must be positive")
    currency = reader.text(entry.get("currency"), f"{where}.currency").upper()
    soft_raw = entry.get("soft", [])
    if not isinstance(soft_raw, list):
        raise reader.fail(f"{where}.soft", "expected a list of percentages such as [50, 80]")
    soft = tuple(sorted(reader.decimal(s, f"{where}.soft") for s in soft_raw))
    if any(not 0 < s < 100 for s in soft):
        raise reader.fail(f"{where}.soft", "percentages must lie between 0 and 100")
    hard = entry.get("hard", False)
    if not isinstance(hard, bool):
        raise reader.fail(f"{where}.hard", f"expected true or false, got {hard!r}")
    return Budget(team, period, amount, currency, soft, hard)
